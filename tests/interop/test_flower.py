"""Interop tests with the real, unmodified Flower (PyPI ``flower``, pinned in requirements.txt): Flower's
HTTP API and dashboard see a celeriac worker (inspect data, task events, heartbeats) and Flower's
control endpoints (revoke, pool grow/shrink, consumers, shutdown) act on it.

Flower runs as ``celery -A pyapp --broker URL flower`` with the test's pyapp environment (the same
``global_keyprefix`` as the test's workers and client), on a port it picks itself, its log next to the
worker logs (the ``flower`` fixture in conftest.py). ``FLOWER_UNAUTHENTICATED_API=true`` opens its API
without credentials.

Workers are started with task events and heartbeats on (celeriac always sends heartbeats; the
Python stand-in needs ``heartbeat=True`` and remote control, which pyapp turns off by default).
"""
import time

import pytest

from interop_helpers import wait_for

GET_TIMEOUT = 10
N = 5


# ------------------------------------------------------------------- helpers
# The ``flower`` fixture (conftest.py) starts the real Flower and answers with an
# ``interop_helpers.FlowerClient``.
def start_worker(workers, **options):
    """A worker with task events and heartbeats (and, for Python Celery, remote control) on."""
    settings = {"worker_send_task_events": True}
    if workers.kind_under_test == "python":
        settings["worker_enable_remote_control"] = True  # pyapp turns it off for the rest of the suite
    return workers.start(settings=settings, heartbeat=True, **options)


def pool_size(stats):
    """The pool's current size from ``inspect stats``: Celery's prefork pool keeps ``max-concurrency`` at
    the -c it started with and lists one pid per pool process; its gevent/eventlet pools (and celeriac's)
    report the grown or shrunk size as ``max-concurrency``."""
    pool = stats["pool"]
    if pool.get("implementation") == "celery.concurrency.prefork:TaskPool":
        return len(pool["processes"])
    return pool["max-concurrency"]


def start_both(workers, flower, **options):
    """Worker first (its readiness sentinel runs before Flower listens), then Flower; returns once Flower
    has the worker's inspect data and shows it online (a heartbeat reached its event receiver)."""
    worker = start_worker(workers, **options)
    fl = flower()
    fl.wait(lambda: worker.name in fl.get("/api/workers"), 10, "the worker in /api/workers")
    fl.wait(lambda: fl.get("/api/workers", status=1).get(worker.name) is True, 10, "the worker online")
    return worker, fl


# --------------------------------------------------------------------- tests
def test_flower_lists_the_worker_with_its_stats_and_counts(workers, client_app, iso, flower):
    worker, fl = start_both(workers, flower, concurrency=3)

    for listing in (fl.get("/api/workers"), fl.get("/api/workers", refresh=1)):
        info = listing[worker.name]
        assert info["stats"]["pool"]["max-concurrency"] == 3
        assert info["stats"]["prefetch_count"] == 12  # -c 3 x --prefetch-multiplier 4
        assert info["stats"]["pid"] == worker.proc.pid
        assert "bench.add" in info["registered"] and "bench.fail" in info["registered"]
        assert [q["name"] for q in info["active_queues"]] == [iso.queue, f"{iso.queue}.ready.1"]
    assert fl.get("/api/workers", status=1) == {worker.name: True}

    results = [client_app.send_task("bench.add", (i, i)) for i in range(N)]
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == [2 * i for i in range(N)]
    # 'processed' (and 'active') come from the worker's heartbeats: every task it finished, the
    # readiness sentinel too; 'task-received' / 'task-succeeded' count the task events Flower saw
    # (the dashboard's Processed and Succeeded columns), i.e. the N tasks sent after Flower started.
    row = fl.wait(lambda: (r := fl.dashboard_row(worker.name)) and r.get("processed") == N + 1
                  and r.get("task-succeeded") == N and r, 10, f"{N} tasks (+1 sentinel) processed")
    assert row["status"] is True
    assert row["task-received"] == N and row["task-started"] == N and row["task-succeeded"] == N
    assert row.get("task-failed", 0) == 0
    assert row["active"] == 0 and row["freq"] == 2.0 and len(row["loadavg"]) == 3
    assert row["pid"] == worker.proc.pid and row["worker-heartbeat"] >= 1  # online before flower started

    page = fl.get("/workers")
    assert worker.name in page and "Processed" in page
    assert fl.get("/api/workers", refresh=1)[worker.name]["stats"]["total"] == {"bench.add": N, "bench.noop": 1}


