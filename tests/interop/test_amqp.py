"""Interop tests over RabbitMQ: the real Python Celery 5.7 client, worker and CLI against celeriac's
AMQP transport (``amqp://``), results in the test's Redis prefix unless a test says otherwise.

Every test takes the ``amqp`` fixture (conftest.py): the fleet, the CLI calls and ``amqp.app`` (a
Celery client) use RabbitMQ; the queues and exchanges named after the test's tag are deleted
afterwards, so runs never collide. Same conventions as test_interop.py otherwise.

    q1   Python client -> celeriac worker: add, kwargs, failure re-raised as ValueError
    q2   ``celeriac call`` -> Python Celery worker
    q3   rpc:// result backend: results and a failure reach the sending client
    q4   acks_late + SIGKILL: RabbitMQ requeues, a second worker finishes everything
    q5   an undecodable message is dead-lettered to celeriac.deadletter.<queue>       celeriac-only
    q6   back-pressure: x-max-length 3 reject-publish, the 4th ``celeriac call`` fails celeriac-only
    q7   all connections closed under load: reconnect, nothing lost, resumes < 5 s  celeriac-only
    q8   countdown=3: runs once, not before send + 3 s
    q9   the ``celery inspect ping`` CLI sees the worker over RabbitMQ
    q10  a queue that exists with other arguments stops the worker, naming them      celeriac-only
    q11  x-max-priority queue: priority 9 runs before five earlier priority 1 tasks
    q11b task_queue_max_priority applies to every queue the worker consumes, as in Celery
    q13  task events reach Celery's own event receiver through the celeryev exchange
    q14  a callback into a full queue fails its task with OperationalError, nothing is dropped   celeriac-only
    q15  self.retry() over RabbitMQ: the retry is republished (same id, retries + 1) and runs to its result
    q12  RabbitMQ stopped and started under load: /health 503 while down, 200 after,
         nothing lost, consuming again within 5 s of the restart                     celeriac-only
"""
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest

from conftest import AMQP_URL, HERE, amqp_connection, rabbitmqctl
from interop_helpers import fetch_metas, wait_for

GET_TIMEOUT = 10


# ------------------------------------------------------------------- helpers
def queue_arguments(amqp, name):
    """The arguments RabbitMQ holds for queue ``name`` as a dict (ints as ints), or None if absent."""
    stats = amqp.queue_stats(name)
    if stats is None:
        return None
    args = {}
    # rabbitmqctl prints e.g. [{"x-max-length",3},{"x-overflow","reject-publish"}]
    for key, value in re.findall(r'\{"([^"]+)",([^{}]*)\}', stats["arguments"]):
        value = value.strip()
        args[key] = value.strip('"') if value.startswith('"') else int(value)
    return args


def parse_date(text):
    assert isinstance(text, str), f"date_done is not a string: {text!r}"
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None, f"date_done without a timezone: {text!r}"
    return value


def all_succeeded(redis_client, iso, ids):
    metas = fetch_metas(redis_client, iso.prefix, ids)
    return all(m is not None and m["status"] == "SUCCESS" for m in metas)


def drained(amqp, queue):
    """True when ``queue`` holds no message, ready or unacknowledged (rabbitmqctl)."""
    stats = amqp.queue_stats(queue)
    return stats is not None and stats["messages_ready"] == 0 and stats["messages_unacknowledged"] == 0


# ----------------------------------------------------- q1. client -> worker
def test_q1_client_send_task_over_amqp(amqp, workers, iso, redis_client):
    workers.start()
    app = amqp.app

    added = app.send_task("bench.add", (2, 3))
    assert added.get(timeout=GET_TIMEOUT) == 5
    assert app.send_task("bench.add", kwargs={"x": 20, "y": 22}).get(timeout=GET_TIMEOUT) == 42
    nested = {"grüße": ["日本語", 2.5, None, True, {"deep": [1, 9007199254740993]}], "empty": {}}
    assert app.send_task("bench.echo", (nested,)).get(timeout=GET_TIMEOUT) == nested

    failing = app.send_task("bench.fail", ("boom over amqp",))
    with pytest.raises(ValueError) as excinfo:
        failing.get(timeout=GET_TIMEOUT)
    assert type(excinfo.value) is ValueError
    assert excinfo.value.args == ("boom over amqp",)
    assert failing.state == "FAILURE"

    # The results really are in the test's Redis prefix, and the queue is empty.
    meta = json.loads(redis_client.get(iso.result_key(added.id)))
    assert (meta["status"], meta["result"], meta["task_id"]) == ("SUCCESS", 5, added.id)
    assert amqp.queue_counts(iso.queue) == (0, 1)  # nothing waiting; the worker's one consumer


