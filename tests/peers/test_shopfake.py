"""Tests of the fake Shopify Admin REST API (tests/peers/shopfake.py) with plain `requests`.

One WireMock for the module (catalog of 1,200 products, customers, orders), plus a second
short-lived one for swap_dataset and the lifecycle.  Run:
    ~/.cache/celeriac/venv/bin/python -m pytest -q tests/peers/test_shopfake.py
"""
import base64
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import sys
import time

import pytest
import requests

sys.path.insert(0, os.path.dirname(__file__))
import shopfake  # noqa: E402
from shopfake import ShopFake, check_leaky_bucket, make_catalog  # noqa: E402

TOKEN = "shpat_test_token"
CATALOG = make_catalog(1200, seed=1)
CUSTOMERS = shopfake.make_customers(120, seed=3)
ORDERS = shopfake.make_orders(260, CUSTOMERS, seed=4, products=CATALOG[:100])
# The updated_at shared by the batch of products 1050..1079: incremental pass from there.
SINCE = CATALOG[1050]["updated_at"]
SINCE_UTC = dt.datetime.fromisoformat(SINCE).astimezone(dt.timezone.utc).isoformat()  # "...+00:00"
SINCE_ID = sorted(p["id"] for p in CATALOG)[1000]
LINK_RE = re.compile(r'<(http://127\.0\.0\.1:\d+/admin/api/2024-07/(\w+)\.json\?limit=(\d+)'
                     r'&page_info=([A-Za-z0-9_-]+))>; rel="(next|previous)"')


@pytest.fixture(scope="module")
def fake():
    with ShopFake(token=TOKEN) as f:
        f.serve({"products": CATALOG, "customers": CUSTOMERS, "orders": ORDERS},
                incremental_from=[SINCE, SINCE_UTC], since_ids=[SINCE_ID])
        yield f


@pytest.fixture
def shop(fake):
    fake.reset()
    yield fake


def get(url, token=TOKEN, **params):
    return requests.get(url, params=params or None, timeout=30,
                        headers={"X-Shopify-Access-Token": token} if token else {})


def links(resp):
    out = {}
    for part in filter(None, (resp.headers.get("Link") or "").split(", ")):
        m = LINK_RE.fullmatch(part)
        assert m, f"Link part not in Shopify's format: {part!r}"
        out[m.group(5)] = m.group(1)
    return out


def walk(first_url, key, **params):
    pages, url, resp = [], first_url, None
    while url:
        resp = get(url, **(params if not pages else {}))
        assert resp.status_code == 200, resp.text
        pages.append((resp, resp.json()[key]))
        url = links(resp).get("next")
    return pages


def keyof(p):
    return (dt.datetime.fromisoformat(p["updated_at"]), p["id"])


def test_fixtures_deterministic_and_shaped():
    assert make_catalog(1200, seed=1) == CATALOG and make_catalog(1200, seed=2) != CATALOG
    assert len({p["id"] for p in CATALOG}) == 1200
    per_second = {}
    for p in CATALOG:
        per_second.setdefault(p["updated_at"], []).append(p["id"])
    assert max(len(v) for v in per_second.values()) == 30 and len(per_second) == 40
    batch = per_second[CATALOG[0]["updated_at"]]
    assert batch != sorted(batch), "ids in a same-second batch must not follow generation order"
    p = CATALOG[0]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", p["updated_at"])
    v = p["variants"][0]
    assert re.fullmatch(r"\d+\.\d\d", v["price"]) and v["product_id"] == p["id"]
    assert all(i["src"].startswith("https://") for q in CATALOG for i in q["images"])
    o = ORDERS[0]
    assert o["customer"]["id"] in {c["id"] for c in CUSTOMERS} and o["line_items"][0]["variant_id"]
    assert set(CUSTOMERS[0]) >= {"id", "email", "first_name", "last_name", "orders_count",
                                 "total_spent", "created_at", "updated_at"}


