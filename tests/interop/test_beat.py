"""Interop tests for ``celeriac beat``: the messages it sends are run by a real Python Celery worker, and
two beats on one schedule send each slot once.

celeriac beat is the thing under test here whatever INTEROP_WORKER says; the worker is always Python, to
prove the messages are right for Celery's own worker.
"""
import json
import os
import signal
import subprocess
import time

from conftest import celeriac_bin
from interop_helpers import wait_for


def start_beat(workers, iso, schedule_path, name):
    log = open(workers.log_dir / f"{name}.log", "w")
    argv = [celeriac_bin(), "--broker", iso.redis_url, "--result-backend", iso.redis_url,
            "--config", str(workers._celeriac_client_config()), "--loglevel", "info",
            "beat", "--schedule", str(schedule_path), "--lease", "2"]
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def stop(proc, log):
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)
    log.close()
    return proc.returncode


def test_beat_messages_run_on_a_python_worker_and_two_beats_send_each_slot_once(workers, iso, redis_client):
    workers.start(kind="python")
    mark = f"{iso.prefix}beatmarks"
    schedule = workers.log_dir / "beat.toml"
    schedule.write_text(
        "[beat_schedule.tick]\n"
        'task = "bench.mark"\n'
        "schedule = 1\n"
        f"args = [\"tick\", {json.dumps(mark)}, {json.dumps(iso.redis_url)}]\n"
        'options = { headers = { source = "interop" } }\n'
    )
    first, first_log = start_beat(workers, iso, schedule, "beat-1")
    second, second_log = start_beat(workers, iso, schedule, "beat-2")
    try:
        wait_for(lambda: int(redis_client.hget(mark, "tick") or 0) >= 4, 20, message="4 beat runs")
    finally:
        assert stop(first, first_log) == 0
        assert stop(second, second_log) == 0
    time.sleep(1.5)  # anything still queued runs
    runs = int(redis_client.hget(mark, "tick"))
    sent = int(redis_client.hget(f"{iso.prefix}celeriac.beat.total_run_count", "tick"))
    # Every slot sent (once, by whichever beat led) ran exactly once on the Python worker.
    assert runs == sent
    logs = [(workers.log_dir / f"beat-{i}.log").read_text() for i in (1, 2)]
    sends = [log.count("Sending due task") for log in logs]
    assert sum(sends) == sent, sends
    assert 0 in sends, f"only the leader sends: {sends}"