# ------------------------------------------------- q2. celeriac call -> Python
def test_q2_cli_call_over_amqp_runs_on_python_worker(amqp, workers):
    workers.start(kind="python")

    task_id = workers.cli_call("bench.add", args="[20, 22]")
    assert str(uuid.UUID(task_id)) == task_id
    assert amqp.app.AsyncResult(task_id).get(timeout=GET_TIMEOUT) == 42

    task_id = workers.cli_call("bench.add", kwargs='{"x": 1, "y": 2}')
    assert amqp.app.AsyncResult(task_id).get(timeout=GET_TIMEOUT) == 3


# ----------------------------------------------------------------- q3. rpc://
def test_q3_rpc_result_backend(amqp, workers, iso, redis_client):
    app = amqp.client(backend="rpc://")
    workers.client_app = app  # the readiness sentinel's result comes back over rpc:// too
    workers.start(result_backend="rpc://")

    added = app.send_task("bench.add", (2, 3))
    assert added.get(timeout=GET_TIMEOUT) == 5
    assert app.send_task("bench.add", kwargs={"x": 20, "y": 22}).get(timeout=GET_TIMEOUT) == 42

    failing = app.send_task("bench.fail", ("boom over rpc",))
    with pytest.raises(ValueError) as excinfo:
        failing.get(timeout=GET_TIMEOUT)
    assert type(excinfo.value) is ValueError
    assert excinfo.value.args == ("boom over rpc",)
    assert failing.state == "FAILURE"

    # rpc:// stores nothing in Redis.
    assert redis_client.exists(iso.result_key(added.id)) == 0


# ------------------------------------------------- q4. acks_late + SIGKILL
def test_q4_acks_late_sigkill_loses_nothing(amqp, workers, iso, redis_client):
    app = amqp.app
    w1 = workers.start(concurrency=4, acks_late=True)

    # 10 blocks of [bench.sleep(3), 20 x bench.mark]: the sleeps pin the 4 slots, so at any moment
    # the worker holds started and prefetched messages unacknowledged, for long enough (about 9 s) that a slow
    # rabbitmqctl on a loaded machine still reads the queue before the worker is done.
    sleep_ids, mark_ids = [], []
    with app.producer_or_acquire() as producer:
        for block in range(10):
            sleep_ids.append(app.send_task("bench.sleep", (3,), producer=producer).id)
            for j in range(20):
                i = block * 20 + j
                mark_ids.append(app.send_task("bench.mark", (i, iso.mark_key, iso.redis_url),
                                              producer=producer).id)

    wait_for(lambda: redis_client.hlen(iso.mark_key) >= 20, 15, message="the first 20 marks")
    held = amqp.queue_stats(iso.queue)["messages_unacknowledged"]
    w1.kill()
    marked_at_kill = redis_client.hlen(iso.mark_key)
    print(f"at SIGKILL: {marked_at_kill} marks done, {held} messages unacknowledged just before")
    assert marked_at_kill < 200, "the worker finished before it was killed: nothing tested"
    assert held > 0, "the killed worker held no unacknowledged message: nothing tested"

    # No visibility timeout on RabbitMQ: the dead connection's messages are requeued at once.
    workers.start(concurrency=4, acks_late=True, wait_ready=False)
    wait_for(lambda: redis_client.hlen(iso.mark_key) >= 200, 30, interval=0.2, message="all 200 marks")
    marks = redis_client.hgetall(iso.mark_key)
    assert set(marks) == {str(i).encode() for i in range(200)}
    assert all(int(v) >= 1 for v in marks.values())

    wait_for(lambda: all_succeeded(redis_client, iso, mark_ids + sleep_ids), 20,
             message="every result to be SUCCESS")
    assert [m["result"] for m in fetch_metas(redis_client, iso.prefix, mark_ids)] == list(range(200))
    wait_for(lambda: drained(amqp, iso.queue), 10, interval=0.5, message="the queue to drain")