def test_pagination_walks_1200_products_in_5_pages(shop):
    pages = walk(shop.url("products"), "products", limit=250)
    assert [len(items) for _, items in pages] == [250, 250, 250, 250, 200]
    for k, (resp, _) in enumerate(pages):
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert resp.headers["X-Shopify-Shop-Api-Call-Limit"] == "1/40"
        rels = links(resp)
        assert set(rels) == {"next"} if k == 0 else {"previous"} if k == 4 else {"previous", "next"}
        for rel, url in rels.items():
            assert url.startswith(f"http://127.0.0.1:{shop.port}/admin/api/2024-07/products.json"
                                  "?limit=250&page_info=")
    # Exact header text on a middle page.
    prev_tok = shop.page_token("products", 0, 250, direction="prev")
    next_tok = shop.page_token("products", 2, 250)
    base = f"http://127.0.0.1:{shop.port}/admin/api/2024-07/products.json?limit=250&page_info="
    assert pages[1][0].headers["Link"] == (f'<{base}{prev_tok}>; rel="previous", '
                                           f'<{base}{next_tok}>; rel="next"')
    got = [p for _, items in pages for p in items]
    assert [keyof(p) for p in got] == sorted(keyof(p) for p in CATALOG)
    assert {p["id"] for p in got} == {p["id"] for p in CATALOG}
    # "previous" from page 2 gives page 1 again.
    back = get(links(pages[2][0])["previous"])
    assert [p["id"] for p in back.json()["products"]] == [p["id"] for p in pages[1][1]]
    # Default limit is 50 and the Link carries limit=50.
    r = get(shop.url("products"))
    assert len(r.json()["products"]) == 50 and "?limit=50&page_info=" in links(r)["next"]
    assert check_leaky_bucket(shop.requests("products")) <= 40


def test_customers_and_orders(shop):
    cust = walk(shop.url("customers"), "customers", limit=50)
    assert sum(len(i) for _, i in cust) == 120 and len(cust) == 3
    orders = walk(shop.url("orders"), "orders", limit=250, status="any")
    got = [o for _, items in orders for o in items]
    assert [keyof(o) for o in got] == sorted(keyof(o) for o in ORDERS)
    r = get(shop.url("orders"), limit=250)
    assert r.status_code == 400 and "status=any" in r.json()["errors"]


def test_incremental_stub_returns_exactly_newer_items(shop):
    want = sorted((p for p in CATALOG if dt.datetime.fromisoformat(p["updated_at"])
                   >= dt.datetime.fromisoformat(SINCE)), key=keyof)
    assert len(want) == 150
    pages = walk(shop.url("products"), "products", limit=50, updated_at_min=SINCE)
    assert [p["id"] for _, items in pages for p in items] == [p["id"] for p in want]
    assert len(pages) == 3
    # The same instant written in UTC: '+' sent encoded (%2B) or raw.
    utc = walk(shop.url("products"), "products", limit=250, updated_at_min=SINCE_UTC)
    assert [p["id"] for _, items in utc for p in items] == [p["id"] for p in want]
    raw = get(shop.url("products") + "?limit=250&updated_at_min=" + SINCE_UTC)
    assert raw.status_code == 200 and len(raw.json()["products"]) == 150
    by_id = walk(shop.url("products"), "products", limit=50, since_id=SINCE_ID)
    assert [p["id"] for _, items in by_id for p in items] == sorted(p["id"] for p in CATALOG)[1001:]
    r = get(shop.url("products"), limit=250, updated_at_min="2024-01-02T00:00:00-05:00")
    assert r.status_code == 400
    assert "no stub for updated_at_min=2024-01-02T00:00:00-05:00" in r.text


def test_429_then_success_with_retry_after(shop):
    shop.inject_429(1, times=2, retry_after="2.0")
    first = get(shop.url("products"), limit=250)
    nxt = links(first)["next"]
    for _ in range(2):
        r = get(nxt)
        assert r.status_code == 429 and r.headers["Retry-After"] == "2.0"
        assert r.json() == {"errors": shopfake.ERR_429}
        assert r.headers["X-Shopify-Shop-Api-Call-Limit"] == "40/40"
    r = get(nxt)
    assert r.status_code == 200 and len(r.json()["products"]) == 250
    assert [q.status for q in shop.requests("products")] == [200, 429, 429, 200]
    shop.inject_429(nxt, times=1, retry_after="1.5")     # by URL as well
    assert get(nxt).headers["Retry-After"] == "1.5" and get(nxt).status_code == 200


def test_500_injection(shop):
    shop.inject_500("products")
    assert get(shop.url("products"), limit=250).status_code == 500
    assert get(shop.url("products"), limit=250).status_code == 200
    shop.inject_500(0, times=1)
    assert get(shop.url("products"), limit=250).status_code == 500
    shop.reset()
    assert get(shop.url("products"), limit=250).status_code == 200


def test_auth_401_and_403(shop):
    for token in (None, "shpat_wrong"):
        r = get(shop.url("products"), token=token)
        assert r.status_code == 401
        assert r.json() == {"errors": "[API] Invalid API key or access token "
                                      "(unrecognized login or wrong password)"}
        assert r.headers["Content-Type"] == "application/json; charset=utf-8"
    assert get(shop.url("products"), token=shop.forbidden_token).status_code == 403


