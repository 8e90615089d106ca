"""Interop tests for task semantics: retries, ETA/countdown, expires, time limits,
rate limits, track_started, custom states and autoretry.

Same conventions as test_interop.py: the real Celery 5.7 client drives the
worker under test (``INTEROP_WORKER``) on a private key prefix and queue, and
every assertion is on exact values. The state sequence a task goes through is
read from the result backend's Pub/Sub channel (``MetaWatch``): the worker
PUBLISHes every meta it stores on a channel named like the key, so a
subscription made before the task is sent sees every RETRY / STARTED /
PROGRESS store in order, not only the final one.

    s1   retry until success                     bench.flaky(2, 0.1) -> 2, RETRY x2
    s2   retries exhausted                       MaxRetriesExceededError
    s3   a retry crosses workers (both ways)     celeriac-only
    s4   countdown                               runs once, not before send + 2 s
    s5   ETA beyond the visibility timeout       parked, runs once (celeriac-only)
    s6   SIGKILL while holding ETA tasks         none lost (celeriac-only)
    s7   expires (at ETA and on receipt)         REVOKED, TaskRevokedError
    s8   time limits from the message            soft -> True; hard -> TimeLimitExceeded
    s8b  time limits from the configuration      task_time_limit + annotation
    s9   rate limit per worker                   4/s spreads 12 adds over >= 2 s
    s10  rate limit per cluster                  celeriac-only
    s11  track_started (global and per task)     STARTED {"pid", "hostname"}
    s12  custom state from update_state          PROGRESS {"done", "total"}
    s13  autoretry_for from task_annotations     ValueError after 3 runs
    s13b autoretry with exponential backoff      retry_backoff(_max), retry_jitter
"""
import json
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from celery.exceptions import MaxRetriesExceededError, TaskRevokedError, TimeLimitExceeded

from interop_helpers import fetch_metas, queue_depth, unacked_counts, wait_for

GET_TIMEOUT = 10
READY_STATES = ("SUCCESS", "FAILURE", "REVOKED")
#: Slack for comparing worker-side timestamps with client-side clocks (same
#: host, but date_done is taken after the task ran and stored).
CLOCK_SLACK = timedelta(milliseconds=50)


