"""Interop tests: the real Python Celery 5.7 client, CLI and worker against celeriac.

Each test drives the worker under test (``INTEROP_WORKER``, default celeriac)
through the stock Celery client on a private key prefix and queue (see
conftest.py), and asserts exact values. Tests a-j follow the interop contract:

    a  results round-trip (args, kwargs, nested unicode, floats)
    b  a failing task raises the real ValueError on .get()
    c  priority 9 lands in the ``\\x06\\x169`` sub-list and is consumed
    d  ignore_result=True stores no result
    e  an unknown task name fails promptly with NotRegistered
    f  the celeriac publisher CLI feeds a Python Celery worker
    g  mixed fleet: a Python and a celeriac worker drain 10,000 tasks exactly once
    h  crash with acks_late: SIGKILL, visibility timeout, restart, nothing lost
    i  garbage messages are dead-lettered and do not kill the worker (celeriac-only)
    j  warm shutdown gives prefetched, unstarted tasks back to the queue
"""
import base64
import json
import time
import uuid

import pytest
from celery.exceptions import NotRegistered

from interop_helpers import fetch_metas, publish_many, queue_depth, unacked_counts, wait_for

GET_TIMEOUT = 10


# ------------------------------------------------------------------ a. values
def test_a_results_round_trip(workers, client_app):
    workers.start()

    assert client_app.send_task("bench.add", (2, 3)).get(timeout=GET_TIMEOUT) == 5
    assert client_app.send_task("bench.add", kwargs={"x": 2, "y": 3}).get(timeout=GET_TIMEOUT) == 5

    # Nested, non-ASCII, with ints beyond f64 precision, floats, bools, nulls and
    # empty containers; key order must survive too (compared via json.dumps).
    nested = {
        "zeta": "last key first",
        "grüße": ["ß", "日本語", "🎉", {"ключ": [1, -2, 2.5, None, True, False]}],
        "big": 9007199254740993,  # 2**53 + 1: not representable as a double
        "float": 0.1,
        "empty": {"list": [], "dict": {}, "str": ""},
        "alpha": [[["deep"]]],
    }
    echoed = client_app.send_task("bench.echo", (nested,)).get(timeout=GET_TIMEOUT)
    assert echoed == nested
    assert json.dumps(echoed) == json.dumps(nested)  # same key order, ints stay ints

    total = client_app.send_task("bench.xsum", ([1, 2, 3.5],)).get(timeout=GET_TIMEOUT)
    assert total == 6.5
    assert isinstance(total, float)


# ------------------------------------------------------------------ b. failure
def test_b_failure_raises_value_error(workers, client_app):
    workers.start()

    result = client_app.send_task("bench.fail", ("boom",))
    with pytest.raises(ValueError) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    assert type(excinfo.value) is ValueError
    assert excinfo.value.args == ("boom",)
    assert str(excinfo.value) == "boom"
    assert result.state == "FAILURE"


# ----------------------------------------------------------------- c. priority
def test_c_priority_9_sub_list(workers, client_app, iso, redis_client):
    result = client_app.send_task("bench.add", (4, 5), priority=9)

    # Before any worker runs: exactly this message, in the prefixed priority-9 list.
    key9 = iso.queue_key(priority=9)
    assert key9 == f"{iso.prefix}{iso.queue}\x06\x169"
    assert redis_client.llen(key9) == 1
    assert redis_client.llen(iso.queue_key()) == 0
    envelope = json.loads(redis_client.lindex(key9, 0))
    assert envelope["properties"]["priority"] == 9
    assert envelope["headers"]["id"] == result.id

    workers.start()
    assert result.get(timeout=GET_TIMEOUT) == 9
    assert redis_client.llen(key9) == 0


# ------------------------------------------------------------ d. ignore_result
def test_d_ignore_result_stores_nothing(workers, client_app, iso, redis_client):
    workers.start()

    ignored = client_app.send_task("bench.mark", (7, iso.mark_key, iso.redis_url), ignore_result=True)
    wait_for(lambda: redis_client.hget(iso.mark_key, "7"), GET_TIMEOUT, message="bench.mark(7) to run")
    # A task with a result afterwards, plus a grace period: whatever the worker
    # does after running the ignored task has had time to hit Redis.
    assert client_app.send_task("bench.add", (1, 2)).get(timeout=GET_TIMEOUT) == 3
    time.sleep(0.5)

    assert redis_client.hgetall(iso.mark_key) == {b"7": b"1"}
    assert redis_client.exists(iso.result_key(ignored.id)) == 0
    assert list(redis_client.scan_iter(match=f"*{ignored.id}*")) == []


