"""Interop tests for canvas: chains, groups, chords, link / link_error, map / starmap / chunks.

Same conventions as test_interop.py: the real Celery 5.7 client (or the
publisher CLI under test) drives the worker under test (``INTEROP_WORKER``) on
a private key prefix and queue, and every assertion is on exact values. Result
metas are read straight from Redis where the client API hides a field
(``children``, ``parent_id``, ``group_id``, ``worker``).

    k1   chain                          add(2, 2) | mul(10) -> 40; children, parent_id, root_id on the wire
    k2   group of 100                   [2 * i]; every member meta carries the group id
    k3   1000-member chord, mixed fleet  xsum -> 999000, both kinds ran headers, body once (celeriac-only)
    k4   link / link_error              child 40 with parent_id; errback gets the failed id
    k5   chord with a failing header    body FAILURE ChordError, body never ran
    k6   redelivered chord header       counted once, body once
    k7   failed chain                   the remaining steps are stored FAILURE ValueError('boom')
    k8   map / starmap / chunks         celery.map, celery.starmap, celery.chunks
    k9   canvas published by the CLI    chain, chord, group, plain task run by a Python worker
    k10  immutable signature            add(2, 2) | mul.si(3, 3) -> 9

"Body ran once" is observed through a link on the chord body: the body's
callback ``bench.mark(0, ...)`` increments a Redis hash field once per body run.
"""
import base64
import json
import time
import uuid

import pytest
from celery import chain, chord, group
from celery.canvas import chunks, xmap, xstarmap
from celery.exceptions import ChordError
from celery.result import GroupResult, result_from_tuple

from interop_helpers import fetch_metas, queue_depth, wait_for

GET_TIMEOUT = 10


# ------------------------------------------------------------------- helpers
def sig(app, name, *args, **options):
    """``name.s(*args)`` on the client app (the client has no task objects)."""
    return app.signature(name, args=args, options=options)


def si(app, name, *args, **options):
    """``name.si(*args)``: immutable, the parent's result is not prepended."""
    return app.signature(name, args=args, options=options, immutable=True)


def get_meta(redis_client, iso, task_id):
    raw = redis_client.get(iso.result_key(task_id))
    return json.loads(raw) if raw is not None else None


def wait_meta(redis_client, iso, task_id, timeout=GET_TIMEOUT, states=("SUCCESS", "FAILURE", "REVOKED")):
    """The stored meta of ``task_id`` once it is in one of ``states``."""
    return wait_for(lambda: (m := get_meta(redis_client, iso, task_id)) is not None and m["status"] in states
                    and m, timeout, message=f"a ready result for {task_id}")


def child_ids(meta):
    """Task ids named by a meta's ``children`` (result tuples ``[[id, parent], None]``)."""
    return [child[0][0] for child in meta["children"]]


def exc_of(meta):
    result = meta["result"]
    assert isinstance(result, dict), f"not an exception result: {meta!r}"
    return result["exc_type"], result["exc_module"], result["exc_message"]


def body_marker(app, iso):
    """A callback for a chord body: ``bench.mark(0)`` counts body runs in ``iso.mark_key``."""
    return si(app, "bench.mark", 0, iso.mark_key, iso.redis_url)


def body_runs(redis_client, iso):
    return int(redis_client.hget(iso.mark_key, "0") or 0)


def envelope(raw):
    """A kombu Redis envelope -> (envelope dict, headers, [args, kwargs, embed])."""
    env = json.loads(raw)
    body = json.loads(base64.b64decode(env["body"]))
    return env, env["headers"], body