# ------------------------------------------------------------------- helpers
class MetaWatch:
    """Every meta the worker stores for one task, in order, via the result channel.

    Subscribes (and waits for the confirmation) *before* the task is sent, so
    nothing the worker PUBLISHes can be missed.
    """

    def __init__(self, redis_client, iso, task_id=None):
        self.task_id = task_id or str(uuid.uuid4())
        self.channel = iso.result_key(self.task_id)
        self.pubsub = redis_client.pubsub()
        self.pubsub.subscribe(self.channel)
        confirm = self.pubsub.get_message(timeout=5)
        assert confirm is not None and confirm["type"] == "subscribe", f"no SUBSCRIBE confirmation: {confirm!r}"
        self.metas = []

    def until_ready(self, timeout=GET_TIMEOUT):
        """Read stored metas until one with a ready state; returns all seen so far."""
        deadline = time.monotonic() + timeout
        while not (self.metas and self.metas[-1]["status"] in READY_STATES):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no ready state published on {self.channel} within {timeout}s; "
                                     f"states so far: {self.statuses}")
            msg = self.pubsub.get_message(timeout=min(left, 1.0))
            if msg is not None and msg["type"] == "message":
                self.metas.append(json.loads(msg["data"]))
        return self.metas

    def settle(self, seconds=0.3):
        """Collect whatever else is published during ``seconds`` (a store after the ready one is a bug)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            msg = self.pubsub.get_message(timeout=left)
            if msg is not None and msg["type"] == "message":
                self.metas.append(json.loads(msg["data"]))
        return self.metas

    @property
    def statuses(self):
        return [m["status"] for m in self.metas]

    def close(self):
        self.pubsub.close()


@pytest.fixture
def watch(redis_client, iso):
    """``watch()`` -> a MetaWatch on a fresh task id (pass it as ``task_id=w.task_id``)."""
    opened = []

    def make(task_id=None):
        w = MetaWatch(redis_client, iso, task_id)
        opened.append(w)
        return w

    yield make
    for w in opened:
        w.close()


def get_meta(redis_client, iso, task_id):
    raw = redis_client.get(iso.result_key(task_id))
    return json.loads(raw) if raw is not None else None


def parse_date(text):
    """date_done (ISO-8601, aware) -> aware datetime."""
    assert isinstance(text, str), f"date_done is not a string: {text!r}"
    value = datetime.fromisoformat(text)
    assert value.tzinfo is not None, f"date_done without a timezone: {text!r}"
    return value


def utcnow():
    return datetime.now(timezone.utc)


def exc_dict(meta):
    """The (exc_type, exc_module, exc_message) a FAILURE/RETRY/REVOKED meta carries."""
    result = meta["result"]
    assert isinstance(result, dict), f"exception result is not an object: {meta!r}"
    return result.get("exc_type"), result.get("exc_module"), result.get("exc_message")


#: Where a hard time limit's exception class may be said to live: Python Celery
#: stores billiard's (``celery.exceptions.TimeLimitExceeded`` is that very class,
#: re-exported), celeriac's contract says celery.exceptions; the client rebuilds
#: the same class from either.
TIME_LIMIT_MODULES = ("billiard.exceptions", "celery.exceptions")


def marks(redis_client, iso):
    return {k.decode(): int(v) for k, v in redis_client.hgetall(iso.mark_key).items()}


def mark_args(iso, i):
    return (i, iso.mark_key, iso.redis_url)


def idle(redis_client, iso, queues=None):
    """Nothing waiting in ``queues`` (default: the test queue) and nothing unacked."""
    return (all(queue_depth(redis_client, iso.prefix, q) == 0 for q in (queues or [iso.queue]))
            and unacked_counts(redis_client, iso.prefix) == (0, 0))


# ------------------------------------------------------------ s1. retries
def test_s1_retry_until_success(workers, client_app, watch):
    workers.start()
    w = watch()

    result = client_app.send_task("bench.flaky", (2, 0.1), task_id=w.task_id)
    # 2 = request.retries on the run that succeeded: the retry messages carried
    # the same task id with retries 1, then 2.
    assert result.get(timeout=GET_TIMEOUT) == 2
    assert result.state == "SUCCESS"

    w.until_ready()
    metas = w.settle()
    assert w.statuses == ["RETRY", "RETRY", "SUCCESS"]
    for meta in metas[:2]:
        assert meta["task_id"] == w.task_id
        assert meta["date_done"] is None
    assert metas[2]["result"] == 2
    parse_date(metas[2]["date_done"])


def test_s2_max_retries_exceeded(workers, client_app, watch):
    workers.start()
    w = watch()

    result = client_app.send_task("bench.flaky", (5, 0.05), task_id=w.task_id)
    with pytest.raises(MaxRetriesExceededError):
        result.get(timeout=GET_TIMEOUT)
    assert result.state == "FAILURE"

    # Default max_retries = 3: runs with retries 0, 1, 2 retry; the 4th run's
    # retry() raises MaxRetriesExceededError.
    w.until_ready()
    w.settle()
    assert w.statuses == ["RETRY", "RETRY", "RETRY", "FAILURE"]
    exc_type, exc_module, _ = exc_dict(w.metas[-1])
    assert (exc_type, exc_module) == ("MaxRetriesExceededError", "celery.exceptions")


# ------------------------------------------------- s3. retry across workers
@pytest.mark.celeriac_only(reason="a retry handed between a Python and a celeriac worker needs both kinds")
@pytest.mark.parametrize("order", ["python-first", "tested-first"])
def test_s3_retry_crosses_workers(order, workers, client_app, iso, redis_client, watch):
    first_kind, second_kind = ("python", None) if order == "python-first" else (None, "python")
    first = workers.start(kind=first_kind)
    w = watch()

    sent_at = utcnow()
    result = client_app.send_task("bench.flaky", (1, 3), task_id=w.task_id)
    # Attempt 0 ran on the first worker and published the retry (ETA now + 3 s),
    # which the first worker fetched and holds.
    wait_for(lambda: (get_meta(redis_client, iso, w.task_id) or {}).get("status") == "RETRY", 5,
             message="attempt 0 to store RETRY")

    status = first.terminate(timeout=15)
    assert status == 0, f"{first.kind} warm shutdown exited with status {status}"
    assert get_meta(redis_client, iso, w.task_id)["status"] == "RETRY", "the retry ran before shutdown"
    # Warm shutdown gave the unstarted ETA message back to the queue.
    assert queue_depth(redis_client, iso.prefix, iso.queue) == 1
    assert unacked_counts(redis_client, iso.prefix) == (0, 0)

    workers.start(kind=second_kind)
    assert result.get(timeout=GET_TIMEOUT) == 1  # retries header = 1 on the second worker
    w.until_ready()
    assert w.statuses == ["RETRY", "SUCCESS"]
    assert parse_date(w.metas[-1]["date_done"]) >= sent_at + timedelta(seconds=3) - CLOCK_SLACK
    wait_for(lambda: idle(redis_client, iso), 5, message="queue and unacked to drain")


# ------------------------------------------------------------ s4. countdown
def test_s4_countdown(workers, client_app, iso, redis_client):
    workers.start()

    sent_at = utcnow()
    result = client_app.send_task("bench.mark", mark_args(iso, 1), countdown=2)
    time.sleep(1.5)
    assert marks(redis_client, iso) == {}, "the countdown task ran early"
    assert get_meta(redis_client, iso, result.id) is None

    assert result.get(timeout=GET_TIMEOUT) == 1
    done = parse_date(get_meta(redis_client, iso, result.id)["date_done"])
    assert done >= sent_at + timedelta(seconds=2) - CLOCK_SLACK
    assert done <= sent_at + timedelta(seconds=4), f"ran {done - sent_at} after it was sent (due at 2 s)"
    time.sleep(0.5)
    assert marks(redis_client, iso) == {"1": 1}
    wait_for(lambda: idle(redis_client, iso), 5, message="queue and unacked to drain")


# ------------------------------------------- s5. ETA beyond visibility timeout
@pytest.mark.celeriac_only(reason="worker_eta_horizon (parking far ETAs in Redis) is celeriac's; a Python "
                                  "worker keeps ETA messages unacked and they get redelivered after the "
                                  "visibility timeout")
def test_s5_eta_beyond_visibility_timeout_runs_once(workers, client_app, iso, redis_client):
    config = dict(visibility_timeout=2, settings={"worker_eta_horizon": 1})
    workers.start(**config)

    sent_at = time.monotonic()
    sent_wall = utcnow()
    result = client_app.send_task("bench.mark", mark_args(iso, 1), countdown=5)

    # Between 1 s and 3 s after sending, the message is due later than the
    # horizon: parked in Redis, not held unacked (where it would outlive the
    # 2 s visibility timeout and be restored as a duplicate).
    time.sleep(1.0)
    samples = []
    while time.monotonic() - sent_at < 3.0:
        samples.append(unacked_counts(redis_client, iso.prefix))
        time.sleep(0.1)
    assert samples and all(s == (0, 0) for s in samples), f"unacked while parked: {sorted(set(samples))}"

    # A second worker started now sweeps unacked messages older than the
    # visibility timeout at startup: a far ETA message held unacked would be
    # restored and run twice.
    workers.start(**config)

    assert result.get(timeout=GET_TIMEOUT) == 1
    done = parse_date(get_meta(redis_client, iso, result.id)["date_done"])
    assert done >= sent_wall + timedelta(seconds=5) - CLOCK_SLACK
    assert marks(redis_client, iso) == {"1": 1}
    time.sleep(3.0)  # > visibility timeout: a redelivered copy would have run by now
    assert marks(redis_client, iso) == {"1": 1}
    assert idle(redis_client, iso)


# ---------------------------------------- s6. SIGKILL while holding ETA tasks
@pytest.mark.celeriac_only(reason="worker_eta_horizon (parking far ETAs in Redis) is celeriac's")
def test_s6_killed_worker_loses_no_eta_task(workers, client_app, iso, redis_client):
    vt = 3
    config = dict(concurrency=1, visibility_timeout=vt, settings={"worker_eta_horizon": 1})
    w1 = workers.start(**config)

    long_eta = list(range(50))        # countdown 3 s: beyond the 1 s horizon -> parked
    short_eta = list(range(50, 70))   # countdown 0.5 s: held in memory, unacked
    with client_app.producer_or_acquire() as producer:
        for _ in range(3):            # 1.5 s of work ahead of them on the one slot
            client_app.send_task("bench.sleep", (0.5,), producer=producer)
        for i in long_eta:
            client_app.send_task("bench.mark", mark_args(iso, i), countdown=3, producer=producer,
                                 ignore_result=True)
        for i in short_eta:
            client_app.send_task("bench.mark", mark_args(iso, i), countdown=0.5, producer=producer,
                                 ignore_result=True)

    time.sleep(1.0)
    w1.kill()
    at_kill = marks(redis_client, iso)
    print(f"at SIGKILL: {len(at_kill)} marks done, unacked {unacked_counts(redis_client, iso.prefix)}, "
          f"queued {queue_depth(redis_client, iso.prefix, iso.queue)}")
    assert len(at_kill) < 70, "everything ran before the kill: nothing tested"

    # Held messages are restorable once older than the visibility timeout.
    time.sleep(vt + 1.5)
    workers.start(**config, wait_ready=False)

    wait_for(lambda: redis_client.hlen(iso.mark_key) >= 70, 30, interval=0.2, message="all 70 marks")
    wait_for(lambda: idle(redis_client, iso), 15, message="queue and unacked to drain")
    time.sleep(1.0)  # a duplicate, if any, lands now
    done = marks(redis_client, iso)
    assert set(done) == {str(i) for i in range(70)}
    assert all(n >= 1 for n in done.values())
    duplicated = {i: done[str(i)] for i in long_eta if done[str(i)] != 1}
    assert duplicated == {}, f"parked ETA tasks ran more than once: {duplicated}"


# -------------------------------------------------------------- s7. expires
def test_s7_expires(workers, client_app, iso, redis_client):
    # (a) expired on receipt: the worker only starts after the expiry.
    on_receipt = client_app.send_task("bench.mark", mark_args(iso, 1), expires=1)
    time.sleep(2.0)
    workers.start()
    # (b) expires while waiting for its ETA: checked again when the ETA fires.
    at_eta = client_app.send_task("bench.mark", mark_args(iso, 2), countdown=3, expires=1)

    for result in (on_receipt, at_eta):
        with pytest.raises(TaskRevokedError):
            result.get(timeout=GET_TIMEOUT)
        assert result.state == "REVOKED"
        meta = get_meta(redis_client, iso, result.id)
        assert meta["status"] == "REVOKED"
        assert exc_dict(meta) == ("TaskRevokedError", "celery.exceptions", ["expired"])
        parse_date(meta["date_done"])

    wait_for(lambda: idle(redis_client, iso), 5, message="queue and unacked to drain")
    time.sleep(0.5)
    assert marks(redis_client, iso) == {}, "an expired task ran"


# ---------------------------------------------------------- s8. time limits
def test_s8_time_limits_from_message(workers, client_app, iso, redis_client):
    workers.start(concurrency=1)

    # Soft limit: the task is told at 1 s and returns True on its own.
    started = time.monotonic()
    soft = client_app.send_task("bench.slow", (10,), soft_time_limit=1, time_limit=5)
    assert soft.get(timeout=GET_TIMEOUT) is True
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 3.0, f"soft time limit 1 s: returned after {elapsed:.2f}s"

    # Hard limit only: the task is stopped at 1 s and fails with TimeLimitExceeded;
    # the add queued behind it on the single slot still runs.
    started = time.monotonic()
    hard = client_app.send_task("bench.slow", (10,), time_limit=1)
    after = client_app.send_task("bench.add", (1, 1))
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=GET_TIMEOUT)
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 4.0, f"hard time limit 1 s: failed after {elapsed:.2f}s"
    assert hard.state == "FAILURE"
    exc_type, exc_module, _ = exc_dict(get_meta(redis_client, iso, hard.id))
    assert exc_type == "TimeLimitExceeded" and exc_module in TIME_LIMIT_MODULES, (exc_type, exc_module)

    assert after.get(timeout=GET_TIMEOUT) == 2


def test_s8b_time_limits_from_config(workers, client_app, iso, redis_client):
    workers.start(concurrency=1, settings={"task_time_limit": 2},
                  annotations={"bench.slow": {"soft_time_limit": 1}})

    # Per-task soft limit (annotation) under the global 2 s hard limit.
    started = time.monotonic()
    assert client_app.send_task("bench.slow", (10,)).get(timeout=GET_TIMEOUT) is True
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.0, f"annotated soft time limit 1 s: returned after {elapsed:.2f}s"

    # Global hard limit applies to a task without its own.
    started = time.monotonic()
    hard = client_app.send_task("bench.sleep", (5,))
    with pytest.raises(TimeLimitExceeded):
        hard.get(timeout=GET_TIMEOUT)
    elapsed = time.monotonic() - started
    assert 1.9 <= elapsed < 4.0, f"task_time_limit 2 s: failed after {elapsed:.2f}s"
    exc_type, exc_module, _ = exc_dict(get_meta(redis_client, iso, hard.id))
    assert exc_type == "TimeLimitExceeded" and exc_module in TIME_LIMIT_MODULES, (exc_type, exc_module)

    assert client_app.send_task("bench.add", (2, 2)).get(timeout=GET_TIMEOUT) == 4


# ----------------------------------------------------------- s9. rate limit
def _date_span(metas):
    dates = sorted(parse_date(m["date_done"]) for m in metas)
    return dates, (dates[-1] - dates[0]).total_seconds()


#: 12 tasks at 4/s with a burst of at most 4: the 12th runs >= (12 - 4) / 4 = 2.0 s
#: after the first. The margin absorbs per-task jitter in date_done only; no
#: limit at all gives ~0 s, and s10's per-worker-only limits ~0.6 s.
SPAN_TOLERANCE = 0.1


def test_s9_rate_limit_per_worker(workers, client_app, iso, redis_client):
    workers.start(annotations={"bench.add": {"rate_limit": "4/s"}})

    with client_app.producer_or_acquire() as producer:
        adds = [client_app.send_task("bench.add", (i, i), producer=producer).id for i in range(12)]
        echo = client_app.send_task("bench.echo", ("fast",), producer=producer)

    assert echo.get(timeout=GET_TIMEOUT) == "fast"
    wait_for(lambda: all(m is not None and m["status"] == "SUCCESS"
                         for m in fetch_metas(redis_client, iso.prefix, adds)), 20,
             message="all 12 rate-limited adds")
    metas = fetch_metas(redis_client, iso.prefix, adds)
    assert [m["result"] for m in metas] == [2 * i for i in range(12)]

    dates, span = _date_span(metas)
    print(f"12 adds at 4/s spread over {span:.2f}s")
    assert span >= 2.0 - SPAN_TOLERANCE, f"12 adds at 4/s finished within {span:.2f}s"
    echo_done = parse_date(get_meta(redis_client, iso, echo.id)["date_done"])
    assert echo_done < dates[-1], "bench.echo waited behind the rate-limited adds"


@pytest.mark.celeriac_only(reason="rate_limit_scope = \"cluster\" (a limit shared through Redis) is celeriac's")
def test_s10_rate_limit_cluster_wide(workers, client_app, iso, redis_client):
    annotations = {"bench.add": {"rate_limit": "5/s", "rate_limit_scope": "cluster"}}
    # One queue per worker so that each worker must run its own share: with two
    # per-worker buckets the 8 + 7 adds would finish in ~0.6 s.
    qa, qb = f"{iso.queue}.a", f"{iso.queue}.b"
    workers.start(queues=[qa], annotations=annotations)
    workers.start(queues=[qb], annotations=annotations)

    adds = []
    with client_app.producer_or_acquire() as producer:
        for i in range(15):
            adds.append(client_app.send_task("bench.add", (i, 1), queue=qa if i % 2 == 0 else qb,
                                             producer=producer).id)

    wait_for(lambda: all(m is not None and m["status"] == "SUCCESS"
                         for m in fetch_metas(redis_client, iso.prefix, adds)), 20,
             message="all 15 rate-limited adds")
    metas = fetch_metas(redis_client, iso.prefix, adds)
    assert [m["result"] for m in metas] == [i + 1 for i in range(15)]
    _, span = _date_span(metas)
    print(f"15 adds at 5/s cluster-wide over 2 workers spread over {span:.2f}s")
    assert span >= 2.0 - SPAN_TOLERANCE, f"15 adds at 5/s (cluster) finished within {span:.2f}s"
    # Early acks are applied asynchronously (batched into the next fetch, or within 2 ms): under load the last
    # task's result can be stored a moment before its ack lands.
    wait_for(lambda: idle(redis_client, iso, [qa, qb]), 5, message="every message acked")


# ------------------------------------------------------- s11. track_started
@pytest.mark.parametrize("scope", ["global", "annotation"])
def test_s11_track_started(scope, workers, client_app, iso, redis_client, watch):
    if scope == "global":
        worker = workers.start(settings={"task_track_started": True})
    else:
        worker = workers.start(annotations={"bench.sleep": {"track_started": True}})

    w = watch()
    result = client_app.send_task("bench.sleep", (1.5,), task_id=w.task_id)
    meta = wait_for(lambda: get_meta(redis_client, iso, w.task_id), 3, message="a stored STARTED state")
    assert meta["status"] == "STARTED", meta
    assert meta["date_done"] is None
    started = meta["result"]
    assert set(started) == {"pid", "hostname"}, started
    assert isinstance(started["pid"], int) and not isinstance(started["pid"], bool) and started["pid"] > 0
    assert started["hostname"] == worker.name
    assert result.state == "STARTED"
    assert result.info == started

    assert result.get(timeout=GET_TIMEOUT) is None
    w.until_ready()
    w.settle()
    assert w.statuses == ["STARTED", "SUCCESS"]

    # Another task: STARTED only where tracking is global.
    other = watch()
    assert client_app.send_task("bench.slow", (0.5,), task_id=other.task_id).get(timeout=GET_TIMEOUT) is False
    other.until_ready()
    assert other.statuses == (["STARTED", "SUCCESS"] if scope == "global" else ["SUCCESS"])


# --------------------------------------------------------- s12. progress
def test_s12_progress_state(workers, client_app, watch):
    workers.start()
    w = watch()

    result = client_app.send_task("bench.progress", (4,), task_id=w.task_id)
    seen = []
    deadline = time.monotonic() + GET_TIMEOUT
    while time.monotonic() < deadline:
        state = result.state
        if state in READY_STATES:
            break
        if state == "PROGRESS":
            seen.append(result.info)
        time.sleep(0.05)
    assert result.get(timeout=GET_TIMEOUT) == 4

    progress_infos = [i for i in seen if isinstance(i, dict)]
    assert progress_infos, f"PROGRESS never observed through AsyncResult (seen {seen!r})"
    assert all(set(i) == {"done", "total"} and i["total"] == 4 and 1 <= i["done"] <= 4
               for i in progress_infos), progress_infos
    dones = [i["done"] for i in progress_infos]
    assert dones == sorted(dones)

    w.until_ready()
    w.settle()
    assert w.statuses == ["PROGRESS"] * 4 + ["SUCCESS"]
    assert [m["result"] for m in w.metas[:4]] == [{"done": k, "total": 4} for k in range(1, 5)]
    assert all(m["date_done"] is None for m in w.metas[:4])
    assert w.metas[-1]["result"] == 4


# --------------------------------------------------------- s13. autoretry
def test_s13_autoretry_for(workers, client_app, watch):
    workers.start(annotations={"bench.fail": {
        "autoretry_for": ["ValueError"], "max_retries": 2, "retry_backoff": False, "default_retry_delay": 0.2,
    }})
    w = watch()

    started = time.monotonic()
    result = client_app.send_task("bench.fail", ("x",), task_id=w.task_id)
    with pytest.raises(ValueError) as excinfo:
        result.get(timeout=GET_TIMEOUT)
    elapsed = time.monotonic() - started
    assert type(excinfo.value) is ValueError
    assert excinfo.value.args == ("x",)
    assert result.state == "FAILURE"
    # Two retries 0.2 s apart (default_retry_delay), not the 180 s default.
    assert 0.4 <= elapsed < 3.0, f"3 runs with 0.2 s retry delays took {elapsed:.2f}s"

    w.until_ready()
    w.settle()
    assert w.statuses == ["RETRY", "RETRY", "FAILURE"]  # 3 runs: max_retries = 2
    for meta in w.metas:
        assert exc_dict(meta) == ("ValueError", "builtins", ["x"])
    assert [m["date_done"] is None for m in w.metas] == [True, True, False]


def test_s13b_autoretry_backoff(workers, client_app, watch):
    # retry_backoff = true: countdown 1 * 2**retries -> 1, 2 s; retry_backoff_max
    # caps it at 1 s; retry_jitter = false keeps it exact. So 2 s, not 3 s (no
    # cap) nor 0.2 s (default_retry_delay would be used without backoff).
    workers.start(annotations={"bench.fail": {
        "autoretry_for": ["ValueError"], "max_retries": 2, "retry_backoff": True, "retry_backoff_max": 1,
        "retry_jitter": False, "default_retry_delay": 0.2,
    }})
    w = watch()

    started = time.monotonic()
    result = client_app.send_task("bench.fail", ("y",), task_id=w.task_id)
    with pytest.raises(ValueError):
        result.get(timeout=GET_TIMEOUT)
    elapsed = time.monotonic() - started
    assert 2.0 <= elapsed < 2.9, f"backoff 1 s + 1 s (capped) took {elapsed:.2f}s"
    w.until_ready()
    assert w.statuses == ["RETRY", "RETRY", "FAILURE"]
