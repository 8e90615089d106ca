#!/usr/bin/env python3
"""ETA soak: durable, bounded ETA handling measured end to end (`make bench-eta`).

Three phases, each under its own key prefix on one Redis database, all tasks sent by the real Python
Celery client:

1. memory   N (default 100,000) ``bench.noop`` tasks due in one hour are queued; a celeriac worker
            takes them all. Reported: time to absorb them, worker RSS (current and peak), how many
            are parked in Redis, how many wait in memory. With ``--python-n M`` the same is done for a
            Python Celery worker with M tasks (it holds every ETA task in memory).
2. after-vt 100 ``bench.mark`` tasks due after the visibility timeout (vt 2 s, due in 5 s): each must
            run exactly once.
3. kill     200 ``bench.mark`` due in 4 s (parked) and 100 due in 0.5 s (in memory) are held by a
            worker that is SIGKILLed; a second worker must run every one, the parked ones exactly once.

Prints a table and appends one JSON line to bench-results/eta_soak.jsonl.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "interop"))
from interop_helpers import publish_many, queue_depth, unacked_counts  # noqa: E402


def log(*parts):
    print("[eta-soak]", *parts, file=sys.stderr, flush=True)


def rss_kib(pid):
    """(VmRSS, VmHWM) of a process in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def client(url, prefix):
    app = Celery("eta_soak", broker=url, backend=url)
    app.conf.update(
        broker_transport_options={"global_keyprefix": prefix},
        result_backend_transport_options={"global_keyprefix": prefix},
        task_serializer="json",
        broker_connection_retry_on_startup=True,
    )
    return app


class Worker:
    """A celeriac (or Python Celery) worker in its own process group."""

    def __init__(self, kind, url, prefix, queue, settings, log_dir, name):
        self.log_path = Path(log_dir) / f"{name}.log"
        if kind == "celeriac":
            cfg = Path(log_dir) / f"{name}.toml"
            lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items() if not isinstance(v, dict)]
            lines += ["[broker_transport_options]", f'global_keyprefix = "{prefix}"']
            lines += [f"{k} = {json.dumps(v)}" for k, v in settings.get("broker_transport_options", {}).items()]
            lines += ["[result_backend_transport_options]", f'global_keyprefix = "{prefix}"']
            cfg.write_text("\n".join(lines) + "\n")
            argv = [os.environ["CELERIAC_BIN"], "--broker", url, "--config", str(cfg), "worker", "-Q", queue,
                    "-c", "2", "-n", f"{name}@%h", "--loglevel", "warning"]
            env = dict(os.environ)
            cwd = None
        else:
            argv = [sys.executable, "-m", "celery", "-A", "pyapp", "worker", "-Q", queue, "-c", "2",
                    "--pool", "prefork", "-n", f"{name}@%h", "--loglevel", "WARNING",
                    "--without-mingle", "--without-gossip"]
            env = dict(os.environ, INTEROP_BROKER=url, INTEROP_BACKEND=url, INTEROP_KEYPREFIX=prefix, INTEROP_QUEUE=queue)
            cwd = str(ROOT / "tests" / "interop")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def kill(self, sig=signal.SIGKILL):
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def cleanup(r, prefix):
    keys = list(r.scan_iter(match=f"{prefix}*", count=5000))
    for i in range(0, len(keys), 5000):
        r.delete(*keys[i:i + 5000])


def wait_for(predicate, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise SystemExit(f"timed out after {timeout}s waiting for {what}")


def phase_memory(args, r, kind, n, log_dir):
    prefix, queue = f"soak-{uuid.uuid4().hex[:8]}:", "soak"
    app = client(args.url, prefix)
    t0 = time.time()
    publish_many(app, "bench.noop", (() for _ in range(n)), batch=2000, queue=queue, countdown=3600,
                 ignore_result=True)
    log(f"{kind}: queued {n} tasks due in 1 h in {time.time() - t0:.1f}s")
    w = Worker(kind, args.url, prefix, queue, {}, log_dir, f"soak-{kind}")
    try:
        t1 = time.time()
        if kind == "celeriac":
            wait_for(lambda: queue_depth(r, prefix, queue) == 0 and unacked_counts(r, prefix) == (0, 0)
                     and r.zcard(f"{prefix}celeriac.eta.{queue}") == n, 600, "all tasks parked")
        else:
            wait_for(lambda: queue_depth(r, prefix, queue) == 0 and unacked_counts(r, prefix)[0] == n,
                     1200, "all tasks held")
        absorbed = time.time() - t1
        time.sleep(2)
        rss, peak = rss_kib(w.proc.pid) if kind == "celeriac" else group_rss_kib(w.proc.pid)
        parked = r.zcard(f"{prefix}celeriac.eta.{queue}")
        return {"worker": kind, "tasks": n, "absorb_s": round(absorbed, 2), "rss_mib": round(rss / 1024, 1),
                "peak_rss_mib": round(peak / 1024, 1), "parked_in_redis": parked,
                "held_unacked": unacked_counts(r, prefix)[0]}
    finally:
        w.kill(signal.SIGKILL)
        cleanup(r, prefix)


def group_rss_kib(pid):
    """Sum of VmRSS/VmHWM over a process and its children (prefork pool)."""
    total = peak = 0
    pids = [pid] + [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                                                   text=True).stdout.split()]
    for p in pids:
        try:
            a, b = rss_kib(p)
        except FileNotFoundError:
            continue
        total, peak = total + a, peak + b
    return total, peak