# --------------------------------------------------------------- k1. chain
def test_k1_chain(workers, client_app, iso, redis_client):
    workers.start()

    result = chain(sig(client_app, "bench.add", 2, 2), sig(client_app, "bench.mul", 10)).apply_async()
    assert result.get(timeout=GET_TIMEOUT) == 40
    first_id, second_id = result.parent.id, result.id

    # The worker publishes the next step before it stores this result: wait for it.
    first = wait_meta(redis_client, iso, first_id)
    assert first["status"] == "SUCCESS" and first["result"] == 4
    assert first["children"] == [[[second_id, None], None]]
    assert "parent_id" not in first  # the chain's first task was published by the client, without a parent

    second = wait_meta(redis_client, iso, second_id)
    assert second["status"] == "SUCCESS" and second["result"] == 40
    assert second["parent_id"] == first_id
    assert second["children"] == []
    assert "group_id" not in second

    # root_id is not stored in metas: it is checked on the wire. A 3-step chain
    # whose last step goes to a queue no worker reads, so its message (published
    # by the worker after step 2) can be inspected before it runs.
    hold = f"{iso.queue}.hold"
    result = chain(sig(client_app, "bench.add", 2, 2), sig(client_app, "bench.mul", 10),
                   sig(client_app, "bench.add", 2, queue=hold)).apply_async()
    step3_id, step2_id, step1_id = result.id, result.parent.id, result.parent.parent.id
    hold_key = iso.queue_key(hold)
    wait_for(lambda: redis_client.llen(hold_key) == 1, GET_TIMEOUT, message="step 3 in the hold queue")
    env, headers, (args, kwargs, embed) = envelope(redis_client.lindex(hold_key, 0))
    assert headers["task"] == "bench.add"
    assert headers["id"] == step3_id
    assert headers["parent_id"] == step2_id
    assert headers["root_id"] == step1_id
    assert args == [40, 2] and kwargs == {}
    assert not embed.get("chain")  # the last hop: [] (or null), nothing left to run
    assert env["properties"]["delivery_info"]["routing_key"] == hold
    assert wait_meta(redis_client, iso, step2_id)["parent_id"] == step1_id
    assert wait_meta(redis_client, iso, step1_id)["children"] == [[[step2_id, None], None]]

    # Hand it to the worker: it runs with the parent's result prepended.
    redis_client.rpoplpush(hold_key, iso.queue_key())
    assert result.get(timeout=GET_TIMEOUT) == 42
    assert get_meta(redis_client, iso, step3_id)["parent_id"] == step2_id


# --------------------------------------------------------------- k2. group
def test_k2_group_of_100(workers, client_app, iso, redis_client):
    workers.start(concurrency=4)

    result = group(sig(client_app, "bench.add", i, i) for i in range(100)).apply_async()
    assert isinstance(result, GroupResult)
    assert result.get(timeout=30) == [2 * i for i in range(100)]

    ids = [member.id for member in result.results]
    assert len(set(ids)) == 100
    metas = fetch_metas(redis_client, iso.prefix, ids)
    assert [m["result"] for m in metas] == [2 * i for i in range(100)]
    assert {m["status"] for m in metas} == {"SUCCESS"}
    assert {m["group_id"] for m in metas} == {result.id}
    assert all(m["task_id"] == tid for m, tid in zip(metas, ids))


# ------------------------------------------------- k3. 1000-member chord
@pytest.mark.celeriac_only(reason="one chord joined by a Python and a celeriac worker needs both kinds")
def test_k3_chord_1000_mixed_fleet(workers, client_app, iso, redis_client):
    extended = {"result_extended": True}
    python_worker = workers.start(kind="python", concurrency=2, settings=extended)
    tested_worker = workers.start(concurrency=2, settings=extended)

    n = 1000
    body = sig(client_app, "bench.xsum")
    body.link(body_marker(client_app, iso))
    header = [sig(client_app, "bench.add", i, i) for i in range(n)]
    result = chord(header)(body)
    assert result.get(timeout=60) == 2 * sum(range(n)) == 999000

    header_result = result.parent  # the GroupResult of the header
    header_ids = [member.id for member in header_result.results]
    assert len(set(header_ids)) == n

    # The body ran once, was published into the header's group, and stored the sum.
    body_meta = get_meta(redis_client, iso, result.id)
    assert body_meta["status"] == "SUCCESS" and body_meta["result"] == 999000
    assert body_meta["group_id"] == header_result.id
    assert body_meta["name"] == "bench.xsum"
    assert body_meta["parent_id"] in header_ids  # the header task whose result completed the chord

    # Every header meta: SUCCESS 2*i, the chord's group id, and the node that ran it.
    metas = fetch_metas(redis_client, iso.prefix, header_ids)
    assert [m["result"] for m in metas] == [2 * i for i in range(n)]
    assert {m["status"] for m in metas} == {"SUCCESS"}
    assert {m["group_id"] for m in metas} == {header_result.id}
    ran_by = {}
    for m in metas:
        ran_by[m["worker"]] = ran_by.get(m["worker"], 0) + 1
    print(f"header tasks per worker: {ran_by}")
    assert set(ran_by) == {python_worker.name, tested_worker.name}, ran_by

    wait_for(lambda: body_runs(redis_client, iso) >= 1, GET_TIMEOUT, message="the body's link callback")
    wait_for(lambda: queue_depth(redis_client, iso.prefix, iso.queue) == 0, GET_TIMEOUT, message="an empty queue")
    time.sleep(0.3)  # a second body run's callback would land now
    assert body_runs(redis_client, iso) == 1


