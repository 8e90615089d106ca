"""Redis Sentinel (kombu's ``sentinel://`` transport and result backend): a celeriac worker drains acks_late
``bench.mark`` tasks sent by the Python Celery client through a Sentinel group of the test's own
(``tests/peers/instances.py``: a master, a replica, three sentinels, passwords on both), while the master fails
over mid-way, by ``SENTINEL FAILOVER`` and, separately, by SIGKILL. Executions are counted at a Redis outside
the group (the shared one): none may be lost, every result must be stored on the new master, and duplicates
stay within the prefetch window. Figures go to ``test-artifacts/sentinel.jsonl``.
"""
import json
import sys
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from interop_helpers import Progress, wait_for

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "peers"))
import instances  # noqa: E402

pytestmark = pytest.mark.celeriac_only(reason="celeriac workers following a Sentinel failover")

N = 5000
CONCURRENCY, PREFETCH = 4, 4
RESULTS = HERE.parent.parent / "test-artifacts" / "sentinel.jsonl"


@pytest.fixture
def group():
    g = instances.SentinelGroup()
    yield g
    g.stop()


def marks_through_sentinel(workers, iso, group, name, n):
    """Points the fleet at the group and sends ``n`` ``bench.mark`` tasks counting into ``iso.key(name)``;
    returns (client app, marks key, task ids)."""
    app = sentinel_app(group, iso)
    workers.broker_url = workers.result_backend = group.url()
    workers.client_app = app
    marks = iso.key(name)
    with app.producer_or_acquire() as producer:
        ids = [app.send_task("bench.mark", args=(i, marks, iso.redis_url), queue=iso.queue, producer=producer).id
               for i in range(n)]
    return app, marks, ids


def sentinel_app(group, iso):
    app = Celery(f"sentinel-{iso.tag}", broker=group.url(), backend=group.url(), set_as_current=False)
    opts = group.transport_options()
    app.conf.update(broker_transport_options={**opts, "global_keyprefix": iso.prefix},
                    result_backend_transport_options={**opts, "global_keyprefix": iso.prefix},
                    task_default_queue=iso.queue)
    return app


def drain_through_failover(workers, iso, redis_client, group, fault):
    app, marks, ids = marks_through_sentinel(workers, iso, group, "marks", N)
    wait_for(group.in_sync, 30, interval=0.05, message="the replica to have every task message")
    opts = group.transport_options()
    workers.start(concurrency=CONCURRENCY, prefetch=PREFETCH, acks_late=True, visibility_timeout=20,
                  wait_ready=False, settings={"broker_transport_options": opts,
                                              "result_backend_transport_options": opts})
    wait_for(lambda: redis_client.hlen(marks) >= N // 10, 120, interval=0.01, message="a tenth done")
    old = group.master_port()
    samples = Progress(redis_client, marks)
    time.sleep(0.5)
    at_fault = redis_client.hlen(marks)
    t0 = time.monotonic()
    fault()
    window = CONCURRENCY * PREFETCH
    wait_for(lambda: redis_client.hlen(marks) > at_fault + 4 * window, 120, interval=0.01,
             message="the worker to consume from the new master")
    time.sleep(1.0)
    resumed, stall = samples.stop(t0)
    wait_for(lambda: group.master_port() != old, 30, message="the sentinels to name a new master")
    wait_for(lambda: redis_client.hlen(marks) == N, 300, interval=0.1, message="every task executed")
    master = group.master()
    keys = [iso.result_key(i) for i in ids]

    def stored():
        return sum(master.exists(*keys[j:j + 1000]) for j in range(0, N, 1000))

    wait_for(lambda: stored() == N, 120, interval=0.2, message="every result stored on the new master")
    metas = [json.loads(v) for j in range(0, N, 1000) for v in master.mget(keys[j:j + 1000])]
    counts = {int(k): int(v) for k, v in redis_client.hgetall(marks).items()}
    lost = N - len(counts)
    failed = sum(1 for m in metas if m["status"] != "SUCCESS")
    dups = sum(c - 1 for c in counts.values() if c > 1)
    line = {"fault": fault.__name__, "tasks": N, "executed_at_fault": at_fault, "lost": lost, "failed": failed,
            "duplicates": dups, "window": window, "consuming_again_s": round(resumed, 2),
            "longest_stall_s": round(stall, 2)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"\nsentinel: {line}")
    assert (lost, failed) == (0, 0)
    assert dups <= window, line
    # The Python client reads a result through Sentinel too.
    assert app.AsyncResult(ids[-1]).get(timeout=30) == N - 1
    app.close()


def test_s1_sentinel_failover_command(workers, iso, redis_client, group):
    def sentinel_failover():
        group.failover()
    drain_through_failover(workers, iso, redis_client, group, sentinel_failover)


def test_s2_master_sigkill(workers, iso, redis_client, group):
    def master_sigkill():
        group.kill_master()
    drain_through_failover(workers, iso, redis_client, group, master_sigkill)


def test_s3_unknown_master_name_is_a_clear_error(workers, iso, group):
    """A wrong ``master_name`` stops the worker at start with the reason, instead of waiting forever."""
    workers.broker_url = workers.result_backend = group.url()
    w = workers.start(wait_ready=False, settings={
        "broker_transport_options": {"master_name": "nope", "sentinel_kwargs": {"password": group.sentinel_password}}})
    wait_for(lambda: not w.alive, 30, message="the worker to give up")
    assert 'names a master "nope"' in w.log_tail()


def test_s4_python_and_celeriac_workers_share_the_queue(workers, iso, redis_client, group):
    """A Python Celery worker and a celeriac worker consume one queue through the same Sentinel group: each
    task runs exactly once, both kinds take a share, and every result is stored on the master."""
    n = 1000
    app, marks, ids = marks_through_sentinel(workers, iso, group, "shared", n)
    opts = group.transport_options()
    settings = {"broker_transport_options": opts, "result_backend_transport_options": opts}
    workers.start(kind="python", concurrency=2, acks_late=True, wait_ready=False, settings=settings)

    def python_share():
        return sum(int(v) for v in redis_client.hgetall(f"{marks}:workers").values())

    # The Python worker takes longer to start: the celeriac one joins once it is consuming.
    wait_for(lambda: python_share() >= 10, 60, interval=0.05, message="the Python worker to consume")
    workers.start(kind="celeriac", concurrency=2, acks_late=True, wait_ready=False, settings=settings)
    wait_for(lambda: redis_client.hlen(marks) == n, 180, interval=0.1, message="every task executed")
    counts = {int(k): int(v) for k, v in redis_client.hgetall(marks).items()}
    python_share = python_share()
    assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}
    assert 0 < python_share < n, python_share
    master = group.master()
    keys = [iso.result_key(i) for i in ids]
    wait_for(lambda: master.exists(*keys) == n, 60, interval=0.2, message="every result stored")
    assert [app.AsyncResult(i).get(timeout=30) for i in ids[:3]] == [0, 1, 2]
    app.close()


