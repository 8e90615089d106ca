#!/usr/bin/env python3
"""recbench.py - the recommendation family through one celeriac worker, driven by the Python Celery client.

In one run, against one worker (release build) and one tenant:

1. record: N interactions sent as ``recommend.record`` tasks at once (batched inserts), records/s;
2. train: ``recommend.train`` on them (seconds, validation NDCG@10);
3. latency at a fixed rate: ``recommend.next_items`` sent at R tasks/s for D seconds, each task's latency from
   ``send_task`` to its result's PUBLISH (a PSUBSCRIBE listener stamps arrivals), p50/p99/max; and, as the
   yardstick in the same run, ``bench.noop`` at the same rate through the same client, broker and worker
   (what the transport alone costs).

Prints the figures and appends one JSON line to ``bench-results/recommend.jsonl``.

Usage: CELERIAC_BIN=target/release/celeriac bench/recbench.py [--rate 200] [--seconds 20]
"""
import argparse
import json
import os
import random
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import redis
from celery import Celery, group

from fixed_rate import fixed_rate, percentile

ROOT = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG = os.environ.get("BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
APP = PG.replace("postgres@", "celeriac_app@", 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--customers", type=int, default=500)
    ap.add_argument("--products", type=int, default=300)
    ap.add_argument("--length", type=int, default=20)
    args = ap.parse_args()
    binary = os.environ.get("CELERIAC_BIN") or str(ROOT / "target/release/celeriac")
    tag = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="bench-rec-"))
    prefix, queue, schema = f"br-{tag}:", f"bench-rec-{tag}", f"bench_rec_{tag}"
    r = redis.Redis.from_url(REDIS_URL)
    proc = None
    try:
        cfg = work / "celeriac.toml"
        cfg.write_text(
            f'database_url = "{APP}"\ndatabase_admin_url = "{PG}"\ndatabase_schema = "{schema}"\n'
            f'task_default_queue = "{queue}"\n'
            f'[broker_transport_options]\nglobal_keyprefix = "{prefix}"\n'
            f'[result_backend_transport_options]\nglobal_keyprefix = "{prefix}"\n')
        run = lambda *a: subprocess.run([binary, "--config", str(cfg), *a], check=True,  # noqa: E731
                                        capture_output=True, text=True).stdout
        run("migrate", "up")
        run("tenants", "add", "bench")
        app = Celery("bench-rec", broker=REDIS_URL, backend=REDIS_URL)
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
        app.conf.result_backend_transport_options = {"global_keyprefix": prefix}
        proc = subprocess.Popen([binary, "--config", str(cfg), "worker", "-Q", queue, "-c", "32",
                                 "--without-heartbeat", "-l", "warning"],
                                stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT)
        app.send_task("bench.noop", queue=queue).get(timeout=60)
        # Customers walk the catalogue in runs (a product is usually followed by one of its next three).
        rng = random.Random(7)
        walks = []
        for c in range(args.customers):
            p = rng.randrange(args.products)
            for t in range(args.length):
                walks.append((c, p, t))
                p = (p + rng.choice([1, 1, 2, 3])) % args.products
        t0 = time.perf_counter()
        group(app.signature("recommend.record", kwargs=dict(tenant_id="bench", customer_id=f"c{c}",
                                                            product_id=f"p{p}", at=1_767_225_600 + 1000 * c + t),
                            queue=queue) for c, p, t in walks).apply_async().get(timeout=600)
        record_rate = len(walks) / (time.perf_counter() - t0)
        trained = app.send_task("recommend.train", kwargs=dict(tenant_id="bench", seed=1), queue=queue).get(timeout=3600)
        assert trained["version"] == 1, trained
        histories = [[f"p{(s + k) % args.products}" for k in range(8)] for s in range(64)]
        noop = fixed_rate(app, queue, r, "bench.noop", lambda i: {}, args.rate, args.seconds)
        nxt = fixed_rate(app, queue, r, "recommend.next_items",
                         lambda i: dict(tenant_id="bench", history=histories[i % 64], k=10), args.rate, args.seconds)
        answer = app.send_task("recommend.next_items", kwargs=dict(tenant_id="bench", history=histories[0]),
                               queue=queue).get(timeout=60)
        assert answer["model"] == "transformer v1", answer
        rss = int(open(f"/proc/{proc.pid}/status").read().split("VmRSS:")[1].split()[0]) // 1024
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        subprocess.run(["psql", PG, "-q", "-c", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'], capture_output=True)
        for k in r.scan_iter(match=f"{prefix}*", count=1000):
            r.delete(k)
    figures = {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rate": args.rate, "seconds": args.seconds,
        "interactions": len(walks), "records_per_s": round(record_rate, 1),
        "train_seconds": trained["seconds"], "train_epochs": trained["epochs"],
        "valid_ndcg10": trained["valid_ndcg10"], "items": trained["items"],
        "next_items_p50_ms": round(percentile(nxt, 0.5), 2), "next_items_p99_ms": round(percentile(nxt, 0.99), 2),
        "next_items_max_ms": round(max(nxt), 2),
        "noop_p50_ms": round(percentile(noop, 0.5), 2), "noop_p99_ms": round(percentile(noop, 0.99), 2),
        "worker_rss_mb": rss,
    }
    print(f"record: {len(walks)} interactions through recommend.record at {record_rate:.0f}/s")
    print(f"train: {trained['items']} products, {trained['epochs']} epochs in {trained['seconds']:.1f} s, "
          f"validation NDCG@10 {trained['valid_ndcg10']}")
    print(f"at {args.rate:.0f} tasks/s for {args.seconds:.0f} s (send → result published):")
    print(f"  bench.noop (the yardstick)   p50 {figures['noop_p50_ms']:6.2f} ms  p99 {figures['noop_p99_ms']:6.2f} ms")
    print(f"  recommend.next_items         p50 {figures['next_items_p50_ms']:6.2f} ms  "
          f"p99 {figures['next_items_p99_ms']:6.2f} ms  max {figures['next_items_max_ms']:.2f} ms  "
          f"(p99 {figures['next_items_p99_ms'] / figures['noop_p99_ms']:.2f}× the yardstick's)")
    print(f"  worker RSS after the run: {rss} MB")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "recommend.jsonl", "a") as f:
        f.write(json.dumps(figures) + "\n")


if __name__ == "__main__":
    main()