# ------------------------------------------------------ k4. link, link_error
def test_k4_link_and_link_error(workers, client_app, iso, redis_client):
    workers.start()

    parent = sig(client_app, "bench.add", 2, 2).apply_async(link=sig(client_app, "bench.mul", 10))
    assert parent.get(timeout=GET_TIMEOUT) == 4
    parent_meta = get_meta(redis_client, iso, parent.id)
    children = child_ids(parent_meta)
    assert len(children) == 1, parent_meta
    child = client_app.AsyncResult(children[0])
    assert child.get(timeout=GET_TIMEOUT) == 40
    child_meta = get_meta(redis_client, iso, child.id)
    assert child_meta["parent_id"] == parent.id
    assert "group_id" not in child_meta  # one callback is applied on its own, not as a group

    errback_id = str(uuid.uuid4())
    failed = sig(client_app, "bench.fail", "x").apply_async(
        link_error=sig(client_app, "bench.echo", task_id=errback_id))
    with pytest.raises(ValueError):
        failed.get(timeout=GET_TIMEOUT)
    errback = client_app.AsyncResult(errback_id)
    # The errback is published with the failed task's id as its only argument.
    assert errback.get(timeout=GET_TIMEOUT) == failed.id
    errback_meta = get_meta(redis_client, iso, errback_id)
    assert errback_meta["parent_id"] == failed.id
    # Celery publishes errbacks as group(errbacks).apply_async((failed id,), ...).
    assert isinstance(errback_meta.get("group_id"), str) and errback_meta["group_id"], errback_meta
    failed_meta = get_meta(redis_client, iso, failed.id)
    assert failed_meta["status"] == "FAILURE"
    assert exc_of(failed_meta) == ("ValueError", "builtins", ["x"])


# ------------------------------------------------- k5. failing chord header
def test_k5_chord_header_failure(workers, client_app, iso, redis_client):
    workers.start()

    body = sig(client_app, "bench.xsum")
    body.link(body_marker(client_app, iso))
    ok, bad = sig(client_app, "bench.add", 1, 1), sig(client_app, "bench.fail", "in-header")
    result = chord([ok, bad])(body)
    ok_id, bad_id = [member.id for member in result.parent.results]

    # The body's own result is the ChordError (asked without following parents).
    with pytest.raises(ChordError) as excinfo:
        client_app.AsyncResult(result.id).get(timeout=GET_TIMEOUT)
    assert "in-header" in str(excinfo.value)
    assert str(excinfo.value) == f"Dependency {bad_id} raised ValueError('in-header')"
    # The result chord() returned has the header as parent: get() raises the header's error first.
    with pytest.raises(ValueError) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    assert excinfo.value.args == ("in-header",)

    body_meta = get_meta(redis_client, iso, result.id)
    assert body_meta["status"] == "FAILURE"
    assert exc_of(body_meta) == ("ChordError", "celery.exceptions",
                                 [f"Dependency {bad_id} raised ValueError('in-header')"])
    ok_meta, bad_meta = get_meta(redis_client, iso, ok_id), get_meta(redis_client, iso, bad_id)
    assert ok_meta["status"] == "SUCCESS" and ok_meta["result"] == 2
    assert bad_meta["status"] == "FAILURE"
    assert exc_of(bad_meta) == ("ValueError", "builtins", ["in-header"])
    assert ok_meta["group_id"] == bad_meta["group_id"] == result.parent.id

    # The body was never published, so neither it nor its callback ran.
    wait_for(lambda: queue_depth(redis_client, iso.prefix, iso.queue) == 0, GET_TIMEOUT, message="an empty queue")
    assert client_app.send_task("bench.add", (1, 2)).get(timeout=GET_TIMEOUT) == 3
    time.sleep(0.3)
    assert body_runs(redis_client, iso) == 0
    assert get_meta(redis_client, iso, result.id)["status"] == "FAILURE"