def test_limit_over_250_is_400(shop):
    assert get(shop.url("products"), limit=251).status_code == 400
    assert get(shop.url("products"), limit=1000).status_code == 400
    assert get(shop.url("products"), limit=250).status_code == 200
    r = get(shop.url("products"), limit=10)
    assert r.status_code == 400 and "no stub for limit=10" in r.text


def test_page_info_with_filter_is_400(shop):
    nxt = links(get(shop.url("products"), limit=250))["next"]
    r = get(nxt + "&updated_at_min=" + requests.utils.quote(SINCE, safe=""))
    assert r.status_code == 400
    assert r.json()["errors"]["updated_at_min"].startswith(
        "updated_at_min cannot be passed when page_info is present")
    onxt = links(get(shop.url("orders"), limit=250, status="any"))["next"]
    r = get(onxt + "&status=any")
    assert r.status_code == 400 and "status cannot be passed" in r.text
    assert get(onxt + "&fields=id,updated_at").status_code == 200
    assert get(shop.url("products"), limit=250, page_info="bogus").status_code == 400
    assert get(shop.url("products"), limit=250, vendor="Acme").status_code == 400
    assert get(shop.url("nonexistent")).status_code == 404


def test_swap_dataset_and_lifecycle():
    small = make_catalog(300, seed=7)
    with ShopFake(token=TOKEN) as f:
        f.serve(small, limits=(250,))
        before = [p["id"] for _, i in walk(f.url(), "products", limit=250) for p in i]
        old_next = links(get(f.url(), limit=250))["next"]
        new = shopfake.evolve_catalog(small, seed=9, changed=40, removed=10, added=20)
        at = max(p["updated_at"] for p in new)
        f.swap_dataset(new, incremental_from=[at])
        after = [p for _, i in walk(f.url(), "products", limit=250) for p in i]
        assert len(after) == 310 and [p["id"] for p in after] != before
        assert [keyof(p) for p in after] == sorted(keyof(p) for p in new)
        inc = [p for _, i in walk(f.url(), "products", limit=250, updated_at_min=at) for p in i]
        assert len(inc) == 60 and all(p["updated_at"] == at for p in inc)
        assert {p["id"] for p in inc} == {p["id"] for p in new} - ({p["id"] for p in small} - {
            p["id"] for p in new if p["title"].endswith("(rev)")})
        assert get(old_next).status_code == 200          # old snapshot's page still answers
        f.swap_dataset(new, drop_old_pages=True)
        assert get(old_next).json() == {"errors": {"page_info": "Invalid value."}}
        proc, port = f.proc, f.port
    assert proc.poll() is not None
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/__admin/mappings", timeout=2)


def test_bucket_checker_on_synthetic_timestamps():
    assert check_leaky_bucket([0.0] * 40) == 40
    assert check_leaky_bucket([0.0] * 41) == 41
    assert check_leaky_bucket([i * 0.5 for i in range(500)]) == 1          # exactly 2/s
    assert check_leaky_bucket([i * 0.25 for i in range(100)]) == pytest.approx(50.5)
    burst = [0.0] * 40 + [5.0 + i * 0.25 for i in range(30)]    # 5 s drains 10, then 4/s
    assert check_leaky_bucket(burst) == pytest.approx(45.5)
    assert check_leaky_bucket([(1.0, "GET", "/x", 200), (1.0, "GET", "/x", 200)]) == 2
    now = time.time()
    assert check_leaky_bucket([now, now + 10]) == 1


def test_signed_webhook():
    secret = "whsec_shopfake"
    headers, body = shopfake.signed_webhook("products/update", CATALOG[0], secret,
                                            triggered_at="2024-07-01T12:00:00.000000000Z")
    want = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()
    assert headers["X-Shopify-Hmac-Sha256"] == want
    assert headers["X-Shopify-Topic"] == "products/update"
    assert headers["X-Shopify-API-Version"] == "2024-07"
    assert headers["X-Shopify-Shop-Domain"] == "shopfake.myshopify.com"
    assert re.fullmatch(r"[0-9a-f-]{36}", headers["X-Shopify-Webhook-Id"])
    assert json.loads(body) == CATALOG[0]
    h2, b2 = shopfake.signed_webhook("products/delete", {"id": CATALOG[0]["id"]}, secret)
    assert b2 == f'{{"id":{CATALOG[0]["id"]}}}'.encode()
    assert shopfake.verify_webhook(b2, h2["X-Shopify-Hmac-Sha256"], secret)
    assert not shopfake.verify_webhook(b2 + b" ", h2["X-Shopify-Hmac-Sha256"], secret)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", h2["X-Shopify-Triggered-At"])