def test_s5_beat_follows_the_failover(workers, iso, redis_client, group):
    """``celeriac beat`` keeps its lease and sends through Sentinel; after ``SENTINEL FAILOVER`` it goes on
    sending on the new master, and a celeriac worker (also through Sentinel) runs what it sends."""
    import os
    import signal
    import subprocess
    from conftest import celeriac_bin, write_celeriac_config

    app = sentinel_app(group, iso)
    workers.broker_url = workers.result_backend = group.url()
    workers.client_app = app
    opts = group.transport_options()
    settings = {"broker_transport_options": opts, "result_backend_transport_options": opts}
    workers.start(concurrency=2, wait_ready=False, settings=settings)
    mark = iso.key("beatmarks")
    schedule = workers.log_dir / "beat.toml"
    schedule.write_text("[beat_schedule.tick]\n" 'task = "bench.mark"\n' "schedule = 1\n"
                        f"args = [\"tick\", {json.dumps(mark)}, {json.dumps(iso.redis_url)}]\n"
                        f"options = {{ queue = {json.dumps(iso.queue)} }}\n")
    config = write_celeriac_config(workers.log_dir / "beat-config.toml", iso.prefix, settings=settings)
    log = open(workers.log_dir / "beat.log", "w")
    beat = subprocess.Popen([celeriac_bin(), "--broker", group.url(), "--result-backend", group.url(),
                             "--config", str(config), "--loglevel", "info", "beat", "--schedule", str(schedule),
                             "--lease", "2"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def ticks():
        return int(redis_client.hget(mark, "tick") or 0)

    try:
        wait_for(lambda: ticks() >= 3, 30, message="3 beat runs before the failover")
        old = group.master_port()
        group.failover()
        wait_for(lambda: group.master_port() != old, 30, message="the sentinels to name a new master")
        at_switch = ticks()
        wait_for(lambda: ticks() >= at_switch + 3, 30, message="3 beat runs after the failover")
        assert group.master().exists(f"{iso.prefix}celeriac.beat.leader") == 1
    finally:
        os.killpg(beat.pid, signal.SIGTERM)
        assert beat.wait(timeout=20) == 0
        log.close()
    app.close()
