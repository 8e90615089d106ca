#!/usr/bin/env python3
"""syncbench.py - products per second ingested through one celeriac worker from a fake Shopify shop.

In one run, against the same WireMock fake (``tests/peers/shopfake.py``):

1. yardstick: the fake's own pace, every page of N products walked straight from
   Python (``requests``, following ``Link``): what the peer serves at all;
2. celeriac: one ``catalog.ingest(mode="full")`` of the same N products by one
   worker: each page fetched within the shop's leaky bucket, upserted with its
   variants and images and its checkpoint in one PostgreSQL transaction.

Then it checks the tables hold exactly N products and prints products/s, the
ratio, and the API calls per 1,000 products; appends one JSON line to
``bench-results/sync.jsonl``.

Usage: CELERIAC_BIN=target/release/celeriac bench/syncbench.py [-n 5000]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis
import requests
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "peers"))
import shopfake  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG = os.environ.get("BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
APP = PG.replace("postgres@", "celeriac_app@", 1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=5000)
    args = ap.parse_args()
    binary = os.environ.get("CELERIAC_BIN") or str(ROOT / "target/release/celeriac")
    tag = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="bench-sync-"))
    prefix, queue, schema = f"bs-{tag}:", f"bench-sync-{tag}", f"bench_sync_{tag}"
    r = redis.Redis.from_url(REDIS_URL)
    fake = shopfake.ShopFake().start()
    proc = None
    try:
        fake.serve(shopfake.make_catalog(args.n, seed=3))
        t0 = time.monotonic()
        url, walked = fake.url("products") + "?limit=250", 0
        while url:
            resp = requests.get(url, headers={"X-Shopify-Access-Token": fake.token}, timeout=30)
            walked += len(resp.json()["products"])
            url = resp.links.get("next", {}).get("url")
        yard = walked / (time.monotonic() - t0)
        fake.reset()
        cfg = work / "celeriac.toml"
        cfg.write_text(
            f'database_url = "{APP}"\ndatabase_admin_url = "{PG}"\ndatabase_schema = "{schema}"\n'
            f'task_default_queue = "{queue}"\n[sync]\npage_size = 250\n'
            f'[broker_transport_options]\nglobal_keyprefix = "{prefix}"\n'
            f'[result_backend_transport_options]\nglobal_keyprefix = "{prefix}"\n')
        env = dict(os.environ, CELERIAC_SECRET_KEY="bench-secret-key-0123456789abcdef0123", SHOP_TOKEN=fake.token)
        run = lambda *a: subprocess.run([binary, "--config", str(cfg), *a], check=True, env=env,  # noqa: E731
                                        capture_output=True, text=True).stdout
        run("migrate", "up")
        run("tenants", "add", "bench")
        run("tenants", "set-source", "bench", "--url", fake.base_url, "--token-env", "SHOP_TOKEN")
        app = Celery("bench-sync", broker=REDIS_URL, backend=REDIS_URL)
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
        app.conf.result_backend_transport_options = {"global_keyprefix": prefix}
        proc = subprocess.Popen([binary, "--config", str(cfg), "worker", "-Q", queue, "-c", "2",
                                 "--without-heartbeat", "-l", "warning"], env=env,
                                stdout=open(work / "worker.log", "wb"), stderr=subprocess.STDOUT)
        ping = app.send_task("bench.noop", queue=queue)
        ping.get(timeout=60)
        t0 = time.monotonic()
        got = app.send_task("catalog.ingest", kwargs={"tenant_id": "bench", "mode": "full"}, queue=queue).get(timeout=3600)
        elapsed = time.monotonic() - t0
        assert got["fetched"] == args.n and got["upserted"] == args.n, got
        rows = subprocess.run(["psql", PG, "-Atc", f"SELECT count(*) FROM {schema}.catalog_products"],
                              capture_output=True, text=True).stdout.strip()
        assert rows == str(args.n), rows
        calls = len(fake.requests("products"))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        fake.stop()
        subprocess.run(["psql", PG, "-q", "-c", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'], capture_output=True)
        for k in r.scan_iter(match=f"{prefix}*", count=1000):
            r.delete(k)
    rate = args.n / elapsed
    print(f"products: {args.n} (variants and images with each), page size 250")
    print(f"  fake shop's pace (Python walking the pages, no database) {yard:8.0f} products/s")
    print(f"  celeriac catalog.ingest (upserts + checkpoints)          {rate:8.0f} products/s  ({rate / yard:.2f} of it)")
    print(f"  API calls per 1,000 products: {1000 * calls / args.n:.1f}")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "sync.jsonl", "a") as f:
        f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "n": args.n,
                            "fake_products_per_s": round(yard, 1), "celeriac_products_per_s": round(rate, 1),
                            "ratio": round(rate / yard, 3), "calls_per_1000": round(1000 * calls / args.n, 2)}) + "\n")


if __name__ == "__main__":
    main()
