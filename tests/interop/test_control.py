"""Interop tests for remote control: Celery's own ``app.control.inspect()`` and the real ``celery inspect``
CLI see a celeriac worker (ping, registered, stats, active_queues, active) and ``enable_events`` toggles it.
"""
import os
import subprocess
import sys

from conftest import HERE
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
    assert [(t["id"], t["name"], t["args"]) for t in active] == [(running.id, "bench.sleep", "(2,)")]
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
