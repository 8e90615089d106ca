#!/usr/bin/env python3
"""drain.py - celeriac's drain benchmark: celeriac vs Python Celery on the same prefilled queue.

For each broker (Redis, then RabbitMQ; ``--broker``) and each worker
implementation (celeriac, then Python Celery 5.7 prefork), in the same run and
under the same conditions (same concurrency and prefetch multiplier, results
in the same dedicated Redis db):

1. purge: FLUSHDB the dedicated result db (and, on Redis, the broker db) after
   checking they hold nothing but Celery/kombu keys; on RabbitMQ, delete the
   dedicated bench queue (refused if something else consumes from it);
2. fill the queue with N ``bench.noop`` tasks through the real Python Celery
   client (one producer connection; kombu ``Producer.batch`` pipelining on
   Redis, plain pyamqp publishes without confirms on RabbitMQ, the clock
   stopping once the queue holds all N) and report the enqueue rate;
3. start the worker in its own process group and time the drain until every
   result is stored (DBSIZE of the dedicated result db == N, polled);
4. sample the worker's CPU (all processes of its group, from /proc, incl.
   reaped children) and the broker's CPU at that moment (Redis: ``INFO cpu``
   delta; RabbitMQ: the server's beam.smp utime+stime delta from /proc), then
   stop the worker (SIGTERM, SIGKILL after a grace period);
5. read every result back (all must be SUCCESS) and check that the queue is
   empty: Redis, the list and the ``unacked`` hash; RabbitMQ, messages ready
   and unacknowledged (rabbitmqctl, else a passive declare) and no dead letters.

The same drain runs a second time over Redis with ``task_ignore_result`` on
both workers (``redis-ignore-result``): no result is stored, and the drain ends
when the queue and ``unacked`` are empty (both workers acknowledge before
running, Celery's default).

Latency mode (``latency``): each worker in turn is started on an empty Redis
queue, and the Python client sends ``bench.noop`` at a fixed rate (200/s for
15 s by default; one producer held, no SUBSCRIBE per task, as the shared
yardstick sends). Three latencies per task (bench/fixed_rate.py), the first
second not counted: from ``send_task`` to the result's PUBLISH heard by a
listener; from ``send_task`` to the ``date_done`` the worker wrote (the shared
yardstick's definition); and from ``send_task``'s return (the message is in
Redis) to ``date_done``: the worker alone, without the client's ~0.6 ms of
``send_task``. It also reports start to first result (one task queued before
the worker is launched; launch to its result read by the client) and the idle
RSS (every process of the worker's group, one second after that first task).

It prints one table per scenario with the celeriac/python ratios, and appends
one JSON line per scenario (``"broker": "redis"`` / ``"redis-ignore-result"`` /
``"amqp"`` / ``"redis-latency"``) to ``bench-results/drain.jsonl``.
``make bench`` runs it with defaults (every scenario).

Figures:
  drain_rate   N / (worker launch -> last result stored, as observed): includes
               worker startup
  steady_rate  (N-1) / (first -> last ``date_done``): the worker's own pace
  worker_cpu_us_per_task
  Redis broker:    redis_cpu_us_per_task, redis_cmds_per_task (broker and results:
                   one Redis server)
  RabbitMQ broker: rabbitmq_cpu_us_per_task (beam.smp), and the result store's
                   results_redis_cpu_us_per_task, results_redis_cmds_per_task

The machine is small and shared: compare ratios from the same run, and quote
medians of several runs. Redis and RabbitMQ CPU count every client of those
servers.

Usage:
  bench/drain.py                         # every scenario, both workers, 50,000 tasks each
  bench/drain.py --broker redis          # the Redis drain with results only
  bench/drain.py --broker latency --latency-rate 200   # the latency mode only
  bench/drain.py --broker amqp -n 2000   # RabbitMQ only, 2,000 tasks
  bench/drain.py --only python -n 5000   # just the Python baseline
  CELERIAC_BIN=target/release/celeriac bench/drain.py --only celeriac
"""
import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import redis
from celery import Celery

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "interop"))
sys.path.insert(0, str(REPO / "bench"))

