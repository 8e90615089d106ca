"""Interop tests for remote control: Celery's own ``app.control.inspect()`` and the real ``celery inspect``
CLI see a celeriac worker (ping, registered, stats, active_queues, active) and ``enable_events`` toggles it.
"""
import json
import os
import time
import subprocess
import sys

from conftest import HERE, celeriac_bin
from interop_helpers import wait_for


def test_celery_inspect_sees_a_celeriac_worker(workers, client_app, iso):
    worker = workers.start()
    inspect = client_app.control.inspect(destination=[worker.name], timeout=2)
    assert inspect.ping() == {worker.name: {"ok": "pong"}}

    registered = inspect.registered()[worker.name]
    assert "bench.add" in registered and "bench.mark" in registered
    assert registered == sorted(registered)
    assert not any(name.startswith("celery.") for name in registered)

    queues = [q["name"] for q in inspect.active_queues()[worker.name]]
    assert queues[0] == iso.queue

    running = client_app.send_task("bench.sleep", (2,))
    active = wait_for(lambda: inspect.active()[worker.name], 5, message="the sleeping task in inspect active")
    # Celery's Request.info(safe=False): the decoded args, not their repr.
    assert [(t["id"], t["name"], t["args"], t["kwargs"]) for t in active] == [(running.id, "bench.sleep", [2], {})]
    assert active[0]["acknowledged"] is True and active[0]["worker_pid"] > 0
    assert active[0]["hostname"] == worker.name and active[0]["time_start"] > 0
    running.get(timeout=10)

    stats = inspect.stats()[worker.name]
    assert stats["total"]["bench.sleep"] == 1
    assert stats["pool"]["max-concurrency"] == 2 and stats["prefetch_count"] == 8
    assert isinstance(stats["clock"], str) and stats["pid"] > 0

    control = client_app.control.broadcast("enable_events", destination=[worker.name], reply=True, timeout=2)
    assert control == [{worker.name: {"ok": "task events enabled"}}]

    # The unmodified celery CLI.
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "pyapp", "inspect", "ping", "-d", worker.name],
                          env=dict(os.environ, **workers._pyapp_env()), cwd=HERE, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[:2] == [f"->  {worker.name}: OK", "        pong"], done.stdout
    assert "1 node online." in done.stdout


def test_inspect_reserved_scheduled_and_query_task(workers, client_app, iso):
    worker = workers.start(kind="celeriac", concurrency=1)
    inspect = client_app.control.inspect(destination=[worker.name], timeout=2)
    running = client_app.send_task("bench.sleep", (3,))
    wait_for(lambda: inspect.active()[worker.name], 5, message="the sleeping task in inspect active")
    waiting = client_app.send_task("bench.add", (1, 1))
    later = client_app.send_task("bench.add", (9, 9), countdown=30)

    reserved = wait_for(lambda: inspect.reserved()[worker.name], 5, message="a reserved task")
    assert [(t["id"], t["name"], t["args"], t["time_start"], t["acknowledged"], t["worker_pid"]) for t in reserved] \
        == [(waiting.id, "bench.add", [1, 1], None, False, None)]
    assert reserved[0]["delivery_info"] == {"exchange": "", "routing_key": iso.queue, "priority": 0,
                                            "redelivered": False}
    scheduled = wait_for(lambda: inspect.scheduled()[worker.name], 5, message="a scheduled task")
    assert len(scheduled) == 1 and scheduled[0]["priority"] == 6
    assert scheduled[0]["request"]["id"] == later.id and scheduled[0]["request"]["args"] == [9, 9]
    assert scheduled[0]["eta"].endswith("+00:00") and scheduled[0]["request"]["time_start"] is None

    states = inspect.query_task(running.id, waiting.id, later.id)[worker.name]
    assert {k: v[0] for k, v in states.items()} == {running.id: "active", waiting.id: "reserved",
                                                     later.id: "scheduled"}
    assert waiting.get(timeout=10) == 2
    assert inspect.reserved()[worker.name] == []
    client_app.control.revoke(later.id, destination=[worker.name], reply=True, timeout=2)