# ----------------------------------------------------------- e. unknown task
def test_e_unknown_task_fails_promptly(workers, client_app):
    workers.start()

    started = time.monotonic()
    result = client_app.send_task("bench.no_such_task", (1, 2))
    with pytest.raises(NotRegistered) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    elapsed = time.monotonic() - started
    assert elapsed < 5, f"NotRegistered took {elapsed:.1f}s"
    assert "bench.no_such_task" in str(excinfo.value)
    assert result.state == "FAILURE"


# ------------------------------------------------------ f. CLI -> Python worker
def test_f_cli_call_runs_on_python_worker(workers, client_app):
    workers.start(kind="python")

    task_id = workers.cli_call("bench.add", args="[20, 22]")
    assert str(uuid.UUID(task_id)) == task_id
    assert client_app.AsyncResult(task_id).get(timeout=GET_TIMEOUT) == 42


# ------------------------------------------------------------- g. mixed fleet
def test_g_mixed_fleet_drains_exactly_once(workers, client_app, iso, redis_client):
    n = 10_000
    python_worker = workers.start(kind="python", concurrency=2)
    tested_worker = workers.start(concurrency=2)

    started = time.monotonic()
    publish_many(client_app, "bench.mark", ((i, iso.mark_key, iso.redis_url) for i in range(n)),
                 ignore_result=True)
    enqueued = time.monotonic() - started

    wait_for(lambda: redis_client.hlen(iso.mark_key) >= n, 120, interval=0.2,
             message=f"{n} marks (enqueued in {enqueued:.1f}s)")
    wait_for(lambda: queue_depth(redis_client, iso.prefix, iso.queue) == 0
             and unacked_counts(redis_client, iso.prefix) == (0, 0), 15,
             message="queue and unacked to drain")
    time.sleep(0.5)  # a duplicate execution, if any, would land now

    marks = redis_client.hgetall(iso.mark_key)
    assert len(marks) == n
    assert set(marks) == {str(i).encode() for i in range(n)}
    duplicated = {k: v for k, v in marks.items() if v != b"1"}
    assert duplicated == {}, f"{len(duplicated)} tasks ran more than once"
    assert queue_depth(redis_client, iso.prefix, iso.queue) == 0
    assert unacked_counts(redis_client, iso.prefix) == (0, 0)

    # Both workers must have taken part (pyapp tallies marks per Python node).
    tally = {k.decode(): int(v) for k, v in redis_client.hgetall(iso.mark_key + ":workers").items()}
    python_share = tally.get(python_worker.name, 0)
    if tested_worker.kind == "python":
        tested_share = tally.get(tested_worker.name, 0)
        assert python_share + tested_share == n
    else:
        tested_share = n - python_share
    print(f"enqueued {n} in {enqueued:.2f}s; python share {python_share}, "
          f"{tested_worker.kind} share {tested_share}")
    assert python_share > 0, f"the Python worker ran no task: {tally}"
    assert tested_share > 0, f"the {tested_worker.kind} worker ran no task: {tally}"
    assert python_worker.alive and tested_worker.alive


# ---------------------------------------------------------------- h. crash
def test_h_crash_with_acks_late_loses_nothing(workers, client_app, iso, redis_client):
    vt = 3
    w1 = workers.start(concurrency=4, acks_late=True, visibility_timeout=vt)

    # 10 blocks of [bench.sleep(1), 20 x bench.mark]: the sleeps pin the 4 slots,
    # so at any moment the worker holds started and prefetched messages unacked.
    sleep_ids, mark_ids = [], []
    with client_app.producer_or_acquire() as producer:
        for block in range(10):
            sleep_ids.append(client_app.send_task("bench.sleep", (1,), producer=producer).id)
            for j in range(20):
                i = block * 20 + j
                mark_ids.append(client_app.send_task(
                    "bench.mark", (i, iso.mark_key, iso.redis_url), producer=producer).id)

    wait_for(lambda: redis_client.hlen(iso.mark_key) >= 20, 15, message="the first 20 marks")
    w1.kill()
    marked_at_kill = redis_client.hlen(iso.mark_key)
    held_at_kill = unacked_counts(redis_client, iso.prefix)
    print(f"at SIGKILL: {marked_at_kill} marks done, {held_at_kill[0]} messages unacked")
    assert marked_at_kill < 200, "the worker finished before it was killed: nothing tested"
    assert held_at_kill[0] > 0, "the killed worker held no unacked message: nothing tested"
    assert held_at_kill[0] == held_at_kill[1]

    # The held messages become restorable once older than the visibility timeout;
    # a worker restores them at startup (kombu sweeps then).
    time.sleep(vt + 1.5)
    workers.start(concurrency=4, acks_late=True, visibility_timeout=vt, wait_ready=False)

    wait_for(lambda: redis_client.hlen(iso.mark_key) >= 200, 60, interval=0.2, message="all 200 marks")
    marks = redis_client.hgetall(iso.mark_key)
    assert set(marks) == {str(i).encode() for i in range(200)}
    assert all(int(v) >= 1 for v in marks.values())

    all_ids = mark_ids + sleep_ids
    wait_for(lambda: all(m is not None and m["status"] == "SUCCESS"
                         for m in fetch_metas(redis_client, iso.prefix, all_ids)), 30,
             message="every result to be SUCCESS")
    metas = fetch_metas(redis_client, iso.prefix, mark_ids)
    assert [m["result"] for m in metas] == list(range(200))
    wait_for(lambda: queue_depth(redis_client, iso.prefix, iso.queue) == 0
             and unacked_counts(redis_client, iso.prefix) == (0, 0), 15,
             message="queue and unacked to drain")