from interop_helpers import fetch_metas, publish_many  # noqa: E402
from pyapp import celery_settings  # noqa: E402
from drainlib import (Worker, check_dedicated, fmt, log, parse_date_done,  # noqa: E402
                      print_rows, redact, worker_command)
from drain_brokers import AmqpBroker, RedisBroker, RedisIgnoreResultBroker  # noqa: E402
from latency_mode import run_latency_mode  # noqa: E402

IMPLEMENTATIONS = ("celeriac", "python")
BROKERS = ("redis", "redis-ignore-result", "amqp")
#: what ``--broker`` runs: each drain, the latency mode, or groups of them
SCENARIOS = BROKERS + ("latency", "both", "all")
#: queues celeriac declares with x-max-length (back-pressure): a drain of 50,000 would be refused
AMQP_RESERVED_QUEUES = ("realtime", "bulk")


# ------------------------------------------------------------------- one run
def run_one(impl, args, broker, backend):
    """Purge, fill, drain with ``impl`` over ``broker``; return the figures as a dict."""
    backend_url = f"{args.redis_url}/{args.backend_db}"
    n = broker.n
    tag = f"{broker.name}/{impl}"

    # 1. purge (the dbs and the queue are dedicated to the benchmark; checked in main())
    broker.purge()
    backend.flushdb()

    # 2. fill through the real Celery client
    app = Celery("drain-client", set_as_current=False)
    app.conf.update(celery_settings(broker=broker.url, backend=backend_url, default_queue=broker.queue))
    with app.connection_for_write() as conn:
        conn.ensure_connection()  # connect before the clock starts
    broker.prepare_client(app)
    t0 = time.perf_counter()
    ids = publish_many(app, "bench.noop", (() for _ in range(n)), batch=broker.publish_batch())
    broker.wait_filled(n)
    enqueue_s = time.perf_counter() - t0
    app.close()
    log(f"{tag}: enqueued {n} in {enqueue_s:.2f}s ({n / enqueue_s:,.0f}/s)")

    # 3. drain
    node = f"drain-{impl}@{socket.gethostname()}"
    ignore = getattr(broker, "ignore_result", False)
    argv, env, cwd = worker_command(impl, args, broker.url, backend_url, broker.queue, node, ignore)
    log_path = args.out.parent / f"{broker.log_prefix}-{impl}.log"
    log(f"{tag}: starting {' '.join(redact(a) for a in argv)} (log: {log_path})")
    sample0 = broker.sample()
    launched_wall = time.time()
    launched = time.perf_counter()
    worker = Worker(argv, env, cwd, log_path)
    stored, error = 0, None
    last_progress, last_count = launched, 0
    try:
        while True:
            stored = n - broker.outstanding() if ignore else backend.dbsize()
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
        sample1 = broker.sample()
    finally:
        worker.stop()

    # 4. figures and checks
    drain_s = drained - launched
    if ignore:
        metas = []
        stray = backend.dbsize()
        statuses = {"IGNORED": n - stray, "STORED": stray} if stray else {"IGNORED": n}
    else:
        metas = fetch_metas(backend, "", ids)
        statuses = {}
        for meta in metas:
            status = meta["status"] if meta else "MISSING"
            statuses[status] = statuses.get(status, 0) + 1
    done = sorted(t for t in (parse_date_done(m.get("date_done")) for m in metas if m) if t)
    result = {
        "impl": impl,
        "broker": broker.name,
        "cmd": [redact(a) for a in argv],
        "n": n,
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_rate": round(n / enqueue_s, 1),
        "drain_s": round(drain_s, 3),
        "drain_rate": round(stored / drain_s, 1) if drain_s > 0 else None,
        "steady_rate": round((len(done) - 1) / (done[-1] - done[0]), 1) if len(done) > 1 and done[-1] > done[0] else None,
        "startup_s": round(done[0] - launched_wall, 3) if done else None,
        "worker_cpu_s": round(worker_cpu, 3),
        "worker_cpu_us_per_task": round(worker_cpu * 1e6 / n, 1),
        **broker.figures(sample0, sample1, n),
        "statuses": statuses,
    }
    leftovers, leftover_error = broker.checks()
    result.update(leftovers)
    if ignore and statuses.get("IGNORED") != n:
        error = error or f"results were stored despite task_ignore_result: {statuses}"
    elif not ignore and statuses.get("SUCCESS") != n:
        error = error or f"not every result is SUCCESS: {statuses}"
    error = error or leftover_error
    if error:
        result["error"] = error
        log(f"{tag}: ERROR {error}")
    log(f"{tag}: drained in {drain_s:.2f}s")
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
]


