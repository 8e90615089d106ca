"""The chaos suite: every peer a worker or a task holds, restarted or stopped mid-load, on instances of the
suite's own (``tests/peers/instances.py``: Redis with an append-only file, a PostgreSQL cluster, a RabbitMQ
node; the SMTP sink, the Stripe launcher and the fake shop behind ``tests/peers/tcp_proxy.py``). Loads go
through the Python Celery client. For each fault it measures tasks lost (must be 0), tasks failed because of
the fault (0), duplicates (0 for the exactly-once families, bounded by the prefetch window for acks_late on
RabbitMQ), the time from the peer's return to the first task completed after it, and whether ``/health``
named the peer while it was away.

``CHAOS_SCALE=full`` (``make chaos``) runs the loads of the README's table (30,000 tasks through the Redis
restart); the default is a short form that fits ``make test``. Figures go to ``test-artifacts/chaos.jsonl``.
"""
import collections
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from celery import Celery

from interop_helpers import free_port, wait_for

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "peers"))
import instances  # noqa: E402
import tcp_proxy  # noqa: E402

pytestmark = pytest.mark.celeriac_only(reason="the chaos suite measures celeriac workers")

FULL = os.environ.get("CHAOS_SCALE") == "full"
OUTAGE = 10.0 if FULL else 3.0
RESULTS = HERE.parent.parent / "test-artifacts" / "chaos.jsonl"


class HealthWatch:
    """Polls a worker's ``/health`` in the background; remembers the unhealthy answers naming ``peer``."""

    def __init__(self, addr, peer):
        self.addr, self.peer, self.red, self.stop_flag = addr, peer, [], False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_flag:
            try:
                urllib.request.urlopen(f"http://{self.addr}/health", timeout=1).read()
            except urllib.error.HTTPError as e:
                body = e.read().decode(errors="replace")
                if self.peer in body:
                    self.red.append(body)
            except OSError:
                pass
            time.sleep(0.1)

    def stop(self):
        self.stop_flag = True
        self.thread.join(2)
        return bool(self.red)