# --------------------------------------------- k6. redelivered header task
def test_k6_redelivered_header_counts_once(workers, client_app, iso, redis_client):
    body = sig(client_app, "bench.xsum")
    body.link(body_marker(client_app, iso))
    result = chord([sig(client_app, "bench.add", i, i) for i in (1, 2, 3)])(body)

    # Before any worker runs: the 3 header messages, first published rightmost.
    queue_key = iso.queue_key()
    raw = redis_client.lrange(queue_key, 0, -1)
    assert len(raw) == 3
    h2, h1, h0 = raw
    assert envelope(h0)[1]["task"] == "bench.add" and envelope(h0)[2][0] == [1, 1]

    def redelivered(message):
        # What kombu's restore of an unacked message puts back: the same
        # envelope (same task id and delivery tag), flagged redelivered.
        env = json.loads(message)
        env["headers"]["redelivered"] = True
        env["properties"]["delivery_info"]["redelivered"] = True
        return json.dumps(env)

    # Consumption order (BRPOP takes the right end): h0, h0 again (before the
    # chord is complete), h1, h2, h1 again (after the body was sent).
    redis_client.delete(queue_key)
    redis_client.rpush(queue_key, redelivered(h1), h2, h1, redelivered(h0), h0)

    workers.start(concurrency=1, prefetch=1)
    assert result.get(timeout=GET_TIMEOUT) == 2 + 4 + 6
    wait_for(lambda: queue_depth(redis_client, iso.prefix, iso.queue) == 0, GET_TIMEOUT, message="an empty queue")
    # The duplicates have been run (the queue is empty); a second body run, if
    # any, and its callback would land within this time.
    assert client_app.send_task("bench.add", (1, 2)).get(timeout=GET_TIMEOUT) == 3
    wait_for(lambda: body_runs(redis_client, iso) >= 1, GET_TIMEOUT, message="the body's link callback")
    time.sleep(0.5)
    assert body_runs(redis_client, iso) == 1
    body_meta = get_meta(redis_client, iso, result.id)
    assert body_meta["status"] == "SUCCESS" and body_meta["result"] == 12


# ------------------------------------------------------- k7. failed chain
def test_k7_failed_chain_marks_remaining_steps(workers, client_app, iso, redis_client):
    workers.start()

    result = chain(sig(client_app, "bench.fail", "boom"), sig(client_app, "bench.add", 1),
                   sig(client_app, "bench.mul", 2)).apply_async()
    step3, step2, step1 = result, result.parent, result.parent.parent
    assert len({step1.id, step2.id, step3.id}) == 3
    for step in (step1, step2, step3):
        # A fresh AsyncResult has no parent: get() waits for this step's own
        # result (the chain's result would re-raise step 1's error at once).
        with pytest.raises(ValueError) as excinfo:
            client_app.AsyncResult(step.id).get(timeout=GET_TIMEOUT)
        assert type(excinfo.value) is ValueError and excinfo.value.args == ("boom",)
    for step in (step1, step2, step3):
        meta = get_meta(redis_client, iso, step.id)
        assert meta["status"] == "FAILURE"
        assert exc_of(meta) == ("ValueError", "builtins", ["boom"])
        assert meta["task_id"] == step.id
    # The remaining steps were marked, never published.
    assert get_meta(redis_client, iso, step1.id)["children"] == []
    assert queue_depth(redis_client, iso.prefix, iso.queue) == 0


