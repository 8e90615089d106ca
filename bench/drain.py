#!/usr/bin/env python3
"""drain.py - celeriac's drain benchmark: celeriac vs Python Celery on the same prefilled queue.

For each worker implementation (celeriac, then Python Celery 5.7 prefork), in
the same run and under the same conditions:

1. purge: FLUSHDB the dedicated broker and result dbs (after checking they
   hold nothing but Celery/kombu keys);
2. fill the queue with N ``bench.noop`` tasks through the real Python Celery
   client (one producer connection, kombu ``Producer.batch`` pipelining) and
   report the enqueue rate;
3. start the worker in its own process group and time the drain until every
   result is stored (DBSIZE of the dedicated result db == N, polled);
4. sample the worker's CPU (all processes of its group, from /proc, incl.
   reaped children) and Redis's CPU (``INFO cpu`` delta) at that moment, then
   stop the worker (SIGTERM, SIGKILL after a grace period);
5. read every result back (all must be SUCCESS) and check that the queue and
   the ``unacked`` hash are empty.

It prints a table and the celeriac/python ratios, and appends one JSON line to
``bench-results/drain.jsonl``. ``make bench`` runs it with defaults.

Figures:
  drain_rate   N / (worker launch -> last result stored, as observed): includes
               worker startup
  steady_rate  (N-1) / (first -> last ``date_done``): the worker's own pace
  worker_cpu_us_per_task, redis_cpu_us_per_task, redis_cmds_per_task

The machine is small and shared: compare ratios from the same run, and quote
medians of several runs. Redis CPU counts every client of that Redis server.

Usage:
  bench/drain.py                         # both workers, 50,000 tasks
  bench/drain.py --only python -n 5000   # just the Python baseline
  CELERIAC_BIN=target/release/celeriac bench/drain.py --only celeriac
"""
import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import redis
from celery import Celery

REPO = Path(__file__).resolve().parent.parent
PYAPP_DIR = REPO / "tests" / "interop"  # pyapp.py: the Python side of the bench.* contract
sys.path.insert(0, str(PYAPP_DIR))

from interop_helpers import fetch_metas, publish_many, queue_depth, unacked_counts  # noqa: E402
from pyapp import celery_settings  # noqa: E402

IMPLEMENTATIONS = ("celeriac", "python")
#: key shapes a dedicated bench db may hold; anything else means "not ours, do not flush"
OWN_KEY_PREFIXES = (b"celery-task-meta-", b"_kombu.", b"unacked")