# ---------------------------------------------------------------- q5. garbage
@pytest.mark.celeriac_only(reason="dead-lettering undecodable messages is celeriac behaviour; "
                                  "Python Celery logs and drops them")
def test_q5_garbage_is_dead_lettered(amqp, workers, iso):
    worker = workers.start()
    dead_letters = amqp.track_queue(f"celeriac.deadletter.{iso.queue}")

    raw = b"\xff not json"
    amqp.publish_raw(iso.queue, raw, content_type="application/json", content_encoding="utf-8",
                     application_headers={"origin": "interop-garbage"}, correlation_id="garbage-1")
    assert amqp.app.send_task("bench.add", (1, 1)).get(timeout=GET_TIMEOUT) == 2

    wait_for(lambda: amqp.queue_exists(dead_letters) and amqp.queue_counts(dead_letters)[0] >= 1,
             GET_TIMEOUT, message=f"a message in {dead_letters}")
    time.sleep(0.3)  # a second (wrong) dead letter would show up now
    letters = amqp.get_all(dead_letters)
    assert len(letters) == 1
    letter = letters[0]
    assert bytes(letter.body) == raw
    headers = letter.headers
    assert headers["x-celeriac-queue"] == iso.queue
    assert isinstance(headers["x-celeriac-reason"], str) and headers["x-celeriac-reason"].strip()
    assert headers["origin"] == "interop-garbage"  # the original headers are kept
    assert letter.properties.get("correlation_id") == "garbage-1"
    assert letter.properties.get("delivery_mode") == 2  # durable queue, persistent message

    # The garbage was settled, not left in flight; the worker goes on.
    wait_for(lambda: drained(amqp, iso.queue), 5, interval=0.5, message="the task queue to be empty")
    assert worker.alive
    assert amqp.app.send_task("bench.add", (2, 2)).get(timeout=GET_TIMEOUT) == 4


# ---------------------------------------------------------- q6. back-pressure
@pytest.mark.celeriac_only(reason="publisher confirms: Python Celery's publisher does not see "
                                  "reject-publish refusals")
def test_q6_publish_into_full_queue_fails(amqp, workers, iso):
    settings = {"task_queues": {iso.queue: {"queue_arguments": {"x-max-length": 3,
                                                                "x-overflow": "reject-publish"}}}}
    ids = [workers.cli_call("bench.add", args=f"[{i}, {i}]", settings=settings) for i in range(3)]
    assert len(set(ids)) == 3

    fourth = workers.cli_run("bench.add", args="[3, 3]", settings=settings)
    assert fourth.returncode != 0, f"the 4th call succeeded:\n{fourth.stdout}\n{fourth.stderr}"
    assert "is full" in fourth.stderr, fourth.stderr
    assert fourth.stdout.strip() == "", f"an id was printed for a task that was not queued: {fourth.stdout!r}"

    assert queue_arguments(amqp, iso.queue) == {"x-max-length": 3, "x-overflow": "reject-publish"}
    assert amqp.queue_counts(iso.queue) == (3, 0)
    waiting = amqp.get_all(iso.queue)
    assert [m.headers["id"] for m in waiting] == ids


