#!/usr/bin/env python3
"""paybench.py - charges per second through one celeriac worker, exactly once per order, against the
Stripe-compatible launcher of ``tests/peers/stripe_launcher.py``.

In one run, against the same launcher process:

1. yardstick: the launcher's own ceiling, N PaymentIntents created and confirmed
   straight from Python (``urllib``, ``--concurrency`` threads, an idempotency
   key each, no queue, no database): what the peer can take at all;
2. celeriac: N ``payment.charge`` tasks (distinct orders) prefilled on a queue by
   the Python Celery client, then one worker (``-c --concurrency``) started and
   timed until every result is stored; each charge claims its ``payments`` row in
   PostgreSQL before the API call and records the outcome after.

Then it checks: N results ``succeeded``, the launcher holds exactly one
PaymentIntent per order, and a re-publish of every order is ``replayed`` with no
new request to the API. It prints the table and appends one JSON line to
``bench-results/payment.jsonl``.

Usage: CELERIAC_BIN=target/release/celeriac bench/paybench.py [-n 1000] [-c 8]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "peers"))
import stripe_launcher  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG = os.environ.get("BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
APP = PG.replace("postgres@", "celeriac_app@", 1)
SECRET = "sk_test_bench"


def yardstick(base, n, threads):
    """N confirmed PaymentIntents straight from Python; returns creations/s."""
    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

    def worker(count, idx):
        for j in range(count):
            body = urllib.parse.urlencode({"amount": 1000, "currency": "usd", "payment_method": "pm_card_visa",
                                           "confirm": "true", "off_session": "true",
                                           "metadata[order_id]": f"y{idx}-{j}"}).encode()
            req = urllib.request.Request(base + "v1/payment_intents", data=body, method="POST", headers={
                "Authorization": f"Bearer {SECRET}", "Idempotency-Key": f"y:{idx}:{j}:{uuid.uuid4().hex}"})
            with urllib.request.urlopen(req, timeout=30) as r:
                assert json.loads(r.read())["status"] == "succeeded"

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(c, i)) for i, c in enumerate(per)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return n / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    args = ap.parse_args()
    binary = os.environ.get("CELERIAC_BIN") or str(ROOT / "target/release/celeriac")
    tag = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="bench-payment-"))
    prefix, queue, schema = f"bp-{tag}:", f"bench-payment-{tag}", f"bench_payment_{tag}"
    r = redis.Redis.from_url(REDIS_URL)
    with stripe_launcher.StripeLauncher(log_path=str(work / "yard.log")) as yard:
        ystick = yardstick(yard.base_url, args.n, args.concurrency)
    launcher = stripe_launcher.StripeLauncher(log_path=str(work / "launcher.log")).start()
    cfg = work / "celeriac.toml"
    cfg.write_text(
        f'database_url = "{APP}"\ndatabase_admin_url = "{PG}"\ndatabase_schema = "{schema}"\n'
        f'task_default_queue = "{queue}"\n'
        f'[payment]\napi_base = "{launcher.base_url}"\nsecret_key = "{SECRET}"\n'
        f'[broker_transport_options]\nglobal_keyprefix = "{prefix}"\n'
        f'[result_backend_transport_options]\nglobal_keyprefix = "{prefix}"\n')
    run = lambda *a: subprocess.run([binary, "--config", str(cfg), *a], check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout
    proc = None
    try:
        run("migrate", "up")
        tenant = run("tenants", "add", "bench").strip()
        app = Celery("bench-payment", broker=REDIS_URL, backend=REDIS_URL)
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
        app.conf.result_backend_transport_options = {"global_keyprefix": prefix}
        kw = lambda i: dict(tenant_id="bench", order_id=f"order-{i}", amount=1000 + i,  # noqa: E731
                            currency="usd", payment_method="pm_card_visa")
        ids = [app.send_task("payment.charge", kwargs=kw(i), queue=queue).id for i in range(args.n)]
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(work / "worker.log", "wb")
        t0 = time.monotonic()
        proc = subprocess.Popen([binary, "--config", str(cfg), "worker", "-Q", queue, "-c", str(args.concurrency),
                                 "--without-heartbeat", "-l", "warning", "--metrics-addr", f"127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT)
        keys = [f"{prefix}celery-task-meta-{i}" for i in ids]
        while sum(r.exists(*keys[i:i + 1000]) for i in range(0, len(keys), 1000)) < args.n:
            if proc.poll() is not None:
                sys.exit(f"worker exited {proc.returncode}; see {work / 'worker.log'}")
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        metas = [json.loads(v) for v in r.mget(keys)]
        assert all(m["status"] == "SUCCESS" and m["result"]["status"] == "succeeded" for m in metas)
        requests_before = launcher.stats()["requests"]
        again = [app.send_task("payment.charge", kwargs=kw(i), queue=queue) for i in range(0, args.n, 10)]
        assert all(a.get(timeout=60)["replayed"] for a in again), "re-publish = replay"
        assert launcher.stats()["requests"] == requests_before, "replays call nothing"
        seen, page = {}, None
        while True:
            params = {"query": f"metadata['tenant_id']:'{tenant}'", "limit": 100, **({"page": page} if page else {})}
            req = urllib.request.Request(launcher.base_url + "v1/payment_intents/search?" + urllib.parse.urlencode(params),
                                         headers={"Authorization": f"Bearer {SECRET}"})
            res = json.loads(urllib.request.urlopen(req, timeout=30).read())
            for pi in res["data"]:
                seen[pi["metadata"]["order_id"]] = seen.get(pi["metadata"]["order_id"], 0) + 1
            if not res["has_more"]:
                break
            page = res["next_page"]
        assert len(seen) == args.n and set(seen.values()) == {1}, "one PaymentIntent per order"
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        launcher.stop()
        subprocess.run(["psql", PG, "-q", "-c", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'], capture_output=True)
        for k in r.scan_iter(match=f"{prefix}*", count=1000):
            r.delete(k)
    rate = args.n / elapsed
    print(f"charges: {args.n}, concurrency {args.concurrency}")
    print(f"  launcher ceiling (Python, no queue, no database) {ystick:8.0f} charges/s")
    print(f"  celeriac payment.charge (claimed, exactly once)  {rate:8.0f} charges/s  ({rate / ystick:.2f} of the ceiling)")
    print("  checks: every result succeeded, one PaymentIntent per order, re-publish = replay with no API call")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "payment.jsonl", "a") as f:
        f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "n": args.n,
                            "concurrency": args.concurrency, "launcher_ceiling": round(ystick, 1),
                            "celeriac_charges_per_s": round(rate, 1), "ratio": round(rate / ystick, 3)}) + "\n")


if __name__ == "__main__":
    main()