def phase_after_vt(args, r, log_dir):
    prefix, queue = f"soak-{uuid.uuid4().hex[:8]}:", "vt"
    app = client(args.url, prefix)
    mark = f"{prefix}marks"
    settings = {"worker_eta_horizon": 1.0, "broker_transport_options": {"visibility_timeout": 2}}
    w = Worker("celeriac", args.url, prefix, queue, settings, log_dir, "vt")
    try:
        time.sleep(1)
        publish_many(app, "bench.mark", ((i, mark, args.url) for i in range(100)), queue=queue, countdown=5,
                     ignore_result=True)
        wait_for(lambda: r.hlen(mark) == 100, 60, "100 marks")
        time.sleep(5)  # more than two visibility timeouts: any redelivery would show now
        counts = [int(v) for v in r.hgetall(mark).values()]
        return {"tasks": 100, "ran_once": counts.count(1), "ran_twice_or_more": sum(c > 1 for c in counts)}
    finally:
        w.kill(signal.SIGTERM)
        cleanup(r, prefix)


def phase_kill(args, r, log_dir):
    prefix, queue = f"soak-{uuid.uuid4().hex[:8]}:", "kill"
    app = client(args.url, prefix)
    mark = f"{prefix}marks"
    settings = {"worker_eta_horizon": 1.0, "broker_transport_options": {"visibility_timeout": 3}}
    publish_many(app, "bench.mark", ((f"long-{i}", mark, args.url) for i in range(200)), queue=queue,
                 countdown=4, ignore_result=True)
    publish_many(app, "bench.mark", ((f"short-{i}", mark, args.url) for i in range(100)), queue=queue,
                 countdown=1.5, ignore_result=True)
    w1 = Worker("celeriac", args.url, prefix, queue, settings, log_dir, "kill-1")
    time.sleep(1.0)
    held = unacked_counts(r, prefix)[0]
    parked = r.zcard(f"{prefix}celeriac.eta.{queue}")
    w1.kill(signal.SIGKILL)
    log(f"killed the worker holding {held} ETA tasks in memory with {parked} parked")
    w2 = Worker("celeriac", args.url, prefix, queue, settings, log_dir, "kill-2")
    try:
        wait_for(lambda: r.hlen(mark) == 300, 90, "300 marks")
        time.sleep(1)
        counts = {k.decode(): int(v) for k, v in r.hgetall(mark).items()}
        long_counts = [v for k, v in counts.items() if k.startswith("long-")]
        return {"tasks": 300, "held_in_memory_at_kill": held, "parked_at_kill": parked,
                "completed": len(counts), "lost": 300 - len(counts),
                "parked_ran_exactly_once": long_counts.count(1)}
    finally:
        w2.kill(signal.SIGTERM)
        cleanup(r, prefix)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100_000, help="ETA tasks for the memory phase")
    ap.add_argument("--python-n", type=int, default=0, help="also measure Python Celery holding this many")
    ap.add_argument("--url", default="redis://127.0.0.1:6379/11")
    args = ap.parse_args()
    if not os.environ.get("CELERIAC_BIN"):
        raise SystemExit("set CELERIAC_BIN (make bench-eta does)")
    r = redis.Redis.from_url(args.url)
    out_dir = ROOT / "bench-results"
    out_dir.mkdir(exist_ok=True)
    log_dir = tempfile.mkdtemp(prefix="eta-soak-")
    result = {"memory": [phase_memory(args, r, "celeriac", args.n, log_dir)]}
    if args.python_n:
        result["memory"].append(phase_memory(args, r, "python", args.python_n, log_dir))
    result["after_visibility_timeout"] = phase_after_vt(args, r, log_dir)
    result["worker_killed"] = phase_kill(args, r, log_dir)
    print("memory: worker, tasks due in 1 h, seconds to absorb, RSS MiB, peak RSS MiB, parked, held in memory")
    for m in result["memory"]:
        print(f"  {m['worker']:<9} {m['tasks']:>7,} {m['absorb_s']:>7} {m['rss_mib']:>7} {m['peak_rss_mib']:>7}"
              f" {m['parked_in_redis']:>7,} {m['held_unacked']:>7,}")
    v = result["after_visibility_timeout"]
    print(f"due after the visibility timeout: {v['ran_once']}/{v['tasks']} ran exactly once,"
          f" {v['ran_twice_or_more']} more than once")
    k = result["worker_killed"]
    print(f"worker killed holding {k['held_in_memory_at_kill']} in memory + {k['parked_at_kill']} parked:"
          f" {k['completed']}/{k['tasks']} completed, {k['lost']} lost,"
          f" {k['parked_ran_exactly_once']}/200 parked ran exactly once")
    with open(out_dir / "eta_soak.jsonl", "a") as f:
        f.write(json.dumps({"at": time.time(), **result}) + "\n")


if __name__ == "__main__":
    main()