# -------------------------------------------------------------- i. garbage
@pytest.mark.celeriac_only(reason="dead-lettering undecodable messages is celeriac behaviour; "
                                  "Python Celery logs and drops them")
def test_i_garbage_is_dead_lettered(workers, client_app, iso, redis_client):
    queue_key = iso.queue_key()

    # (1) not JSON at all
    raw1 = b"not json at all"
    # (2) a well-formed kombu envelope with a v2 task header whose body is not
    #     [args, kwargs, embed]
    bad_id = str(uuid.uuid4())
    raw2 = json.dumps({
        "body": base64.b64encode(json.dumps({"x": 1}).encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {"lang": "py", "task": "bench.add", "id": bad_id, "root_id": bad_id,
                    "parent_id": None, "group": None, "retries": 0, "eta": None, "expires": None,
                    "timelimit": [None, None], "argsrepr": "", "kwargsrepr": "", "origin": "interop"},
        "properties": {"correlation_id": bad_id, "reply_to": str(uuid.uuid4()), "delivery_mode": 2,
                       "delivery_info": {"exchange": "", "routing_key": iso.queue}, "priority": 0,
                       "body_encoding": "base64", "delivery_tag": str(uuid.uuid4())},
    }).encode()
    redis_client.lpush(queue_key, raw1)
    redis_client.lpush(queue_key, raw2)
    # (3) a well-formed bench.add with argument types it cannot add
    wrong_types = client_app.send_task("bench.add", ("a", []))
    # then an ordinary task
    normal = client_app.send_task("bench.add", (1, 1))

    worker = workers.start()

    assert normal.get(timeout=GET_TIMEOUT) == 2
    with pytest.raises(TypeError) as excinfo:
        wrong_types.get(timeout=GET_TIMEOUT)
    assert str(excinfo.value).strip(), "the TypeError carries no message"
    assert wrong_types.state == "FAILURE"

    wait_for(lambda: redis_client.llen(iso.deadletter_key) >= 2, GET_TIMEOUT, message="2 dead letters")
    time.sleep(0.3)  # a third (wrong) dead letter would show up now
    entries = [json.loads(e) for e in redis_client.lrange(iso.deadletter_key, 0, -1)]
    assert len(entries) == 2
    for entry in entries:
        assert entry["queue"] == iso.queue
        assert isinstance(entry["reason"], str) and entry["reason"].strip()
        assert isinstance(entry["at"], str) and entry["at"].strip()
    assert sorted(e["raw"] for e in entries) == sorted([raw1.decode(), raw2.decode()])

    assert worker.alive
    # Dead-lettered messages are settled, not left in flight.
    wait_for(lambda: unacked_counts(redis_client, iso.prefix) == (0, 0)
             and queue_depth(redis_client, iso.prefix, iso.queue) == 0, 5,
             message="queue and unacked to be empty")


# -------------------------------------------------------- j. warm shutdown
def test_j_warm_shutdown_gives_back_prefetched(workers, client_app, iso, redis_client):
    worker = workers.start(concurrency=1)

    ids = [client_app.send_task("bench.sleep", (1,)).id for _ in range(5)]
    # SIGTERM ~0.5 s into the first sleep: once the worker has fetched, the
    # first task is running and the others are prefetched or still queued.
    wait_for(lambda: queue_depth(redis_client, iso.prefix, iso.queue) < 5, 5, message="the first fetch")
    time.sleep(0.5)
    status = worker.terminate(timeout=15)
    assert status == 0, f"warm shutdown exited with status {status}"

    # The task running at SIGTERM finished; the prefetched ones were given back.
    metas = fetch_metas(redis_client, iso.prefix, ids)
    ran = [tid for tid, m in zip(ids, metas) if m is not None]
    assert ran == ids[:1]
    assert metas[0]["status"] == "SUCCESS"
    assert queue_depth(redis_client, iso.prefix, iso.queue) == 4
    assert unacked_counts(redis_client, iso.prefix) == (0, 0)

    workers.start(concurrency=1)
    wait_for(lambda: all(m is not None and m["status"] == "SUCCESS"
                         for m in fetch_metas(redis_client, iso.prefix, ids)), 15,
             message="all 5 sleeps to succeed")
    assert queue_depth(redis_client, iso.prefix, iso.queue) == 0