# ----------------------------------------------- k8. map, starmap, chunks
def test_k8_map_starmap_chunks(workers, client_app, iso, redis_client):
    workers.start()

    echo, add = sig(client_app, "bench.echo"), sig(client_app, "bench.add")
    mapped = xmap(echo, [1, 2, 3], app=client_app).apply_async()
    assert mapped.get(timeout=GET_TIMEOUT) == [1, 2, 3]
    starmapped = xstarmap(add, [(1, 1), (2, 2)], app=client_app).apply_async()
    assert starmapped.get(timeout=GET_TIMEOUT) == [2, 4]
    # The client turns chunks into a group of celery.starmap tasks.
    chunked = chunks(add, list(zip(range(6), range(6))), 2, app=client_app).apply_async()
    assert chunked.get(timeout=GET_TIMEOUT) == [[0, 2], [4, 6], [8, 10]]

    # celery.chunks run by the worker: it publishes that group itself and
    # returns it (as a GroupResult tuple), like Celery's built-in task.
    sent = client_app.send_task("celery.chunks", kwargs={
        "task": dict(add), "it": [[i, i] for i in range(5)], "n": 2})
    meta = wait_meta(redis_client, iso, sent.id)
    assert meta["status"] == "SUCCESS", meta
    group_result = result_from_tuple(meta["result"], app=client_app)
    assert isinstance(group_result, GroupResult)
    assert len(group_result.results) == 3
    assert group_result.get(timeout=GET_TIMEOUT) == [[0, 2], [4, 6], [8]]
    assert meta["children"] == [meta["result"]]


# ------------------------------------------- k9. canvas published by the CLI
def test_k9_cli_canvas_on_python_worker(workers, client_app, iso, redis_client):
    queue_key = iso.queue_key()

    # A chain, inspected on the wire before a worker runs it.
    (chain_id,) = workers.apply_canvas(chain(sig(client_app, "bench.add", 2, 2), sig(client_app, "bench.mul", 10)))
    assert str(uuid.UUID(chain_id)) == chain_id
    assert redis_client.llen(queue_key) == 1
    _, headers, (args, kwargs, embed) = envelope(redis_client.lindex(queue_key, 0))
    assert headers["task"] == "bench.add" and args == [2, 2] and kwargs == {}
    assert headers["root_id"] == headers["id"] and headers["parent_id"] is None
    assert [(s["task"], s["args"], s["options"]["task_id"]) for s in embed["chain"]] == \
        [("bench.mul", [10], chain_id)]

    # A plain task with options: queue and task_id honoured.
    alt = f"{iso.queue}.alt"
    fixed_id = str(uuid.uuid4())
    (plain_id,) = workers.apply_canvas(sig(client_app, "bench.add", 20, 22, queue=alt, task_id=fixed_id))
    assert plain_id == fixed_id
    assert redis_client.llen(iso.queue_key(alt)) == 1
    assert envelope(redis_client.lindex(iso.queue_key(alt), 0))[1]["id"] == fixed_id

    workers.start(kind="python", queues=[iso.queue, alt])
    assert client_app.AsyncResult(chain_id).get(timeout=GET_TIMEOUT) == 40
    assert client_app.AsyncResult(plain_id).get(timeout=GET_TIMEOUT) == 42
    first_id = headers["id"]
    assert get_meta(redis_client, iso, chain_id)["parent_id"] == first_id
    assert wait_meta(redis_client, iso, first_id)["children"] == [[[chain_id, None], None]]

    # A chord: the Python worker joins it (5.7 Lua on .j/.t/.s/.d/.c) from the size the publisher set.
    (body_id,) = workers.apply_canvas(chord([sig(client_app, "bench.add", 1, 1), sig(client_app, "bench.add", 2, 2)],
                                            sig(client_app, "bench.xsum")))
    assert client_app.AsyncResult(body_id).get(timeout=GET_TIMEOUT) == 6
    body_meta = get_meta(redis_client, iso, body_id)
    assert body_meta["status"] == "SUCCESS" and body_meta["result"] == 6

    # A group: the group id, then the members' ids.
    lines = workers.apply_canvas(group(sig(client_app, "bench.add", i, i) for i in range(5)))
    assert len(lines) == 6 and len(set(lines)) == 6
    group_id, member_ids = lines[0], lines[1:]
    assert [client_app.AsyncResult(t).get(timeout=GET_TIMEOUT) for t in member_ids] == [0, 2, 4, 6, 8]
    assert {m["group_id"] for m in fetch_metas(redis_client, iso.prefix, member_ids)} == {group_id}


# ------------------------------------------------- k10. immutable signature
def test_k10_immutable_signature(workers, client_app, iso, redis_client):
    workers.start()

    result = chain(sig(client_app, "bench.add", 2, 2), si(client_app, "bench.mul", 3, 3)).apply_async()
    assert result.get(timeout=GET_TIMEOUT) == 9
    assert result.parent.get(timeout=GET_TIMEOUT) == 4
    meta = get_meta(redis_client, iso, result.id)
    assert meta["parent_id"] == result.parent.id