def test_revokes_persist_across_restarts_and_terminate_running_tasks(workers, client_app, iso, redis_client):
    mark = f"{iso.prefix}revoked-marks"
    worker = workers.start(kind="celeriac")
    later = client_app.send_task("bench.mark", ("later", mark, iso.redis_url), countdown=4)
    wait_for(lambda: redis_client.exists(f"{iso.prefix}unacked") or redis_client.exists(f"{iso.prefix}celeriac.eta.{iso.queue}"),
             5, message="the ETA task held by the worker")
    replies = client_app.control.revoke(later.id, destination=[worker.name], reply=True, timeout=2)
    assert replies == [{worker.name: {"ok": f"tasks {{'{later.id}'}} flagged as revoked"}}]
    # Restart: the new worker learns the revoke from the broker (Celery keeps revokes in memory only).
    assert worker.terminate() == 0
    second = workers.start(kind="celeriac")
    assert client_app.control.inspect(destination=[second.name], timeout=2).revoked()[second.name] == [later.id]
    meta = wait_for(lambda: (m := client_app.backend.get_task_meta(later.id))["status"] == "REVOKED" and m, 10,
                    message="REVOKED stored")
    assert meta["result"].args == ("revoked",)
    time.sleep(4.5)  # past the ETA: the task must never run
    assert redis_client.hget(mark, "later") is None

    # terminate=True stops a running task; the worker keeps going.
    running = client_app.send_task("bench.sleep", (30,))
    wait_for(lambda: client_app.control.inspect(destination=[second.name], timeout=1).active()[second.name],
             5, message="the task running")
    replies = client_app.control.revoke(running.id, terminate=True, destination=[second.name], reply=True, timeout=2)
    assert replies == [{second.name: {"ok": f"terminate: {running.id}"}}]
    meta = wait_for(lambda: (m := client_app.backend.get_task_meta(running.id))["status"] == "REVOKED" and m, 5,
                    message="REVOKED terminated")
    assert meta["result"].args == ("terminated",)
    assert client_app.send_task("bench.add", (1, 1)).get(timeout=10) == 2


def test_control_commands_change_the_running_worker(workers, client_app, iso, redis_client):
    worker = workers.start(kind="celeriac", concurrency=1)
    me = [worker.name]
    control = client_app.control

    def one(method, **arguments):
        replies = control.broadcast(method, arguments=arguments, destination=me, reply=True, timeout=2)
        assert len(replies) == 1, replies
        return replies[0][worker.name]

    assert one("pool_grow", n=2) == {"ok": "pool will grow"}
    inspect = control.inspect(destination=me, timeout=2)
    assert inspect.stats()[worker.name]["pool"]["max-concurrency"] == 3
    assert one("pool_shrink", n=1) == {"ok": "pool will shrink"}
    assert inspect.stats()[worker.name]["pool"]["max-concurrency"] == 2

    extra = f"{iso.queue}.extra"
    assert one("add_consumer", queue=extra, exchange=None, exchange_type="direct", routing_key=None) == \
        {"ok": f"add consumer {extra}"}
    assert extra in [q["name"] for q in inspect.active_queues()[worker.name]]
    assert client_app.send_task("bench.add", (20, 22), queue=extra).get(timeout=10) == 42
    # The reply comes once no fetch of the worker can take from `extra` any more: what is sent now stays.
    assert one("cancel_consumer", queue=extra) == {"ok": f"no longer consuming from {extra}"}
    stays = client_app.send_task("bench.add", (1, 1), queue=extra)
    time.sleep(1.5)  # a fetch that still took from `extra` would have run it by now
    assert redis_client.llen(iso.queue_key(extra)) == 1 and stays.state == "PENDING"

    assert one("time_limit", task_name="bench.slow", hard=1, soft=None) == {"ok": "time limits set successfully"}
    slow = client_app.send_task("bench.slow", (10,))
    meta = wait_for(lambda: (m := client_app.backend.get_task_meta(slow.id))["status"] == "FAILURE" and m, 8,
                    message="the hard limit set at runtime")
    assert type(meta["result"]).__name__ == "TimeLimitExceeded"

    assert one("rate_limit", task_name="bench.add", rate_limit="2/s") == {"ok": "new rate limit set successfully"}
    start = time.time()
    results = [client_app.send_task("bench.add", (i, i)) for i in range(5)]
    assert [r.get(timeout=10) for r in results] == [0, 2, 4, 6, 8]
    assert time.time() - start >= 1.8  # 5 tasks at 2/s: at least 2 s after the first
    assert one("rate_limit", task_name="nope", rate_limit="1/s") == {"error": "unknown task \"nope\""}

    assert control.broadcast("shutdown", destination=me, reply=True, timeout=1) == []
    wait_for(lambda: not worker.alive, 10, message="the worker to exit")
    assert worker.proc.returncode == 0


def test_celeriac_inspect_and_control_print_like_celery(workers, iso):
    worker = workers.start(kind="celeriac")
    ours = [celeriac_bin(), "--broker", iso.redis_url, "--result-backend", iso.redis_url,
            "--config", str(workers._celeriac_client_config())]
    run = lambda argv, **kw: subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw)  # noqa: E731
    mine = run(ours + ["inspect", "ping", "-d", worker.name])
    celery = run([sys.executable, "-m", "celery", "-A", "pyapp", "inspect", "ping", "-d", worker.name],
                 env=dict(os.environ, **workers._pyapp_env()), cwd=HERE)
    assert mine.returncode == celery.returncode == 0
    assert mine.stdout == celery.stdout

    stats = json.loads(run(ours + ["inspect", "stats", "-d", worker.name, "--json"]).stdout)
    assert stats[worker.name]["pool"]["max-concurrency"] == 2
    ctl = run(ours + ["control", "rate_limit", "bench.add", "5/s", "-d", worker.name])
    assert ctl.stdout.splitlines()[:2] == [f"->  {worker.name}: OK", "        new rate limit set successfully"]
    nobody = run(ours + ["inspect", "ping", "-d", "nobody@nowhere"])
    assert nobody.returncode == 1 and "No nodes replied" in nobody.stderr
