"""Catalog ingestion and data-sync end to end: a Python Celery 5.7 client, celeriac workers, PostgreSQL (a
schema of the test's own, workers as the application role), and a fake Shopify Admin REST API on WireMock
(``tests/peers/shopfake.py``: cursor pagination through ``Link``, 429 with ``Retry-After``, 500s, tokens).

    s1  a full pass copies 1,200 products (variants, images) exactly; run again, everything is unchanged
    s2  an incremental pass takes what changed from the cursor; a full pass soft-deletes what is gone
    s3  429 with Retry-After and 500s mid-pass: the pass completes, the bucket never overflows
    s4  a refused token disables the source with a clear error
    s5  the worker SIGKILLed at random points of a multi-page pass, in a loop: the tables equal the fixture
    s6  two tenants ingest two shops in parallel and never see each other's rows
    s7  shop webhooks: verified, deduplicated, applied; a bad HMAC is refused and changes nothing
    s8  orders and customers, sync.status, sync.orders, and sync.dispatch skipping what runs
"""
import json
import random
import time
import urllib.request

import pytest

from interop_helpers import wait_for

pytestmark = pytest.mark.celeriac_only(reason="catalog and data-sync are celeriac's")

GET = 60
TOKEN = "shpat_test_token"


def set_source(domain, fake, slug, token=TOKEN, webhook_secret=None):
    env = dict(__import__("os").environ, SHOP_TOKEN=token, SHOP_WEBHOOK=webhook_secret or "")
    args = ["tenants", "set-source", slug, "--kind", "shopify", "--url", fake.base_url, "--token-env", "SHOP_TOKEN"]
    if webhook_secret:
        args += ["--webhook-secret-env", "SHOP_WEBHOOK"]
    import subprocess
    done = subprocess.run([domain.binary, "--config", str(domain.config), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def start_worker(workers, domain, *, sync=None, **kw):
    settings = domain.settings(sync={"page_size": 250, "lease": 5.0, **(sync or {})})
    return workers.start(settings=settings, **kw)


def call(app, queue, task, timeout=GET, **kwargs):
    return app.send_task(task, kwargs=kwargs, queue=queue).get(timeout=timeout)


def table(domain, sql):
    return domain.sql(sql)


def products_in_db(domain, tid):
    rows = domain.sql(f"SELECT external_id, title, vendor, src_updated_at, deleted_at IS NOT NULL "
                      f"FROM catalog_products WHERE tenant_id = '{tid}' ORDER BY external_id")
    return [(int(r[0]), r[1], r[2], r[4] == "t") for r in rows]


def fixture_rows(products):
    return sorted((p["id"], p["title"], p["vendor"], False) for p in products)


def assert_equals_fixture(domain, tid, products):
    assert products_in_db(domain, tid) == fixture_rows(products)
    n_variants = sum(len(p["variants"]) for p in products)
    n_images = sum(len(p["images"]) for p in products)
    assert domain.sql(f"SELECT count(*), count(DISTINCT external_id) FROM catalog_variants WHERE tenant_id = '{tid}'") == \
        [[str(n_variants), str(n_variants)]]
    assert domain.sql(f"SELECT count(*) FROM catalog_images WHERE tenant_id = '{tid}'") == [[str(n_images)]]
    sample = random.Random(5).sample(products, 5)
    for p in sample:
        got = domain.sql(f"SELECT price, sku FROM catalog_variants WHERE tenant_id = '{tid}' AND product_id = {p['id']} "
                         f"ORDER BY position, external_id")
        assert got == [[v["price"], v["sku"]] for v in sorted(p["variants"], key=lambda v: (v["position"], v["id"]))]


# ------------------------------------------------------------------ s1
def test_s1_full_pass_copies_the_catalog_exactly(workers, iso, client_app, domain, shop, secret_key):
    fake = shop()
    catalog = __import__("shopfake").make_catalog(1200, seed=1)
    fake.serve(catalog)
    tid = domain.add_tenant("acme")
    set_source(domain, fake, "acme")
    start_worker(workers, domain)
    got = call(client_app, iso.queue, "catalog.ingest", tenant_id="acme", mode="full")
    assert {k: got[k] for k in ("fetched", "upserted", "unchanged", "deleted", "pages")} == \
        {"fetched": 1200, "upserted": 1200, "unchanged": 0, "deleted": 0, "pages": 5}
    last = max(catalog, key=lambda p: (p["updated_at"], p["id"]))
    assert got["cursor"]["id"] == last["id"]
    assert_equals_fixture(domain, tid, catalog)
    again = call(client_app, iso.queue, "catalog.ingest", tenant_id="acme", mode="full")
    assert {k: again[k] for k in ("fetched", "upserted", "unchanged", "deleted")} == \
        {"fetched": 1200, "upserted": 0, "unchanged": 1200, "deleted": 0}
    # Images of new or changed products were queued for embedding (once per image and content).
    n_images = sum(len(p["images"]) for p in catalog)
    assert domain.sql(f"SELECT count(*) FROM catalog_embed_requests WHERE tenant_id = '{tid}'") == [[str(n_images)]]
    p = catalog[7]
    one = call(client_app, iso.queue, "catalog.product", tenant_id="acme", external_id=p["id"])
    assert (one["title"], len(one["variants"]), len(one["images"]), one["deleted"]) == \
        (p["title"], len(p["variants"]), len(p["images"]), False)
    page = call(client_app, iso.queue, "catalog.products", tenant_id="acme", query=p["title"], limit=5)
    assert p["title"] in [x["title"] for x in page["products"]]


# ------------------------------------------------------------------ s2
def test_s2_incremental_then_deletions(workers, iso, client_app, domain, shop, secret_key):
    sf = __import__("shopfake")
    fake = shop()
    v1 = sf.make_catalog(600, seed=2)
    fake.serve(v1)
    tid = domain.add_tenant("acme")
    set_source(domain, fake, "acme")
    start_worker(workers, domain)
    first = call(client_app, iso.queue, "catalog.ingest", tenant_id="acme", mode="full")
    cursor = first["cursor"]["updated_at"]
    v2 = sf.evolve_catalog(v1, seed=3, changed=40, removed=12, added=20)
    fake.swap_dataset(v2, incremental_from=[cursor])
    expected = fake.expected("products", cursor)
    inc = call(client_app, iso.queue, "catalog.ingest", tenant_id="acme")
    assert inc["fetched"] == len(expected)
    assert inc["upserted"] == 40 + 20 and inc["deleted"] == 0
    assert inc["unchanged"] == len(expected) - 60        # the overlap at the cursor's second
    full = call(client_app, iso.queue, "catalog.ingest", tenant_id="acme", mode="full")
    assert (full["deleted"], full["upserted"]) == (12, 0)
    live = [r for r in products_in_db(domain, tid) if not r[3]]
    assert sorted((r[0], r[1], r[2], False) for r in live) == fixture_rows(v2)
    gone = {p["id"] for p in v1} - {p["id"] for p in v2}
    deleted = call(client_app, iso.queue, "catalog.products", tenant_id="acme", include_deleted=True, limit=500)
    assert {int(x["external_id"]) for x in deleted["products"] if x["deleted"]} == gone
    assert call(client_app, iso.queue, "catalog.products", tenant_id="acme", limit=1)["total"] == len(v2)


# ------------------------------------------------------------------ s3
def test_s3_throttling_and_errors_mid_pass(workers, iso, client_app, domain, shop, secret_key):
    sf = __import__("shopfake")
    fake = shop()
    catalog = sf.make_catalog(1200, seed=4)
    fake.serve(catalog)
    fake.inject_429(1, times=2, retry_after="1.0", limit=50)
    fake.inject_500(5, times=2, limit=50)
    tid = domain.add_tenant("acme")
    set_source(domain, fake, "acme")
    start_worker(workers, domain, sync={"page_size": 50, "bucket_capacity": 12, "bucket_margin": 2, "leak_per_s": 4.0})
    got = call(client_app, iso.queue, "catalog.ingest", tenant_id="acme", mode="full")
    assert (got["fetched"], got["pages"]) == (1200, 24)
    assert_equals_fixture(domain, tid, catalog)
    calls = fake.requests("products")
    statuses = [c.status for c in calls]
    assert statuses.count(429) == 2 and statuses.count(500) == 2 and statuses.count(200) == 24
    # The 429s were honoured: the retry came at least Retry-After later.
    i = statuses.index(429)
    assert calls[i + 2].t - calls[i + 1].t >= 0.9 and calls[i + 1].t - calls[i].t >= 0.9
    assert sf.check_leaky_bucket([c.t for c in calls], capacity=12, leak_per_s=4.0) <= 12


# ------------------------------------------------------------------ s4
def test_s4_a_refused_token_disables_the_source(workers, iso, client_app, domain, shop, secret_key):
    fake = shop()
    fake.serve(__import__("shopfake").make_catalog(50, seed=5))
    domain.add_tenant("acme")
    set_source(domain, fake, "acme", token="wrong")
    start_worker(workers, domain)
    res = client_app.send_task("catalog.ingest", kwargs=dict(tenant_id="acme"), queue=iso.queue)
    with pytest.raises(Exception) as info:
        res.get(timeout=GET)
    assert type(info.value).__name__ == "SourceUnauthorized" and "(401)" in str(info.value)
    status = call(client_app, iso.queue, "sync.status", tenant_id="acme")
    assert status["source"]["enabled"] is False and "401" in status["source"]["last_error"]
    again = client_app.send_task("catalog.ingest", kwargs=dict(tenant_id="acme"), queue=iso.queue)
    with pytest.raises(Exception) as info:
        again.get(timeout=GET)
    assert type(info.value).__name__ == "SourceDisabled"
    assert len(fake.requests("products")) == 1, "a disabled source is not called"


# ------------------------------------------------------------------ s5
def test_s5_killed_anywhere_the_pass_resumes_exactly(workers, iso, client_app, domain, shop, secret_key):
    sf = __import__("shopfake")
    fake = shop()
    catalog = sf.make_catalog(1200, seed=6)
    fake.serve(catalog)
    tid = domain.add_tenant("acme")
    set_source(domain, fake, "acme")
    sync = {"page_size": 50, "lease": 2.0, "bucket_capacity": 40, "bucket_margin": 4, "leak_per_s": 12.0}
    opts = dict(acks_late=True, visibility_timeout=3, sync=sync)
    worker = start_worker(workers, domain, **opts)
    res = client_app.send_task("catalog.ingest", kwargs=dict(tenant_id="acme", mode="full"), queue=iso.queue)
    rng = random.Random(7)
    kills = 0
    for _ in range(5):
        time.sleep(rng.uniform(0.3, 1.2))
        if res.ready():
            break
        worker.kill()
        kills += 1
        worker = start_worker(workers, domain, **opts)
    got = res.get(timeout=120)
    assert got["fetched"] >= 1200 and got["pages"] >= 24
    assert_equals_fixture(domain, tid, catalog)
    assert domain.sql(f"SELECT count(*), count(DISTINCT external_id) FROM catalog_products WHERE tenant_id = '{tid}'") == \
        [["1200", "1200"]]
    calls = fake.requests("products")
    assert sf.check_leaky_bucket([c.t for c in calls], capacity=40, leak_per_s=12.0) <= 40
    print(f"\nsync kill loop: {kills} kills, {len(calls)} API calls for 24 pages, result {got}")


# ------------------------------------------------------------------ s6
def test_s6_two_tenants_two_shops_isolated(workers, iso, client_app, domain, shop, secret_key):
    sf = __import__("shopfake")
    a_shop, b_shop = shop(), shop()
    a_cat, b_cat = sf.make_catalog(300, seed=8), sf.make_catalog(200, seed=9)
    a_shop.serve(a_cat)
    b_shop.serve(b_cat)
    a, b = domain.add_tenant("shop-a"), domain.add_tenant("shop-b")
    set_source(domain, a_shop, "shop-a")
    set_source(domain, b_shop, "shop-b")
    start_worker(workers, domain, concurrency=4)
    ra = client_app.send_task("catalog.ingest", kwargs=dict(tenant_id="shop-a", mode="full"), queue=iso.queue)
    rb = client_app.send_task("catalog.ingest", kwargs=dict(tenant_id="shop-b", mode="full"), queue=iso.queue)
    assert (ra.get(timeout=GET)["fetched"], rb.get(timeout=GET)["fetched"]) == (300, 200)
    assert_equals_fixture(domain, a, a_cat)
    assert_equals_fixture(domain, b, b_cat)
    assert call(client_app, iso.queue, "catalog.products", tenant_id="shop-a", limit=1)["total"] == 300
    assert call(client_app, iso.queue, "catalog.products", tenant_id="shop-b", limit=1)["total"] == 200
    foreign = b_cat[0]["id"]
    assert call(client_app, iso.queue, "catalog.product", tenant_id="shop-a", external_id=foreign) is None


# ------------------------------------------------------------------ s7
def test_s7_shop_webhooks(workers, iso, client_app, domain, shop, secret_key, webhooks):
    sf = __import__("shopfake")
    fake = shop()
    catalog = sf.make_catalog(30, seed=10)
    fake.serve(catalog)
    domain.add_tenant("acme")
    set_source(domain, fake, "acme", webhook_secret="shop-webhook-secret")
    start_worker(workers, domain)
    call(client_app, iso.queue, "catalog.ingest", tenant_id="acme", mode="full")
    base = webhooks(domain.settings())

    def post(topic, payload, secret="shop-webhook-secret", webhook_id=None):
        headers, body = sf.signed_webhook(topic, payload, secret, **({"webhook_id": webhook_id} if webhook_id else {}))
        req = urllib.request.Request(base + "/webhooks/shopify/acme", data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    changed = dict(catalog[3], title="Renamed by webhook", updated_at="2030-01-01T00:00:00+00:00")
    assert post("products/update", changed, webhook_id="w-1") == (200, "upserted")
    assert post("products/update", changed, webhook_id="w-1") == (200, "duplicate")
    assert call(client_app, iso.queue, "catalog.product", tenant_id="acme", external_id=changed["id"])["title"] == \
        "Renamed by webhook"
    assert post("products/delete", {"id": catalog[4]["id"]}, webhook_id="w-2") == (200, "deleted")
    assert call(client_app, iso.queue, "catalog.product", tenant_id="acme", external_id=catalog[4]["id"])["deleted"] is True
    order = sf.make_orders(1, sf.make_customers(1, seed=1), seed=1)[0]
    assert post("orders/create", order, webhook_id="w-3") == (200, "upserted")
    assert [o["id"] for o in call(client_app, iso.queue, "sync.orders", tenant_id="acme")["orders"]] == [order["id"]]
    forged = dict(catalog[5], title="forged")
    assert post("products/update", forged, secret="wrong", webhook_id="w-4")[0] == 400
    assert call(client_app, iso.queue, "catalog.product", tenant_id="acme", external_id=catalog[5]["id"])["title"] == \
        catalog[5]["title"]


# ------------------------------------------------------------------ s8
def test_s8_orders_customers_status_and_dispatch(workers, iso, client_app, domain, shop, secret_key):
    sf = __import__("shopfake")
    fake = shop()
    customers = sf.make_customers(60, seed=11)
    orders = sf.make_orders(150, customers, seed=11)
    fake.serve({"products": sf.make_catalog(40, seed=11), "orders": orders, "customers": customers})
    domain.add_tenant("acme")
    set_source(domain, fake, "acme")
    start_worker(workers, domain, queues=[iso.queue, f"{iso.queue}.bulk"], sync={"dispatch_queue": f"{iso.queue}.bulk"})
    assert call(client_app, iso.queue, "sync.run", tenant_id="acme", stream="orders", mode="full")["fetched"] == 150
    assert call(client_app, iso.queue, "sync.run", tenant_id="acme", stream="customers", mode="full")["fetched"] == 60
    email = orders[0]["email"]
    mine = call(client_app, iso.queue, "sync.orders", tenant_id="acme", customer_email=email.upper())["orders"]
    assert sorted(o["id"] for o in mine) == sorted(o["id"] for o in orders if o["email"] == email)
    status = call(client_app, iso.queue, "sync.status", tenant_id="acme")
    by = {s["stream"]: s for s in status["streams"]}
    assert by["orders"]["last_counts"]["fetched"] == 150 and by["orders"]["last_error"] is None
    assert by["customers"]["lag_seconds"] < 60 and by["orders"]["running"] is False
    with pytest.raises(Exception) as info:
        client_app.send_task("sync.run", kwargs=dict(tenant_id="acme", stream="invoices"), queue=iso.queue).get(timeout=GET)
    assert type(info.value).__name__ == "ValueError"
    # The dispatcher: one run per stream of every tenant with a source, on the bulk queue.
    assert call(client_app, iso.queue, "sync.dispatch") == {"published": 3, "skipped_running": 0}
    wait_for(lambda: (s := call(client_app, iso.queue, "sync.status", tenant_id="acme")) and
             all(x["last_counts"] and x["running"] is False for x in s["streams"]) and len(s["streams"]) == 3,
             GET, interval=0.3, message="the dispatched runs")