def print_table(broker, results, ratios):
    print_rows(COLUMNS + broker.columns, results)
    if ratios:
        parts = [f"drain rate x{fmt(ratios['drain_rate'], '{:.2f}')}",
                 f"steady rate x{fmt(ratios['steady_rate'], '{:.2f}')}",
                 f"worker CPU per task x{fmt(ratios['worker_cpu_per_task'], '{:.2f}')}"]
        parts += [f"{title} x{fmt(ratios[key], '{:.2f}')}" for key, _, title in broker.ratio_keys]
        print("celeriac / python: " + ", ".join(parts))


def compute_ratios(broker, by_impl):
    """celeriac relative to Python: >1 is better for rates, <1 is better for CPU."""
    c, p = by_impl.get("celeriac"), by_impl.get("python")
    if not c or not p or "error" in c or "error" in p:
        return None

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    ratios = {
        "drain_rate": ratio(c["drain_rate"], p["drain_rate"]),
        "steady_rate": ratio(c["steady_rate"], p["steady_rate"]),
        "worker_cpu_per_task": ratio(c["worker_cpu_us_per_task"], p["worker_cpu_us_per_task"]),
    }
    for key, figure, _ in broker.ratio_keys:
        ratios[key] = ratio(c.get(figure), p.get(figure))
    return ratios