def log(*parts):
    print("[drain]", *parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- processes
def group_cpu_seconds(pgid):
    """utime+stime of every live process in group ``pgid``, plus their reaped children's."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # Fields after the ")" of the command name: state ppid pgrp ... ; utime
        # stime cutime cstime are fields 14-17 of the full line.
        fields = stat[stat.rfind(")") + 2:].split()
        if int(fields[2]) == pgid:
            ticks += sum(int(x) for x in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


class Worker:
    """A worker command running in its own process group."""

    def __init__(self, argv, env, cwd, log_path):
        self.argv = argv
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pgid = self.proc.pid

    def cpu_seconds(self):
        return group_cpu_seconds(self.pgid)

    def stop(self, grace=20.0):
        """SIGTERM the worker, SIGKILL its whole group after ``grace`` seconds (and always at the end)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log("worker ignored SIGTERM; SIGKILL")
        try:
            os.killpg(self.pgid, signal.SIGKILL)  # stray pool children too
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self._log.close()


# ---------------------------------------------------------------------- redis
def redis_cpu_seconds(client):
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def redis_commands(client):
    return client.info("stats")["total_commands_processed"]


def check_dedicated(client, db, queue, force):
    """Exit unless ``db`` holds only keys a bench run could have made (it is about to be FLUSHed)."""
    if force:
        return
    if db == 0:
        sys.exit("drain.py: refusing to FLUSHDB db 0 (shared); pick dedicated dbs or pass --force")
    own = OWN_KEY_PREFIXES + (queue.encode(),)
    for key in client.scan_iter(count=1000):
        if not key.startswith(own):
            sys.exit(f"drain.py: db {db} holds {key!r}, which is not a bench key; pick unused dbs "
                     f"(--broker-db/--backend-db) or pass --force to flush it anyway")


def parse_date_done(value):
    return datetime.fromisoformat(value).timestamp() if value else None


# ------------------------------------------------------------------- one run
def worker_command(impl, args, broker_url, backend_url, node):
    """argv, env and cwd that start implementation ``impl`` on the bench queue."""
    env = dict(os.environ)
    if impl == "celeriac":
        if not args.celeriac_bin:
            sys.exit("drain.py: set CELERIAC_BIN (or --celeriac-bin), or use --only python; `make bench` does this")
        argv = [args.celeriac_bin, "worker", "--broker", broker_url, "--result-backend", backend_url,
                "-Q", args.queue, "-c", str(args.concurrency), "-n", node,
                "--loglevel", args.celeriac_loglevel, *args.celeriac_args.split()]
        return argv, env, REPO
    env.update(INTEROP_BROKER=broker_url, INTEROP_BACKEND=backend_url, INTEROP_KEYPREFIX="",
               INTEROP_ACKS_LATE="0", INTEROP_QUEUE=args.queue)
    env.pop("INTEROP_VISIBILITY_TIMEOUT", None)
    argv = [sys.executable, "-m", "celery", "-A", "pyapp", "worker", "--pool", "prefork",
            "-c", str(args.concurrency), "-Q", args.queue, "-n", node, "--loglevel", "WARNING",
            "--without-mingle", "--without-gossip"]
    return argv, env, PYAPP_DIR


def run_one(impl, args, broker, backend):
    """Purge, fill, drain with ``impl``; return the figures as a dict."""
    broker_url = f"{args.redis_url}/{args.broker_db}"
    backend_url = f"{args.redis_url}/{args.backend_db}"
    n = args.n

    # 1. purge (both dbs are dedicated to the benchmark; checked in main())
    broker.flushdb()
    backend.flushdb()

    # 2. fill through the real Celery client
    app = Celery("drain-client", set_as_current=False)
    app.conf.update(celery_settings(broker=broker_url, backend=backend_url, default_queue=args.queue))
    with app.connection_for_write() as conn:
        conn.ensure_connection()  # connect before the clock starts
    t0 = time.perf_counter()
    ids = publish_many(app, "bench.noop", (() for _ in range(n)), batch=args.batch)
    enqueue_s = time.perf_counter() - t0
    app.close()
    depth = queue_depth(broker, "", args.queue)
    if depth != n:
        raise RuntimeError(f"queue holds {depth} messages after publishing {n}")
    log(f"{impl}: enqueued {n} in {enqueue_s:.2f}s ({n / enqueue_s:,.0f}/s)")

    # 3. drain
    node = f"drain-{impl}@{socket.gethostname()}"
    argv, env, cwd = worker_command(impl, args, broker_url, backend_url, node)
    log_path = args.out.parent / f"drain-{impl}.log"
    log(f"{impl}: starting {' '.join(argv)} (log: {log_path})")
    rcpu0, rcmd0 = redis_cpu_seconds(broker), redis_commands(broker)
    launched_wall = time.time()
    launched = time.perf_counter()
    worker = Worker(argv, env, cwd, log_path)
    stored, error = 0, None
    last_progress, last_count = launched, 0
    try:
        while True:
            stored = backend.dbsize()
            now = time.perf_counter()
            if stored >= n:
                break
            if worker.proc.poll() is not None:
                error = f"worker exited with status {worker.proc.returncode} after {stored}/{n} results"
                break
            if stored != last_count:
                last_progress, last_count = now, stored
            elif now - last_progress > args.stall_timeout:
                error = f"no progress for {args.stall_timeout}s at {stored}/{n} results"
                break
            time.sleep(args.poll)
        drained = time.perf_counter()
        worker_cpu = worker.cpu_seconds()  # before stopping: shutdown costs excluded
        rcpu1, rcmd1 = redis_cpu_seconds(broker), redis_commands(broker)
    finally:
        worker.stop()

    # 4. figures and checks
    drain_s = drained - launched
    metas = fetch_metas(backend, "", ids)
    statuses = {}
    for meta in metas:
        status = meta["status"] if meta else "MISSING"
        statuses[status] = statuses.get(status, 0) + 1
    done = sorted(t for t in (parse_date_done(m.get("date_done")) for m in metas if m) if t)
    result = {
        "impl": impl,
        "cmd": argv,
        "n": n,
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_rate": round(n / enqueue_s, 1),
        "drain_s": round(drain_s, 3),
        "drain_rate": round(stored / drain_s, 1) if drain_s > 0 else None,
        "steady_rate": round((len(done) - 1) / (done[-1] - done[0]), 1) if len(done) > 1 and done[-1] > done[0] else None,
        "startup_s": round(done[0] - launched_wall, 3) if done else None,
        "worker_cpu_s": round(worker_cpu, 3),
        "worker_cpu_us_per_task": round(worker_cpu * 1e6 / n, 1),
        "redis_cpu_s": round(rcpu1 - rcpu0, 3),
        "redis_cpu_us_per_task": round((rcpu1 - rcpu0) * 1e6 / n, 1),
        "redis_cmds_per_task": round((rcmd1 - rcmd0) / n, 2),
        "statuses": statuses,
        "queue_after": queue_depth(broker, "", args.queue),
        "unacked_after": unacked_counts(broker, "")[0],
    }
    if statuses.get("SUCCESS") != n:
        error = error or f"not every result is SUCCESS: {statuses}"
    if error:
        result["error"] = error
        log(f"{impl}: ERROR {error}")
    log(f"{impl}: drained in {drain_s:.2f}s")
    return result


# ------------------------------------------------------------------- report
COLUMNS = [
    ("impl", "worker", "{}"),
    ("n", "tasks", "{:,}"),
    ("enqueue_rate", "enqueue/s", "{:,.0f}"),
    ("drain_s", "drain s", "{:.2f}"),
    ("drain_rate", "tasks/s", "{:,.0f}"),
    ("steady_rate", "steady/s", "{:,.0f}"),
    ("startup_s", "startup s", "{:.2f}"),
    ("worker_cpu_us_per_task", "worker µs/task", "{:,.1f}"),
    ("redis_cpu_us_per_task", "redis µs/task", "{:,.1f}"),
    ("redis_cmds_per_task", "redis cmds/task", "{:.2f}"),
]


def fmt(value, spec):
    return "-" if value is None else spec.format(value)


def print_table(results, ratios):
    rows = [[title for _, title, _ in COLUMNS]]
    for r in results:
        rows.append([fmt(r.get(key), spec) for key, _, spec in COLUMNS])
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    for r in results:
        if "error" in r:
            print(f"!! {r['impl']}: {r['error']}")
    if ratios:
        print("celeriac / python: drain rate x{drain_rate}, steady rate x{steady_rate}, "
              "worker CPU per task x{worker_cpu_per_task}, redis CPU per task x{redis_cpu_per_task}"
              .format(**{k: fmt(v, "{:.2f}") for k, v in ratios.items()}))


def compute_ratios(by_impl):
    """celeriac relative to Python: >1 is better for rates, <1 is better for CPU."""
    c, p = by_impl.get("celeriac"), by_impl.get("python")
    if not c or not p or "error" in c or "error" in p:
        return None

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    return {
        "drain_rate": ratio(c["drain_rate"], p["drain_rate"]),
        "steady_rate": ratio(c["steady_rate"], p["steady_rate"]),
        "worker_cpu_per_task": ratio(c["worker_cpu_us_per_task"], p["worker_cpu_us_per_task"]),
        "redis_cpu_per_task": ratio(c["redis_cpu_us_per_task"], p["redis_cpu_us_per_task"]),
    }


def git_revision():
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50_000, help="tasks per worker run (default 50,000)")
    ap.add_argument("--only", choices=IMPLEMENTATIONS, help="run one implementation only")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="Redis server, without db")
    ap.add_argument("--broker-db", type=int, default=12, help="dedicated broker db, FLUSHed (default 12)")
    ap.add_argument("--backend-db", type=int, default=13, help="dedicated result db, FLUSHed (default 13)")
    ap.add_argument("--queue", default="drain")
    ap.add_argument("-c", "--concurrency", type=int, default=2)
    ap.add_argument("--celeriac-bin", default=os.environ.get("CELERIAC_BIN"), help="default: $CELERIAC_BIN")
    ap.add_argument("--celeriac-args", default="", help="extra arguments for `celeriac worker`")
    ap.add_argument("--celeriac-loglevel", default="warning")
    ap.add_argument("--batch", type=int, default=1000, help="LPUSHes per pipelined round trip when filling")
    ap.add_argument("--poll", type=float, default=0.02, help="result-count poll interval, s")
    ap.add_argument("--stall-timeout", type=float, default=60, help="give up after this long without progress")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "drain.jsonl")
    ap.add_argument("--label", default="")
    ap.add_argument("--force", action="store_true", help="flush the dbs even if they hold foreign keys")
    args = ap.parse_args()
    if args.broker_db == args.backend_db:
        ap.error("--broker-db and --backend-db must differ (results are counted with DBSIZE)")
    if args.n < 2:
        ap.error("-n must be at least 2")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    broker = redis.Redis.from_url(f"{args.redis_url}/{args.broker_db}")
    backend = redis.Redis.from_url(f"{args.redis_url}/{args.backend_db}")
    impls = [args.only] if args.only else list(IMPLEMENTATIONS)

    import celery
    import kombu
    record = {
        "bench": "drain",
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "label": args.label,
        "git": git_revision(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        "redis_server": broker.info("server")["redis_version"],
        "n": args.n,
        "concurrency": args.concurrency,
        "queue": args.queue,
        "broker_db": args.broker_db,
        "backend_db": args.backend_db,
    }
    # Both dbs get FLUSHed: make sure they are the benchmark's before touching anything.
    check_dedicated(broker, args.broker_db, args.queue, args.force)
    check_dedicated(backend, args.backend_db, args.queue, args.force)
    results = []
    try:
        for impl in impls:
            results.append(run_one(impl, args, broker, backend))
    finally:
        # leave nothing behind: 50k results would otherwise sit in Redis for a day
        broker.flushdb()
        backend.flushdb()

    by_impl = {r["impl"]: r for r in results}
    ratios = compute_ratios(by_impl)
    record.update(results=by_impl, ratios=ratios, loadavg_end=os.getloadavg()[0])
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print_table(results, ratios)
    print(f"(appended to {args.out})")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