def test_flower_worker_page_and_config(workers, client_app, iso, flower):
    worker, fl = start_both(workers, flower)
    assert client_app.send_task("bench.add", (2, 3)).get(timeout=GET_TIMEOUT) == 5
    page = fl.get(f"/worker/{worker.name}")  # inspects the worker, then renders its page
    assert f'<h1 id="workername">{worker.name}</h1>' in page and "bench.add" in page
    # Flower's Config tab: the worker's answer to `inspect conf` (the settings it was given).
    conf = fl.get("/api/workers", refresh=1)[worker.name].get("conf")
    assert conf is not None, "no reply to `inspect conf`"
    assert conf["task_default_queue"] == iso.queue and conf["worker_send_task_events"] is True


def test_flower_shows_tasks_from_task_events(workers, client_app, iso, flower):
    worker, fl = start_both(workers, flower)
    ok = client_app.send_task("bench.add", (2, 3))
    others = [client_app.send_task("bench.add", (i, 10)) for i in range(N - 1)]
    bad = client_app.send_task("bench.fail", ("boom",))
    assert ok.get(timeout=GET_TIMEOUT) == 5
    assert [r.get(timeout=GET_TIMEOUT) for r in others] == [i + 10 for i in range(N - 1)]
    with pytest.raises(ValueError):
        bad.get(timeout=GET_TIMEOUT)
    fl.wait(lambda: fl.task_in(bad.id, "FAILURE") and all(fl.task_in(r.id, "SUCCESS") for r in [ok, *others]),
            10, "every task finished in flower")

    listed = fl.get("/api/tasks")
    assert set(listed) == {ok.id, bad.id, *(r.id for r in others)}
    adds = {tid: t for tid, t in listed.items() if tid != bad.id}
    assert {(t["name"], t["state"], t["worker"]) for t in adds.values()} == {("bench.add", "SUCCESS", worker.name)}
    assert listed[ok.id]["result"] == "5" and listed[ok.id]["args"] == "(2, 3)"
    assert sorted(t["result"] for t in adds.values()) == sorted(["5", *(str(i + 10) for i in range(N - 1))])
    assert list(fl.get("/api/tasks", state="FAILURE")) == [bad.id]
    assert set(fl.get("/api/tasks", taskname="bench.add", workername=worker.name)) == set(adds)
    assert fl.get("/api/task/types") == {"task-types": ["bench.add", "bench.fail"]}

    info = fl.get(f"/api/task/info/{ok.id}")
    assert (info["uuid"], info["name"], info["state"], info["worker"]) == (ok.id, "bench.add", "SUCCESS", worker.name)
    assert (info["args"], info["kwargs"], info["result"], info["retries"]) == ("(2, 3)", "{}", "5", 0)
    assert info["received"] <= info["started"] <= info["succeeded"]
    assert info["received"] > time.time() - 60 and isinstance(info["runtime"], float)
    assert info["exception"] is None and info["eta"] is None

    failed = fl.get(f"/api/task/info/{bad.id}")
    assert (failed["name"], failed["state"], failed["args"]) == ("bench.fail", "FAILURE", "('boom',)")
    assert failed["exception"] == "ValueError('boom')" and "ValueError: boom" in failed["traceback"]
    assert failed["failed"] >= failed["started"] > 0 and failed["result"] is None

    # Flower reads the stored result through the result backend, not the events.
    assert fl.get(f"/api/task/result/{ok.id}") == {"task-id": ok.id, "state": "SUCCESS", "result": 5}


def test_revoke_from_flower_discards_an_eta_task(workers, client_app, iso, flower):
    worker, fl = start_both(workers, flower)
    countdown = 6  # Celery drops a revoked ETA task (task-revoked) only when it comes due
    later = client_app.send_task("bench.add", (2, 3), countdown=countdown)
    sent = time.time()
    received = fl.wait(lambda: fl.task_in(later.id, "RECEIVED"), 5, "the ETA task received")
    assert received["eta"] and received["worker"] == worker.name
    assert fl.post(f"/api/task/revoke/{later.id}") == {"message": f"Revoked '{later.id}'"}
    wait_for(lambda: client_app.AsyncResult(later.id).state == "REVOKED", 3, message="REVOKED stored")
    assert fl.get("/api/workers", refresh=1, workername=worker.name)[worker.name]["revoked"] == [later.id]
    info = fl.wait(lambda: fl.task_in(later.id, "REVOKED"), countdown + 5, "REVOKED in flower")
    assert info["revoked"] > 0 and info["started"] is None and info["result"] is None
    time.sleep(max(0.0, sent + countdown + 1 - time.time()))
    assert client_app.AsyncResult(later.id).state == "REVOKED"  # never ran
    assert fl.task(later.id)["state"] == "REVOKED" and fl.task(later.id)["succeeded"] is None