def git_revision():
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_broker(broker, impls, args, backend, common):
    """Run every implementation over ``broker``; append its JSON line; print its table. Returns the results."""
    import celery
    import kombu
    record = {
        "bench": "drain",
        "broker": broker.name,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **common,
        "loadavg_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        **broker.describe(),
        "n": broker.n,
        "concurrency": args.concurrency,
        "prefetch_multiplier": args.prefetch_multiplier,
        "backend_db": args.backend_db,
    }
    if broker.n != args.n:
        record["note"] = args.amqp_n_note
    results = []
    try:
        for impl in impls:
            results.append(run_one(impl, args, broker, backend))
    finally:
        # leave nothing behind: 50k results would otherwise sit in Redis for a day
        try:
            broker.cleanup()
        finally:
            backend.flushdb()

    by_impl = {r["impl"]: r for r in results}
    ratios = compute_ratios(broker, by_impl)
    record.update(results=by_impl, ratios=ratios, loadavg_end=os.getloadavg()[0])
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    where = (f"Redis {args.redis_url}/{args.broker_db}, queue {broker.queue!r}" if broker.name.startswith("redis")
             else f"RabbitMQ {redact(broker.url)}, queue {broker.queue!r}")
    print(f"== broker {broker.name}: {where}; results in Redis db {args.backend_db}; "
          f"-c {args.concurrency}, prefetch multiplier {args.prefetch_multiplier}, N={broker.n:,}")
    if "note" in record:
        print(f"   note: {record['note']}")
    print_table(broker, results, ratios)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50_000, help="tasks per worker run (default 50,000)")
    ap.add_argument("--broker", choices=SCENARIOS, default="all",
                    help="what to run: the drain over redis (results on), redis-ignore-result, amqp (RabbitMQ, "
                         "results in Redis), the latency mode (latency), both (redis and amqp) or all (default)")
    ap.add_argument("--latency-rate", type=int, default=200, help="latency mode: tasks sent per second (default 200)")
    ap.add_argument("--latency-seconds", type=int, default=15, help="latency mode: seconds of sending (default 15)")
    ap.add_argument("--only", choices=IMPLEMENTATIONS, help="run one implementation only")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="Redis server, without db")
    ap.add_argument("--broker-db", type=int, default=12, help="dedicated broker db, FLUSHed (default 12)")
    ap.add_argument("--backend-db", type=int, default=13,
                    help="dedicated result db for both brokers, FLUSHed (default 13)")
    ap.add_argument("--queue", default="drain", help="Redis broker queue (default drain)")
    ap.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
                    help="RabbitMQ broker (default $AMQP_URL or amqp://guest:guest@127.0.0.1:5672//)")
    ap.add_argument("--amqp-queue", default="bench-drain-amqp",
                    help="dedicated RabbitMQ queue, deleted before each run and at the end (default bench-drain-amqp)")
    ap.add_argument("--amqp-n", type=int, default=None,
                    help="tasks per worker run over RabbitMQ (default: -n)")
    ap.add_argument("-c", "--concurrency", type=int, default=2)
    ap.add_argument("--prefetch-multiplier", type=int, default=4,
                    help="both workers' prefetch multiplier (default 4, Celery's and celeriac's default)")
    ap.add_argument("--celeriac-bin", default=os.environ.get("CELERIAC_BIN"), help="default: $CELERIAC_BIN")
    ap.add_argument("--celeriac-args", default="", help="extra arguments for `celeriac worker`")
    ap.add_argument("--celeriac-loglevel", default="warning")
    ap.add_argument("--batch", type=int, default=1000, help="LPUSHes per pipelined round trip when filling")
    ap.add_argument("--poll", type=float, default=0.02, help="result-count poll interval, s")
    ap.add_argument("--stall-timeout", type=float, default=60, help="give up after this long without progress")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "drain.jsonl")
    ap.add_argument("--label", default="")
    ap.add_argument("--force", action="store_true",
                    help="flush the dbs even if they hold foreign keys; use the AMQP queue even if it has consumers")
    args = ap.parse_args()
    if args.broker_db == args.backend_db:
        ap.error("--broker-db and --backend-db must differ (results are counted with DBSIZE)")
    if args.n < 2:
        ap.error("-n must be at least 2")
    if args.amqp_n is None:
        args.amqp_n = args.n
        args.amqp_n_note = None
    else:
        if args.amqp_n < 2:
            ap.error("--amqp-n must be at least 2")
        args.amqp_n_note = f"RabbitMQ runs use N={args.amqp_n:,} (--amqp-n), not {args.n:,}"
    if args.amqp_queue in AMQP_RESERVED_QUEUES:
        ap.error(f"--amqp-queue: celeriac declares {args.amqp_queue!r} with x-max-length; pick another name")
    if args.prefetch_multiplier < 1:
        ap.error("--prefetch-multiplier must be at least 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    backend = redis.Redis.from_url(f"{args.redis_url}/{args.backend_db}")
    impls = [args.only] if args.only else list(IMPLEMENTATIONS)
    brokers = []
    if args.broker in ("redis", "both", "all"):
        brokers.append(RedisBroker(args, backend))
    if args.broker in ("redis-ignore-result", "all"):
        brokers.append(RedisIgnoreResultBroker(args, backend))
    if args.broker in ("amqp", "both", "all"):
        brokers.append(AmqpBroker(args, backend))
    latency = args.broker in ("latency", "all")

    common = {
        "label": args.label,
        "git": git_revision(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
    }
    # The dbs get FLUSHed and the AMQP queue deleted: make sure they are the benchmark's before touching anything.
    for broker in brokers:
        broker.check()
    if latency and not any(b.name.startswith("redis") for b in brokers):
        RedisBroker(args, backend).check()
    check_dedicated(backend, args.backend_db, args.queue, args.force)
    results = []
    for i, broker in enumerate(brokers):
        if i:
            print()
        results += run_broker(broker, impls, args, backend, common)
    if latency:
        if brokers:
            print()
        results += run_latency_mode(impls, args, backend, common)
    print(f"(appended to {args.out})")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