# ------------------------------------------------ q7. connection loss, load
@pytest.mark.celeriac_only(reason="checks celeriac's reconnect log line")
def test_q7_connection_loss_under_load(amqp, workers, iso, redis_client):
    n, concurrency, prefetch = 200, 4, 1
    window = concurrency * prefetch  # at most this many messages held when the connection drops
    worker = workers.start(concurrency=concurrency, prefetch=prefetch, acks_late=True)

    app = amqp.app
    with app.producer_or_acquire() as producer:
        ids = [app.send_task("bench.sleep", (0.1,), producer=producer).id for _ in range(n)]

    # A bystander connection: the moment RabbitMQ closes it is the moment of the loss.
    closed = {}
    bystander = amqp_connection()

    def watch():
        try:
            while True:
                bystander.drain_events()
        except Exception as exc:  # noqa: BLE001 - ConnectionForced (320) is what we wait for
            closed["at"] = time.monotonic()
            closed["exc"] = exc

    threading.Thread(target=watch, daemon=True).start()

    def done_count():
        return sum(1 for m in fetch_metas(redis_client, iso.prefix, ids) if m and m["status"] == "SUCCESS")

    wait_for(lambda: done_count() >= 40, 20, message="40 tasks done before the cut")
    closer = subprocess.Popen(["rabbitmqctl", "-q", "close_all_connections", "interop q7: connection loss"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timeline = []  # (monotonic time, tasks done)
    deadline = time.monotonic() + 40
    while True:
        count = done_count()
        timeline.append((time.monotonic(), count))
        if count == n or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    out, _ = closer.communicate(timeout=30)
    assert closer.returncode == 0, out
    assert "at" in closed, "the bystander connection was never closed: close_all_connections did nothing"
    t_close = closed["at"]

    done_at_close = max([c for t, c in timeline if t <= t_close], default=timeline[0][1])
    print(f"{done_at_close} tasks done at the cut; timeline {len(timeline)} samples")
    assert done_at_close < n - window, "the tasks were (nearly) all done before the cut: nothing tested"
    assert done_count() == n, f"only {done_count()} of {n} tasks succeeded after the reconnect"
    # Up to `window` tasks the worker held at the cut may finish without a connection; the next one
    # was delivered on the new one.
    resumed = next((t for t, c in timeline if t > t_close and c > done_at_close + window), None)
    assert resumed is not None
    latency = resumed - t_close
    print(f"consuming again {latency:.2f}s after the connection was closed")
    assert latency < 5, f"the worker took {latency:.2f}s to resume after the connection loss"

    log = worker.log_path.read_text(errors="replace")
    assert re.search(r"lost the RabbitMQ connection", log), worker.log_tail()
    assert re.search(r"reconnected to RabbitMQ", log), worker.log_tail()
    assert worker.alive
    wait_for(lambda: drained(amqp, iso.queue), 10, interval=0.5, message="the queue to drain")


# --------------------------------------------------------------- q8. countdown
def test_q8_countdown_over_amqp(amqp, workers, iso, redis_client):
    workers.start()

    sent_at = datetime.now(timezone.utc)
    result = amqp.app.send_task("bench.mark", (7, iso.mark_key, iso.redis_url), countdown=3)
    assert result.get(timeout=15) == 7
    meta = json.loads(redis_client.get(iso.result_key(result.id)))
    ran_at = parse_date(meta["date_done"])
    print(f"ran {(ran_at - sent_at).total_seconds():.3f}s after sending")
    assert ran_at >= sent_at + timedelta(seconds=3), f"ran at {ran_at}, before send + 3 s ({sent_at})"
    time.sleep(0.5)  # a second execution would land now
    assert redis_client.hgetall(iso.mark_key) == {b"7": b"1"}


# ------------------------------------------------------------ q15. retries
def test_q15_retry_over_amqp(amqp, workers, iso, redis_client):
    workers.start()

    result = amqp.app.send_task("bench.flaky", (2, 0.2))
    assert result.get(timeout=GET_TIMEOUT) == 2
    meta = json.loads(redis_client.get(iso.result_key(result.id)))
    assert meta["status"] == "SUCCESS"
    assert meta["result"] == 2


# ------------------------------------------------------------ q9. celery CLI
def test_q9_celery_inspect_ping_over_amqp(amqp, workers):
    # pyapp turns remote control off for its workers; the Python stand-in needs it on here.
    settings = {"worker_enable_remote_control": True} if workers.kind_under_test == "python" else None
    worker = workers.start(settings=settings)

    done = subprocess.run([sys.executable, "-m", "celery", "-A", "pyapp", "-b", AMQP_URL,
                           "inspect", "ping", "-d", worker.name],
                          env=dict(os.environ, **workers._pyapp_env()), cwd=HERE,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[:2] == [f"->  {worker.name}: OK", "        pong"], done.stdout
    assert "1 node online." in done.stdout

    inspect = amqp.app.control.inspect(destination=[worker.name], timeout=2)
    assert inspect.ping() == {worker.name: {"ok": "pong"}}


# ---------------------------------------------------- q10. argument mismatch
@pytest.mark.celeriac_only(reason="Python Celery's worker logs PRECONDITION_FAILED and retries")
def test_q10_queue_argument_mismatch_stops_the_worker(amqp, workers, iso):
    with amqp.channel() as ch:
        ch.queue_declare(iso.queue, durable=True, auto_delete=False, arguments={"x-max-length": 10})

    started = time.monotonic()
    worker = workers.start(wait_ready=False, settings={
        "task_queues": {iso.queue: {"queue_arguments": {"x-max-length": 20}}}})
    wait_for(lambda: not worker.alive, 10, message="the worker to exit")
    elapsed = time.monotonic() - started
    status = worker.proc.returncode
    assert status > 0, f"exit status {status}: expected a non-zero exit, not a signal"
    assert elapsed < 10

    log = worker.log_path.read_text(errors="replace")
    lines = [line for line in log.splitlines() if "x-max-length" in line]
    assert lines, f"no output line names x-max-length:\n{log}"
    assert any(iso.queue in line and re.search(r"\b10\b", line) and re.search(r"\b20\b", line)
               for line in lines), f"no line names the queue and both values (10 there, 20 asked):\n{log}"
    # The existing queue is left as it was.
    assert queue_arguments(amqp, iso.queue) == {"x-max-length": 10}


# ---------------------------------------------------------------- q11. priority
def test_q11_priority_queue_high_runs_first(amqp, workers, iso, redis_client):
    # The same task_queues entry for the client and the worker: both declare the queue alike.
    queues = {iso.queue: {"queue_arguments": {"x-max-priority": 10}}}
    app = amqp.client(task_queues=queues)
    workers.client_app = app

    key, url = iso.mark_key, iso.redis_url
    low = [app.send_task("bench.mark", (i, key, url), priority=1).id for i in range(5)]
    high = app.send_task("bench.mark", (99, key, url), priority=9).id
    assert queue_arguments(amqp, iso.queue) == {"x-max-priority": 10}
    assert amqp.queue_counts(iso.queue) == (6, 0)

    workers.start(concurrency=1, prefetch=1, settings={"task_queues": queues})
    ids = low + [high]
    wait_for(lambda: all_succeeded(redis_client, iso, ids), 15, message="all 6 marks to succeed")
    metas = fetch_metas(redis_client, iso.prefix, ids)
    order = [tid for _, tid in sorted((parse_date(m["date_done"]), tid) for m, tid in zip(metas, ids))]
    assert order == [high] + low, "expected the priority 9 task first, then the priority 1 tasks in order"


def test_q11b_task_queue_max_priority_applies_to_every_queue(amqp, workers, iso):
    # Celery's task_queue_max_priority sets x-max-priority on every queue it declares, the ones
    # named with -Q included (celery.app.amqp.Queues); a client with the same setting declares
    # them alike, so it can publish to any of them.
    other = f"{iso.queue}.other"
    app = amqp.client(task_queue_max_priority=10)
    workers.client_app = app
    worker = workers.start(queues=[iso.queue, other], settings={"task_queue_max_priority": 10},
                           wait_ready=False)
    consumed = [iso.queue, other, worker.ready_queue]
    wait_for(lambda: all(amqp.queue_exists(q) for q in consumed) or not worker.alive, 15,
             message="the worker to declare its queues")
    assert worker.alive, worker.log_tail()
    assert {q: queue_arguments(amqp, q) for q in consumed} == {q: {"x-max-priority": 10} for q in consumed}

    workers.wait_ready(worker, worker.ready_queue)
    assert app.send_task("bench.add", (1, 2), queue=other, priority=5).get(timeout=GET_TIMEOUT) == 3
    assert app.send_task("bench.add", (2, 2), priority=9).get(timeout=GET_TIMEOUT) == 4


# ------------------------------------------------------- q12. broker restart
def _free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _health(port):
    import urllib.error
    import urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.mark.celeriac_only(reason="/health is celeriac's endpoint")
def test_q12_rabbitmq_restart_under_load(amqp, workers, iso, redis_client):
    n = 150
    port = _free_port()
    worker = workers.start(concurrency=4, prefetch=1, acks_late=True,
                           extra_args=["--metrics-addr", f"127.0.0.1:{port}"])
    assert _health(port) == 200
    app = amqp.app
    with app.producer_or_acquire() as producer:
        ids = [app.send_task("bench.sleep", (0.05,), producer=producer).id for _ in range(n)]

    def done_count():
        return sum(1 for m in fetch_metas(redis_client, iso.prefix, ids) if m and m["status"] == "SUCCESS")

    wait_for(lambda: done_count() >= 20, 20, message="20 tasks done before the restart")
    try:
        out = rabbitmqctl("stop_app")
        down_done = done_count()
        wait_for(lambda: _health(port) == 503, 10, interval=0.2, message="/health to answer 503 while RabbitMQ is down")
        time.sleep(2)
        assert done_count() <= down_done + 4, "tasks completed while the broker was down beyond those held"
    finally:
        rabbitmqctl("start_app")
        rabbitmqctl("await_startup")
    started = time.monotonic()
    wait_for(lambda: _health(port) == 200, 30, interval=0.2, message="/health back to 200 after the restart")
    before = done_count()
    wait_for(lambda: done_count() > before, 30, interval=0.05, message="a task to complete after the restart")
    resumed = time.monotonic() - started
    print(f"consuming again {resumed:.2f}s after RabbitMQ was back")
    assert resumed < 5, f"took {resumed:.2f}s to resume consuming after the restart"
    wait_for(lambda: done_count() == n, 60, interval=0.5, message="every task to complete after the restart")
    log = worker.log_path.read_text(errors="replace")
    assert "reconnected to RabbitMQ" in log, worker.log_tail()
    assert worker.alive
    wait_for(lambda: drained(amqp, iso.queue), 10, interval=0.5, message="the queue to drain")


# ----------------------------------------------------------- q13. events
def test_q13_task_events_over_amqp(amqp, workers, iso):
    app = amqp.app
    seen = []
    with app.connection_for_read() as conn:
        receiver = app.events.Receiver(conn, handlers={"*": seen.append})
        thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False),
                                  daemon=True)
        thread.start()
        try:
            worker = workers.start(settings={"worker_send_task_events": True})
            result = app.send_task("bench.add", (2, 3))
            assert result.get(timeout=GET_TIMEOUT) == 5
            wait_for(lambda: any(e.get("type") == "task-succeeded" and e.get("uuid") == result.id for e in seen),
                     10, interval=0.1, message="task-succeeded through the celeryev exchange")
        finally:
            receiver.should_stop = True
            thread.join(timeout=5)
    mine = [e for e in seen if e.get("uuid") == result.id]
    assert [e["type"] for e in mine] == ["task-received", "task-started", "task-succeeded"], mine
    assert {e["hostname"] for e in mine} == {worker.name}
    received, started, succeeded = mine
    assert received["name"] == "bench.add"
    assert received["args"] == "(2, 3)"
    assert succeeded["result"] == "5"
    assert isinstance(succeeded["runtime"], float)


# ------------------------------------------------- q14. refused callback
@pytest.mark.celeriac_only(reason="Python Celery publishes callbacks without confirms: a refused one is lost silently")
def test_q14_a_refused_callback_fails_its_task(amqp, workers, iso):
    full = f"{iso.queue}.full"
    settings = {"task_queues": {full: {"queue_arguments": {"x-max-length": 1, "x-overflow": "reject-publish"}}}}
    workers.start(settings=settings)
    parked = workers.cli_call("bench.noop", queue=full, settings=settings)  # the one message `full` takes
    from celery import signature
    from kombu.exceptions import OperationalError

    result = amqp.app.send_task("bench.add", (2, 3), link=signature("bench.add", args=(1,), queue=full))
    with pytest.raises(OperationalError) as raised:
        result.get(timeout=GET_TIMEOUT)
    assert "is full" in str(raised.value), str(raised.value)
    assert result.state == "FAILURE"
    # The refused callback did not land anywhere; the queue still holds exactly its one message.
    assert amqp.queue_counts(full) == (1, 0)
    assert [m.headers["id"] for m in amqp.get_all(full)] == [parked]