def test_revoke_terminate_from_flower_stops_a_running_task(workers, client_app, iso, flower):
    worker, fl = start_both(workers, flower)
    running = client_app.send_task("bench.sleep", (30,))
    fl.wait(lambda: fl.task_in(running.id, "STARTED"), 5, "bench.sleep started")
    start = time.monotonic()
    # Flower sends revoke(task_id, terminate=1, signal='SIGTERM'): its strtobool gives 1, not True.
    assert fl.post(f"/api/task/revoke/{running.id}", terminate="true") == {"message": f"Revoked '{running.id}'"}
    wait_for(lambda: client_app.AsyncResult(running.id).state == "REVOKED", 10, message="terminated task REVOKED")
    assert time.monotonic() - start < 10
    info = fl.wait(lambda: fl.task_in(running.id, "REVOKED"), 5, "terminated task REVOKED in flower")
    assert info["revoked"] >= info["started"] > 0 and info["succeeded"] is None
    # The worker keeps working.
    assert client_app.send_task("bench.add", (1, 1)).get(timeout=GET_TIMEOUT) == 2


def test_worker_control_from_flower(workers, client_app, iso, flower):
    worker, fl = start_both(workers, flower, concurrency=2)
    node = worker.name
    pool = lambda: pool_size(fl.get("/api/workers", refresh=1)[node]["stats"])  # noqa: E731

    assert fl.post(f"/api/worker/pool/grow/{node}", n=1) == {"message": f"Growing '{node}' worker's pool by 1"}
    # Celery's prefork pool starts the new process on its next maintenance round (every 5 s).
    fl.wait(lambda: pool() == 3, 12, "the pool grown to 3 in /api/workers?refresh=1")
    # Three slots now: three tasks run at once (each starts before any of them ends).
    sleeps = [client_app.send_task("bench.sleep", (1,)) for _ in range(3)]
    assert [r.get(timeout=GET_TIMEOUT) for r in sleeps] == [None] * 3
    infos = fl.wait(lambda: all(fl.task_in(r.id, "SUCCESS") for r in sleeps) and [fl.task(r.id) for r in sleeps],
                    5, "the sleeps in flower")
    assert max(i["started"] for i in infos) < min(i["succeeded"] for i in infos), infos
    assert fl.post(f"/api/worker/pool/shrink/{node}", n=1) == {"message": f"Shrinking '{node}' worker's pool by 1"}
    fl.wait(lambda: pool() == 2, 12, "the pool shrunk to 2 in /api/workers?refresh=1")

    extra = f"{iso.queue}.extra"
    assert fl.post(f"/api/worker/queue/add-consumer/{node}", queue=extra) == {"message": f"add consumer {extra}"}
    assert extra in [q["name"] for q in fl.get("/api/workers", refresh=1)[node]["active_queues"]]
    assert client_app.send_task("bench.add", (20, 22), queue=extra).get(timeout=GET_TIMEOUT) == 42
    assert fl.post(f"/api/worker/queue/cancel-consumer/{node}", queue=extra) == \
        {"message": f"no longer consuming from {extra}"}
    assert extra not in [q["name"] for q in fl.get("/api/workers", refresh=1)[node]["active_queues"]]

    assert fl.post("/api/task/rate-limit/bench.add", workername=node, ratelimit="100/s") == \
        {"message": "new rate limit set successfully"}
    assert fl.post("/api/task/timeout/bench.slow", workername=node, hard=5, soft=4) == \
        {"message": "time limits set successfully"}

    assert fl.post(f"/api/worker/shutdown/{node}") == {"message": "Shutting down!"}
    wait_for(lambda: not worker.alive, 10, message="the worker to exit after flower's shutdown")
    assert worker.proc.returncode == 0
    # Flower hears worker-offline.
    fl.wait(lambda: fl.get("/api/workers", status=1).get(node) is False, 5, "the worker offline in flower")
