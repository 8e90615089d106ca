#!/usr/bin/env python3
"""mailbench.py - mails per second through one celeriac worker, exactly once per key, into a local SMTP sink.

In one run, against the same aiosmtpd sink (``tests/peers/smtp_sink.py``, which
fsyncs every mail before its 250):

1. yardstick: the sink's own ceiling, N mails handed to it straight from Python
   (``smtplib``, one connection per thread, ``--concurrency`` threads, no outbox,
   no queue): what the peer can take at all;
2. celeriac: N ``email.send`` tasks with distinct idempotency keys prefilled on a
   queue by the Python Celery client, then one worker (``-c --concurrency``)
   started and timed until every result is stored; each mail goes through the
   PostgreSQL outbox (insert/lock, render, claim, SMTP, record) of a schema of
   its own.

Then it checks: N results ``sent``, the Maildir holds exactly N Message-IDs once
each, and a second publish of every key answers ``duplicate`` with no new mail.
It prints the table and appends one JSON line to ``bench-results/email.jsonl``.

Usage: CELERIAC_BIN=target/release/celeriac bench/mailbench.py [-n 2000] [-c 8]
"""
import argparse
import json
import os
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import redis
from celery import Celery

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "peers"))
import smtp_sink  # noqa: E402

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
PG = os.environ.get("BENCH_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
APP = PG.replace("postgres@", "celeriac_app@", 1)


def yardstick(port, n, threads):
    """N mails straight into the sink over ``threads`` SMTP connections; returns mails/s."""
    per = [n // threads + (1 if i < n % threads else 0) for i in range(threads)]

    def worker(count, idx):
        with smtplib.SMTP("127.0.0.1", port) as s:
            for j in range(count):
                m = EmailMessage()
                m["From"], m["To"], m["Subject"] = "shop@example.com", f"y{idx}-{j}@example.org", "Order"
                m["Message-ID"] = f"<y{idx}-{j}-{uuid.uuid4().hex}@example.com>"
                m.set_content("Thanks for your order.")
                s.send_message(m)

    t0 = time.monotonic()
    ts = [threading.Thread(target=worker, args=(c, i)) for i, c in enumerate(per)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return n / (time.monotonic() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", type=int, default=2000)
    ap.add_argument("-c", "--concurrency", type=int, default=8)
    args = ap.parse_args()
    binary = os.environ.get("CELERIAC_BIN") or str(ROOT / "target/release/celeriac")
    tag = uuid.uuid4().hex[:8]
    work = Path(tempfile.mkdtemp(prefix="bench-email-"))
    prefix, queue, schema = f"be-{tag}:", f"bench-email-{tag}", f"bench_email_{tag}"
    r = redis.Redis.from_url(REDIS_URL)

    with smtp_sink.SmtpSink(str(work / "yard")) as yard:
        ystick = yardstick(yard.port, args.n, args.concurrency)
        assert len(yard.message_ids()) == args.n

    sink = smtp_sink.SmtpSink(str(work / "maildir")).start()
    cfg = work / "celeriac.toml"
    cfg.write_text(
        f'database_url = "{APP}"\ndatabase_admin_url = "{PG}"\ndatabase_schema = "{schema}"\n'
        f'task_default_queue = "{queue}"\n'
        f'[email]\nsmtp_url = "smtp://127.0.0.1:{sink.port}"\nfrom = "Shop <shop@example.com>"\n'
        f'pool_size = {args.concurrency}\n'
        f'[broker_transport_options]\nglobal_keyprefix = "{prefix}"\n'
        f'[result_backend_transport_options]\nglobal_keyprefix = "{prefix}"\n')
    run = lambda *a: subprocess.run([binary, "--config", str(cfg), *a], check=True,  # noqa: E731
                                    capture_output=True, text=True).stdout
    proc = None
    try:
        run("migrate", "up")
        run("tenants", "add", "bench")
        app = Celery("bench-email", broker=REDIS_URL, backend=REDIS_URL)
        app.conf.broker_transport_options = {"global_keyprefix": prefix}
        app.conf.result_backend_transport_options = {"global_keyprefix": prefix}
        kw = lambda i: dict(tenant_id="bench", to=f"user{i}@example.org", subject="Order {{ n }}",  # noqa: E731
                            text="Thanks for order {{ n }}.", context={"n": i}, idempotency_key=f"order-{i}")
        ids = [app.send_task("email.send", kwargs=kw(i), queue=queue).id for i in range(args.n)]
        log = open(work / "worker.log", "wb")
        t0 = time.monotonic()
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            metrics_addr = f"127.0.0.1:{s.getsockname()[1]}"
        proc = subprocess.Popen([binary, "--config", str(cfg), "worker", "-Q", queue, "-c", str(args.concurrency),
                                 "--without-heartbeat", "-l", "warning", "--metrics-addr", metrics_addr],
                                stdout=log, stderr=subprocess.STDOUT)
        keys = [f"{prefix}celery-task-meta-{i}" for i in ids]
        while sum(r.exists(*keys[i:i + 1000]) for i in range(0, len(keys), 1000)) < args.n:
            if proc.poll() is not None:
                sys.exit(f"worker exited {proc.returncode}; see {work / 'worker.log'}")
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        import urllib.request
        text = urllib.request.urlopen(f"http://{metrics_addr}/metrics").read().decode()
        sums = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
                if ln.startswith("celeriac_email_send_seconds_sum") or ln.startswith("celeriac_email_send_seconds_count")}
        smtp_ms = 1000 * sums["celeriac_email_send_seconds_sum"] / max(sums["celeriac_email_send_seconds_count"], 1)
        metas = [json.loads(v) for v in r.mget(keys)]
        statuses = {m["result"]["status"] for m in metas if m["status"] == "SUCCESS"}
        assert all(m["status"] == "SUCCESS" for m in metas), "every task succeeded"
        assert statuses == {"sent"}, statuses
        mids = sink.message_ids()
        assert len(mids) == args.n and set(mids.values()) == {1}, "one mail per key"
        again = [app.send_task("email.send", kwargs=kw(i), queue=queue) for i in range(0, args.n, 10)]
        assert {a.get(timeout=60)["status"] for a in again} == {"duplicate"}
        assert sink.message_ids() == mids, "a second publish sends nothing"
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
        sink.stop()
        subprocess.run(["psql", PG, "-q", "-c", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'], capture_output=True)
        for k in r.scan_iter(match=f"{prefix}*", count=1000):
            r.delete(k)
    rate = args.n / elapsed
    print(f"mails: {args.n}, concurrency {args.concurrency}")
    print(f"  sink ceiling (smtplib, no outbox)     {ystick:8.0f} mails/s")
    print(f"  celeriac email.send (outbox, exactly once) {rate:8.0f} mails/s  ({rate / ystick:.2f} of the ceiling)")
    print(f"  SMTP conversation (worker's histogram) {smtp_ms:8.2f} ms per mail on average")
    print("  checks: every result sent, one Message-ID per key, re-publish = duplicate")
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    with open(out / "email.jsonl", "a") as f:
        f.write(json.dumps({"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "n": args.n,
                            "concurrency": args.concurrency, "sink_ceiling": round(ystick, 1),
                            "celeriac_mails_per_s": round(rate, 1), "ratio": round(rate / ystick, 3),
                            "smtp_ms": round(smtp_ms, 2)}) + "\n")


if __name__ == "__main__":
    main()
