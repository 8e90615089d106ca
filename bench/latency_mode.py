"""The drain benchmark's latency mode: each worker started on an empty Redis queue, ``bench.noop`` sent at a fixed
rate through the Python client (bench/fixed_rate.py), with start to first result and idle RSS."""
import json
import socket
import time
from datetime import datetime, timezone

import redis
from celery import Celery

from drainlib import Worker, group_rss_kib, log, print_rows, redact, worker_command
from fixed_rate import fixed_rate_detail, percentile
from pyapp import celery_settings


LATENCY_COLUMNS = [
    ("impl", "worker", "{}"),
    ("rate", "tasks/s sent", "{:,}"),
    ("n", "tasks", "{:,}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p90_ms", "p90 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("max_ms", "max ms", "{:.2f}"),
    ("done_p50_ms", "date_done p50", "{:.2f}"),
    ("done_p99_ms", "date_done p99", "{:.2f}"),
    ("queued_p50_ms", "queued p50", "{:.2f}"),
    ("queued_p99_ms", "queued p99", "{:.2f}"),
    ("first_task_ms", "start->1st result ms", "{:,.0f}"),
    ("idle_rss_mib", "idle RSS MiB", "{:.1f}"),
]


def run_latency(impl, args, backend):
    """Starts ``impl`` on the Redis broker (results on), sends ``bench.noop`` at ``--latency-rate`` for
    ``--latency-seconds`` through the Python client, and returns the latency figures (send → result PUBLISHed;
    the first second is warm-up and not counted)."""
    broker_url = f"{args.redis_url}/{args.broker_db}"
    backend_url = f"{args.redis_url}/{args.backend_db}"
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    backend.flushdb()
    node = f"latency-{impl}@{socket.gethostname()}"
    argv, env, cwd = worker_command(impl, args, broker_url, backend_url, args.queue, node)
    log_path = args.out.parent / f"latency-{impl}.log"
    log(f"latency/{impl}: starting {' '.join(redact(a) for a in argv)} (log: {log_path})")
    app = Celery("latency-client", set_as_current=False)
    app.conf.update(celery_settings(broker=broker_url, backend=backend_url, default_queue=args.queue))
    first = app.send_task("bench.noop", queue=args.queue)  # waiting in the queue before the worker starts
    launched = time.perf_counter()
    worker = Worker(argv, env, cwd, log_path)
    result = {"impl": impl, "rate": args.latency_rate, "seconds": args.latency_seconds}
    try:
        first.get(timeout=60)  # the worker is up and serving
        result["first_task_ms"] = round(1000 * (time.perf_counter() - launched), 1)
        time.sleep(1.0)
        result["idle_rss_mib"] = round(group_rss_kib(worker.pgid) / 1024, 1)
        lat = fixed_rate_detail(app, args.queue, backend, "bench.noop", lambda i: {},
                                args.latency_rate, args.latency_seconds)
        pub, done, queued = lat["published"], lat["date_done"], lat["queued"]
        result.update(n=len(pub), p50_ms=round(percentile(pub, 0.50), 3), p90_ms=round(percentile(pub, 0.90), 3),
                      p99_ms=round(percentile(pub, 0.99), 3), max_ms=round(max(pub), 3))
        if done:
            result.update(done_p50_ms=round(percentile(done, 0.50), 3), done_p99_ms=round(percentile(done, 0.99), 3),
                          queued_p50_ms=round(percentile(queued, 0.50), 3),
                          queued_p99_ms=round(percentile(queued, 0.99), 3))
    except Exception as e:  # noqa: BLE001 - reported in the table and the exit status
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"latency/{impl}: ERROR {result['error']}")
    finally:
        worker.stop()
        app.close()
        broker.flushdb()
        backend.flushdb()
    return result


def run_latency_mode(impls, args, backend, common):
    """The latency mode for every implementation; appends its JSON line and prints its table."""
    results = [run_latency(impl, args, backend) for impl in impls]
    by_impl = {r["impl"]: r for r in results}
    c, p = by_impl.get("celeriac"), by_impl.get("python")
    ratios = None
    if c and p and "error" not in c and "error" not in p:
        ratios = {k: round(c[k] / p[k], 3) for k in ("p50_ms", "p99_ms", "done_p50_ms", "done_p99_ms",
                                                      "queued_p50_ms", "queued_p99_ms")
                  if (c.get(k) or 0) > 0 and (p.get(k) or 0) > 0}
    record = {"bench": "drain", "broker": "redis-latency",
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **common,
              "concurrency": args.concurrency, "prefetch_multiplier": args.prefetch_multiplier,
              "results": by_impl, "ratios": ratios}
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"== latency: bench.noop at a fixed {args.latency_rate}/s for {args.latency_seconds}s over Redis "
          f"{args.redis_url}/{args.broker_db}, results in db {args.backend_db}; send -> result PUBLISHed, "
          f"first second not counted; -c {args.concurrency}")
    print_rows(LATENCY_COLUMNS, results)
    if ratios:
        print("celeriac / python (lower is better): published " +
              ", ".join(f"{k.removesuffix('_ms').replace('done_', 'date_done ').replace('queued_', 'queued ')} x{v:.2f}" for k, v in ratios.items()))
    return results