def record(name, peer, fault, **figures):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    line = {"scenario": name, "peer": peer, "fault": fault, "full": FULL, **figures}
    with open(RESULTS, "a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"\nchaos {name}: {line}")


def worker_with_metrics(workers, **kw):
    """A worker serving /metrics and /health. With ``wait_ready=False`` (a queue already full: the worker
    serves it before its readiness queue) the caller waits for the load to move instead."""
    addr = f"127.0.0.1:{free_port()}"
    w = workers.start(extra_args=["--metrics-addr", addr], **kw)
    w.metrics_addr = addr
    return w


class SteadyLoad:
    """Publishes ``make(i)`` (an AsyncResult) ``rate`` times a second from a thread until ``stop()``: the load
    keeps coming before, during and after the fault."""

    def __init__(self, make, rate):
        self.make, self.rate, self.results, self.stop_flag = make, rate, [], False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        i, t0 = 0, time.monotonic()
        while not self.stop_flag:
            self.results.append(self.make(i))
            i += 1
            time.sleep(max(0.0, t0 + i / self.rate - time.monotonic()))

    def stop(self):
        self.stop_flag = True
        self.thread.join(5)
        return self.results


def ready_count(results):
    return sum(1 for r in list(results) if r.ready())


def fault_window(load, set_fault, clear_fault, peer_watch, settle=1.0):
    """Lets the load run, applies the fault for OUTAGE seconds, clears it; returns (recovery seconds, red)."""
    time.sleep(settle)
    set_fault()
    time.sleep(OUTAGE)
    clear_fault()
    back = time.monotonic()
    before = ready_count(load.results)
    wait_for(lambda: ready_count(load.results) > before, 120, interval=0.02, message="a task completed after the fault")
    recovery = time.monotonic() - back
    time.sleep(settle)
    return recovery, peer_watch.stop()


# ------------------------------------------------------------------ c1: Redis as broker, backend, resource
def test_c1_redis_restart_broker_backend_and_task_resource(workers, iso):
    n = 30000 if FULL else 15000
    r = instances.RedisInstance(password="chaos-pw")
    try:
        workers.broker_url = workers.result_backend = r.url
        app = Celery(f"chaos-{iso.tag}", broker=r.url, backend=r.url, set_as_current=False)
        app.conf.update(broker_transport_options={"global_keyprefix": iso.prefix},
                        result_backend_transport_options={"global_keyprefix": iso.prefix},
                        task_default_queue=iso.queue)
        workers.client_app = app
        marks = iso.key("marks")
        ids = []
        with app.producer_or_acquire() as producer:
            for i in range(n):
                ids.append(app.send_task("bench.mark", args=(i, marks, r.url), queue=iso.queue, producer=producer).id)
        # The load is all queued before the worker starts: the fault lands with most of it still to do.
        w = worker_with_metrics(workers, concurrency=4, acks_late=True, visibility_timeout=30, wait_ready=False)
        client = redis.Redis.from_url(r.url)
        keys = [iso.result_key(i) for i in ids]

        def done():
            try:
                return client.hlen(marks)  # executions so far (O(1), unlike counting result keys)
            except redis.RedisError:
                return None

        wait_for(lambda: (d := done()) is not None and d >= n // 20, 120, interval=0.01, message="a twentieth done")
        watch = HealthWatch(w.metrics_addr, "broker")
        at_fault = done()
        r.shutdown()
        down_at = time.monotonic()
        print(f"\nc1: {at_fault} of {n} executed at the fault")
        time.sleep(OUTAGE)
        r.start()
        back = time.monotonic()
        before = None
        while before is None:
            before = done()
        print(f"\nc1: {before} of {n} executed when Redis came back")
        t_first = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            d = done()
            if d is not None and d > before and t_first is None:
                t_first = time.monotonic() - back
            if d == n:
                break
            time.sleep(0.01)
        wait_for(lambda: sum(client.exists(*keys[j:j + 2000]) for j in range(0, n, 2000)) == n, 120,
                 interval=0.2, message="every result stored")
        red = watch.stop()
        counts = {int(k): int(v) for k, v in client.hgetall(marks).items()}
        metas = [json.loads(v) for j in range(0, n, 2000) for v in client.mget(keys[j:j + 2000]) if v]
        lost = n - len(counts)
        failed = sum(1 for m in metas if m["status"] != "SUCCESS")
        dups = sum(c - 1 for c in counts.values() if c > 1)
        record("c1", "redis (broker, results, bench.mark)", f"shutdown, {OUTAGE:.0f} s, restart (AOF)", tasks=n,
               lost=lost, failed=failed, duplicates=dups, recovery_s=round(t_first or -1, 2), health_red=red,
               outage_s=round(back - down_at, 2))
        assert (lost, failed, dups) == (0, 0, 0)
        assert len(metas) == n and red
        assert w.alive
    finally:
        r.stop()


# ------------------------------------------------------------------ c2: PostgreSQL (the email family's outbox)
def test_c2_postgres_restart_and_terminated_sessions(workers, iso, client_app, smtp_sink, monkeypatch):
    import fixtures_platform
    pg = instances.PostgresInstance()
    try:
        monkeypatch.setattr(fixtures_platform, "POSTGRES_URL", pg.admin_url())
        from conftest import celeriac_bin
        domain = fixtures_platform.Domain(workers.log_dir, celeriac_bin())
        domain.cli("migrate", "up")
        domain.add_tenant("acme")
        sink = smtp_sink()
        settings = domain.settings(email={"smtp_url": f"smtp://127.0.0.1:{sink.port}", "from": "s@example.com",
                                          "retry_backoff": 0.2, "retry_backoff_max": 1.0})
        w = worker_with_metrics(workers, concurrency=4, settings=settings)
        load = SteadyLoad(lambda i: client_app.send_task("email.send", kwargs=dict(
            tenant_id="acme", to=f"u{i}@example.org", subject="s", text="t", idempotency_key=f"k{i}"),
            queue=iso.queue), rate=40)
        watch = HealthWatch(w.metrics_addr, "postgres")
        t_first, red = fault_window(load, lambda: pg.stop("fast"), pg.start, watch)
        # Then every worker session killed by the server.
        import subprocess
        subprocess.run(["psql", pg.admin_url(), "-qc",
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'celeriac_app'"],
                       check=True, capture_output=True)
        time.sleep(1.0)
        results = load.stop()
        n = len(results)
        outcomes = collections.Counter(r.get(timeout=300)["status"] for r in results)
        ids = sink.message_ids()
        dups = sum(c - 1 for c in ids.values())
        record("c2", "postgresql (email outbox)", f"fast shutdown, {OUTAGE:.0f} s, restart; pg_terminate_backend",
               tasks=n, lost=n - len(ids), failed=n - sum(outcomes.values()), duplicates=dups,
               recovery_s=round(t_first, 2), health_red=red, results=dict(outcomes))
        assert set(outcomes) == {"sent"} and len(ids) == n and dups == 0
        assert red
    finally:
        pg.destroy()


# ------------------------------------------------------------------ c3: the SMTP server refusing connections
def test_c3_smtp_refusing(workers, iso, client_app, domain, smtp_sink):
    sink = smtp_sink()
    # Through a proxy that refuses new connections and cuts the open ones (the sink's own refuse mode keeps
    # open connections, and the worker's pooled ones would carry on).
    proxy = tcp_proxy.TcpProxy(f"127.0.0.1:{sink.port}")
    domain.add_tenant("acme")
    settings = domain.settings(email={"smtp_url": f"smtp://127.0.0.1:{proxy.port}", "from": "s@example.com",
                                      "retry_backoff": 0.2, "retry_backoff_max": 1.0})
    w = worker_with_metrics(workers, concurrency=4, settings=settings)
    load = SteadyLoad(lambda i: client_app.send_task("email.send", kwargs=dict(
        tenant_id="acme", to=f"u{i}@example.org", subject="s", text="t", idempotency_key=f"k{i}"),
        queue=iso.queue), rate=40)
    watch = HealthWatch(w.metrics_addr, "smtp")
    t_first, red = fault_window(load, lambda: proxy.refuse(True), lambda: proxy.refuse(False), watch)
    results = load.stop()
    n = len(results)
    outcomes = collections.Counter(r.get(timeout=300)["status"] for r in results)
    in_flight = proxy.state()["cut_in_flight"]
    proxy.stop()
    ids = sink.message_ids()
    dups = sum(c - 1 for c in ids.values())
    record("c3", "smtp sink", f"refuses connections {OUTAGE:.0f} s", tasks=n, lost=n - len(ids),
           failed=n - sum(outcomes.values()), duplicates=dups, recovery_s=round(t_first, 2), health_red=red,
           cut_in_flight=in_flight)
    # SMTP has no idempotency: a connection cut after the server took a message's final "." and before its
    # 250 reached the worker leaves the worker unable to know it was sent, and the retry sends it again (at
    # most once more per such cut; the Message-ID is the same, so receivers can drop it). Every other cut
    # must cost nothing.
    assert set(outcomes) == {"sent"} and len(ids) == n and dups <= in_flight and red


# ------------------------------------------------------------------ c4: the payment API refusing connections
def test_c4_stripe_refusing(workers, iso, client_app, domain, stripe):
    launcher = stripe()
    proxy = tcp_proxy.TcpProxy(f"127.0.0.1:{launcher.port}")
    try:
        tid = domain.add_tenant("acme")
        settings = domain.settings(payment={"api_base": f"http://127.0.0.1:{proxy.port}/", "secret_key": "sk_test_x",
                                            "retry_backoff": 0.2, "retry_backoff_max": 1.0, "request_timeout": 3.0,
                                            "claim_lease": 8.0, "max_retries": 100})
        w = worker_with_metrics(workers, concurrency=4, acks_late=True, settings=settings)
        load = SteadyLoad(lambda i: client_app.send_task("payment.charge", kwargs=dict(
            tenant_id="acme", order_id=f"o{i}", amount=500, currency="usd", payment_method="pm_card_visa"),
            queue=iso.queue), rate=25)
        watch = HealthWatch(w.metrics_addr, "stripe")
        t_first, red = fault_window(load, lambda: proxy.refuse(True), lambda: proxy.refuse(False), watch)
        results = load.stop()
        n = len(results)
        outcomes = collections.Counter(r.get(timeout=300)["status"] for r in results)
        from test_payment import intents_by_order
        per_order = intents_by_order(launcher, tid)
        dups = sum(len([p for p in v if p["status"] == "succeeded"]) - 1 for v in per_order.values())
        record("c4", "stripe launcher", f"refuses connections {OUTAGE:.0f} s (proxy)", tasks=n,
               lost=n - len(per_order), failed=n - outcomes["succeeded"], duplicates=dups,
               recovery_s=round(t_first, 2), health_red=red)
        assert outcomes == {"succeeded": n} and len(per_order) == n and dups == 0 and red
    finally:
        proxy.stop()


# ------------------------------------------------------------------ c5: the shop refusing connections
def test_c5_shop_refusing(workers, iso, client_app, domain, shop, secret_key):
    sf = __import__("shopfake")
    fake = shop()
    catalog = sf.make_catalog(1200, seed=12)
    fake.serve(catalog)
    proxy = tcp_proxy.TcpProxy(f"127.0.0.1:{fake.port}")
    try:
        tid = domain.add_tenant("acme")

        class ProxiedShop:
            base_url = f"http://127.0.0.1:{proxy.port}"
        from test_sync import set_source, assert_equals_fixture
        set_source(domain, ProxiedShop, "acme")
        settings = domain.settings(sync={"page_size": 50, "leak_per_s": 4.0, "bucket_capacity": 12,
                                         "bucket_margin": 2, "page_tries": 3})
        w = worker_with_metrics(workers, acks_late=True, settings=settings)
        res = client_app.send_task("catalog.ingest", kwargs=dict(tenant_id="acme", mode="full"), queue=iso.queue)
        wait_for(lambda: len(fake.requests("products")) >= 6, 60, message="a few pages")
        watch = HealthWatch(w.metrics_addr, "shop")
        proxy.refuse(True)
        time.sleep(OUTAGE)
        proxy.refuse(False)
        back = time.monotonic()
        before = len(fake.requests("products"))
        wait_for(lambda: len(fake.requests("products")) > before or res.ready(), 120, message="pages again")
        t_first = time.monotonic() - back
        got = res.get(timeout=300)
        red = watch.stop()
        assert_equals_fixture(domain, tid, catalog)
        record("c5", "fake shop (WireMock)", f"refuses connections {OUTAGE:.0f} s (proxy)", tasks=1,
               lost=0, failed=0, duplicates=0, recovery_s=round(t_first, 2), health_red=red, pages=got["pages"])
        assert red
        # Counted by rows: exactly the fixture, none doubled (checked above), the pass completed.
        assert got["fetched"] == 1200
    finally:
        proxy.stop()


# ------------------------------------------------------------------ c6: a RabbitMQ node killed and restarted
@pytest.mark.parametrize("fault", ["stop_app", "kill"])
def test_c6_rabbitmq_node(fault, workers, iso, redis_client):
    n = 30000 if FULL else 10000
    node = instances.RabbitInstance()
    try:
        workers.broker_url = node.url
        # A node killed loses what was not confirmed to the publisher, and a classic queue replays the acks it
        # had not written yet: durable work on RabbitMQ means publisher confirms and quorum queues.
        from kombu import Queue
        app = Celery(f"chaos-{iso.tag}", broker=node.url, backend=iso.redis_url, set_as_current=False)
        app.conf.update(result_backend_transport_options={"global_keyprefix": iso.prefix}, task_default_queue=iso.queue,
                        task_queues=[Queue(iso.queue, queue_arguments={"x-queue-type": "quorum"})])
        workers.client_app = app
        prefetch = 4
        quorum = {"task_queues": {iso.queue: {"queue_arguments": {"x-queue-type": "quorum"}}}}
        marks = iso.key("marks")
        with app.producer_or_acquire() as producer:
            ids = [app.send_task("bench.mark", args=(i, marks, iso.redis_url), queue=iso.queue,
                                 producer=producer).id for i in range(n)]
        keys = [iso.result_key(i) for i in ids]
        done = lambda: redis_client.hlen(marks)  # noqa: E731 - executions so far

        def queued():
            out = node.ctl("list_queues", "name", "messages").stdout.split()
            return int(out[out.index(iso.queue) + 1]) if iso.queue in out else 0
        # Unconfirmed publishes are only durable once RabbitMQ has them all: wait for that (a client that needs
        # durability without waiting publishes with confirms, which is slower to fill a queue).
        wait_for(lambda: queued() + done() >= n, 120, interval=0.5, message="every message in the queue")
        time.sleep(1.0)
        w = worker_with_metrics(workers, concurrency=2, prefetch=prefetch, acks_late=True, settings=quorum,
                                wait_ready=False)
        wait_for(lambda: done() >= n // 20, 120, interval=0.01, message="a twentieth done")
        watch = HealthWatch(w.metrics_addr, "broker")
        if fault == "kill":
            node.kill()
            time.sleep(OUTAGE)
            node.start()
        else:
            node.stop_app()
            time.sleep(OUTAGE)
            node.start_app()
        back = time.monotonic()
        before = done()
        print(f"\nc6: {before} of {n} executed when the node was back; queue {queued()}")
        wait_for(lambda: done() > before, 120, interval=0.01, message="tasks again")
        t_first = time.monotonic() - back
        wait_for(lambda: done() == n, 300, interval=0.2, message="all done")
        wait_for(lambda: sum(redis_client.exists(*keys[j:j + 2000]) for j in range(0, n, 2000)) == n, 120,
                 interval=0.2, message="every result stored")
        red = watch.stop()
        counts = {int(k): int(v) for k, v in redis_client.hgetall(marks).items()}
        metas = [json.loads(v) for j in range(0, n, 2000) for v in redis_client.mget(keys[j:j + 2000]) if v]
        dups = sum(c - 1 for c in counts.values() if c > 1)
        lost = n - len(counts)
        failed = sum(1 for m in metas if m["status"] != "SUCCESS")
        record(f"c6-{fault}", "rabbitmq node", f"{fault}, {OUTAGE:.0f} s, start", tasks=n, lost=lost, failed=failed,
               duplicates=dups, recovery_s=round(t_first, 2), health_red=red, prefetch_window=2 * prefetch)
        assert (lost, failed) == (0, 0)
        assert dups <= 2 * prefetch, f"duplicates {dups} above the prefetch window"
        assert red
    finally:
        node.destroy()
