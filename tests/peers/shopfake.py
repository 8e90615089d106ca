"""A fake Shopify Admin REST API on WireMock, for the catalog-ingestion / data-sync tests.

WireMock is static, so every page the fake can answer is precomputed: ``serve()`` turns a
dataset (products, orders, customers) into one stub per page per declared ``limit`` and
declared filter (``incremental_from`` values for ``updated_at_min``, ``since_ids`` for
``since_id``), items sorted by (updated_at, id) ascending (by id for ``since_id``).
Pages are linked with Shopify's ``Link`` header; ``page_info`` tokens are opaque base64url
JSON naming (resource, dataset version, filter, limit, page, direction).  A request the
fake has no stub for gets a 400 whose message says so, never a silent wrong answer.

Stub priorities (lower wins): 1 auth (401/403), 2 injected faults (429/500, WireMock
scenarios), 3-5 Shopify validation (limit>250, page_info plus a filter, unknown query
parameter), 6 data pages, 7-9 "no stub" fallbacks, 10 404.

Also: seeded fixtures (``make_catalog``, ``make_customers``, ``make_orders``,
``evolve_catalog``), the leaky-bucket replay ``check_leaky_bucket`` and ``signed_webhook``
(Shopify's webhook headers and HMAC).  Only dependency beyond the stdlib: ``requests``.
"""
from __future__ import annotations

import base64
import collections
import datetime as _dt
import glob
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.parse
import uuid

import requests as _rq

WIREMOCK_VERSION = "3.13.2"
NPM_PREFIX = os.path.expanduser(os.environ.get("CELERIAC_NPM_PREFIX", "~/.cache/celeriac/npm"))
API_VERSION = "2024-07"
CT_JSON = "application/json; charset=utf-8"
ERR_401 = "[API] Invalid API key or access token (unrecognized login or wrong password)"
ERR_403 = "[API] This action requires merchant approval for read_products scope."
ERR_429 = ("Exceeded 2 calls per second for api client. "
           "Reduce request rates to resume uninterrupted service.")
PAGINATION_DOC = "https://shopify.dev/api/usage/pagination-rest"
RESOURCES = ("products", "orders", "customers")
# Parameters that Shopify rejects next to page_info (each gets its own message).
PAGE_INFO_FORBIDDEN = ("status", "updated_at_min", "updated_at_max", "created_at_min",
                       "created_at_max", "since_id", "ids", "order", "vendor", "product_type",
                       "handle", "title", "financial_status", "fulfillment_status",
                       "published_status", "collection_id")
SHOP_TZ = _dt.timezone(_dt.timedelta(hours=-5))
BASE_TIME = _dt.datetime(2024, 1, 1, 9, 0, 0, tzinfo=SHOP_TZ)

Request = collections.namedtuple("Request", "t method url status")


# ---------------------------------------------------------------- install / lifecycle
def _java_major(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    ver = out.split('"')[1] if '"' in out else "0"
    parts = ver.split(".")
    return int(parts[1] if parts[0] == "1" else parts[0].split("-")[0] or 0)


def ensure_wiremock(version: str = WIREMOCK_VERSION, prefix: str | None = None) -> str:
    """Return the path of the WireMock standalone jar, installing npm ``wiremock@version``
    under ``prefix`` (default ~/.cache/celeriac/npm) when missing.  ``SHOPFAKE_WIREMOCK_JAR``
    overrides.  Raises RuntimeError naming what is missing (java, npm)."""
    java = shutil.which("java")
    if not java:
        raise RuntimeError("shopfake: `java` not found on PATH; WireMock needs Java 11+ "
                           "(Debian: apt-get install -y openjdk-17-jre-headless)")
    if _java_major(java) < 11:
        raise RuntimeError(f"shopfake: {java} is older than Java 11; WireMock 3 needs 11+")
    env_jar = os.environ.get("SHOPFAKE_WIREMOCK_JAR")
    if env_jar:
        if not os.path.isfile(env_jar):
            raise RuntimeError(f"shopfake: SHOPFAKE_WIREMOCK_JAR={env_jar} does not exist")
        return env_jar
    prefix = os.path.expanduser(prefix or NPM_PREFIX)
    jar = os.path.join(prefix, "node_modules", "wiremock", "build",
                       f"wiremock-standalone-{version}.jar")
    if os.path.isfile(jar):
        return jar
    npm = shutil.which("npm")
    if not npm:
        raise RuntimeError(f"shopfake: WireMock jar missing ({jar}) and `npm` not found on "
                           "PATH to install it (Debian: apt-get install -y npm), or set "
                           "SHOPFAKE_WIREMOCK_JAR to a wiremock-standalone jar")
    os.makedirs(prefix, exist_ok=True)
    res = subprocess.run([npm, "install", "--prefix", prefix, "--no-audit", "--no-fund",
                          "--loglevel=error", f"wiremock@{version}"],
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0 or not os.path.isfile(jar):
        found = glob.glob(os.path.join(prefix, "node_modules", "wiremock", "build", "*.jar"))
        raise RuntimeError(f"shopfake: `npm install wiremock@{version}` did not yield {jar} "
                           f"(rc={res.returncode}, found={found}):\n{res.stderr[-2000:]}")
    return jar


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- fixtures
def _ts(t: _dt.datetime) -> str:
    return t.replace(microsecond=0).isoformat()      # "2024-01-01T09:00:00-05:00"


def _epoch(s: str) -> float:
    return _dt.datetime.fromisoformat(s).timestamp()


def _ids(rng: random.Random, n: int, lo: int, taken: set | None = None) -> list[int]:
    seen = taken if taken is not None else set()
    out = []
    while len(out) < n:
        i = rng.randrange(lo, lo + 10**12)
        if i not in seen:
            seen.add(i)
            out.append(i)
    return out


def _batch_times(rng: random.Random, n: int, batch: int, start: _dt.datetime) -> list[str]:
    """One timestamp per item; every `batch` consecutive items share the same second."""
    out, t = [], start
    for b in range(0, n, batch):
        t = t + _dt.timedelta(minutes=rng.randint(5, 90), seconds=rng.randint(0, 59))
        out += [_ts(t)] * min(batch, n - b)
    return out


_ADJ = ["Classic", "Organic", "Vintage", "Urban", "Alpine", "Coastal", "Modern", "Rustic"]
_NOUN = ["Tee", "Hoodie", "Mug", "Backpack", "Candle", "Scarf", "Notebook", "Sneaker"]
_VENDORS = ["Acme Goods", "Northwind", "Blue Fern", "Kestrel & Co"]
_TYPES = ["Apparel", "Home", "Accessories", "Stationery"]
_TAGS = ["new", "sale", "summer", "winter", "eco", "bestseller", "limited"]
_SIZES = ["S", "M", "L", "XL"]
_FIRST = ["Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Linus"]
_LAST = ["Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Torvalds"]


def _product(rng, pid, i, updated_at, taken):
    title = f"{rng.choice(_ADJ)} {rng.choice(_NOUN)} {i}"
    handle = title.lower().replace(" ", "-")
    created = _ts(_dt.datetime.fromisoformat(updated_at) - _dt.timedelta(days=rng.randint(1, 400)))
    sizes = _SIZES[:rng.randint(1, 3)]
    vids = _ids(rng, len(sizes), 40_000_000_000_000, taken)
    variants = [{"id": vid, "product_id": pid, "title": sz, "price": f"{rng.randint(500, 15000) / 100:.2f}",
                 "sku": f"SKU-{i:05d}-{sz}", "position": k + 1, "inventory_quantity": rng.randint(0, 500),
                 "option1": sz, "created_at": created, "updated_at": updated_at}
                for k, (vid, sz) in enumerate(zip(vids, sizes))]
    images = [{"id": iid, "product_id": pid, "position": k + 1, "alt": None, "variant_ids": [],
               "src": f"https://cdn.shopify.com/s/files/1/0000/0001/files/{handle}-{k + 1}.jpg",
               "width": 1024, "height": rng.choice([768, 1024, 1365]),
               "created_at": created, "updated_at": updated_at}
              for k, iid in enumerate(_ids(rng, rng.randint(0, 2), 30_000_000_000_000, taken))]
    return {"id": pid, "title": title, "body_html": f"<p>{title}, made with care.</p>",
            "vendor": rng.choice(_VENDORS), "product_type": rng.choice(_TYPES), "handle": handle,
            "status": rng.choices(["active", "draft", "archived"], [85, 10, 5])[0],
            "tags": ", ".join(sorted(rng.sample(_TAGS, rng.randint(0, 3)))),
            "created_at": created, "updated_at": updated_at, "published_at": created,
            "template_suffix": None, "published_scope": "global",
            "admin_graphql_api_id": f"gid://shopify/Product/{pid}", "variants": variants,
            "options": [{"id": _ids(rng, 1, 20_000_000_000_000, taken)[0], "product_id": pid,
                         "name": "Size", "position": 1, "values": sizes}],
            "images": images, "image": images[0] if images else None}


def make_catalog(n_products: int = 1200, seed: int = 1, batch: int = 30,
                 start: _dt.datetime = BASE_TIME) -> list[dict]:
    """Products in Shopify REST shape; each run of `batch` products shares one updated_at
    second (ids random within it), so (updated_at, id) cursors get exercised."""
    rng, taken = random.Random(seed), set()
    pids = _ids(rng, n_products, 7_000_000_000_000, taken)
    times = _batch_times(rng, n_products, batch, start)
    return [_product(rng, pid, i, times[i], taken) for i, pid in enumerate(pids)]


def evolve_catalog(products: list[dict], seed: int = 2, changed: int = 60, removed: int = 15,
                   added: int = 25, at: str | None = None) -> list[dict]:
    """A deterministic next version of a catalog: `changed` products get a new title/price
    and updated_at `at` (default: one hour after the newest), `removed` vanish, `added` new
    ones appear with updated_at `at`.  The input is not modified."""
    rng = random.Random(seed)
    at = at or _ts(max(_dt.datetime.fromisoformat(p["updated_at"]) for p in products)
                   + _dt.timedelta(hours=1))
    out = json.loads(json.dumps(products))
    rng.shuffle(idx := list(range(len(out))))
    gone = set(idx[changed:changed + removed])
    for i in idx[:changed]:
        p = out[i]
        p["title"] += " (rev)"
        p["updated_at"] = at
        for v in p["variants"]:
            v["price"], v["updated_at"] = f"{rng.randint(500, 15000) / 100:.2f}", at
    out = [p for i, p in enumerate(out) if i not in gone]
    taken = {p["id"] for p in products}
    for k, pid in enumerate(_ids(rng, added, 7_000_000_000_000, taken)):
        out.append(_product(rng, pid, len(products) + k, at, taken))
    return out


def make_customers(n: int = 200, seed: int = 1, batch: int = 30) -> list[dict]:
    rng = random.Random(seed)
    ids, times = _ids(rng, n, 6_000_000_000_000), _batch_times(rng, n, batch, BASE_TIME)
    out = []
    for i, (cid, up) in enumerate(zip(ids, times)):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        created = _ts(_dt.datetime.fromisoformat(up) - _dt.timedelta(days=rng.randint(0, 300)))
        out.append({"id": cid, "email": f"{first}.{last}{i}@example.com".lower(),
                    "first_name": first, "last_name": last, "orders_count": rng.randint(0, 20),
                    "total_spent": f"{rng.randint(0, 200000) / 100:.2f}", "currency": "USD",
                    "state": "enabled", "verified_email": True, "tags": "",
                    "created_at": created, "updated_at": up,
                    "admin_graphql_api_id": f"gid://shopify/Customer/{cid}"})
    return out


def make_orders(n: int = 300, customers: list[dict] | None = None, seed: int = 1,
                products: list[dict] | None = None, batch: int = 30) -> list[dict]:
    """Orders in Shopify REST shape; line items point at `products` when given."""
    rng = random.Random(seed)
    customers = customers or make_customers(20, seed)
    ids, times = _ids(rng, n, 5_000_000_000_000), _batch_times(rng, n, batch, BASE_TIME)
    li_ids = iter(_ids(rng, n * 3, 13_000_000_000_000))
    out = []
    for i, (oid, up) in enumerate(zip(ids, times)):
        cust, items = rng.choice(customers), []
        for _ in range(rng.randint(1, 3)):
            if products:
                p = rng.choice(products)
                v = rng.choice(p["variants"])
                pid, vid, price, title = p["id"], v["id"], v["price"], p["title"]
            else:
                pid, vid = rng.randrange(7 * 10**12, 8 * 10**12), rng.randrange(4 * 10**13, 5 * 10**13)
                price, title = f"{rng.randint(500, 15000) / 100:.2f}", f"Item {pid % 1000}"
            items.append({"id": next(li_ids), "product_id": pid, "variant_id": vid,
                          "quantity": rng.randint(1, 4), "price": price, "title": title})
        total = sum(int(round(float(li["price"]) * 100)) * li["quantity"] for li in items)
        created = _ts(_dt.datetime.fromisoformat(up) - _dt.timedelta(hours=rng.randint(0, 72)))
        out.append({"id": oid, "name": f"#{1001 + i}", "order_number": 1001 + i,
                    "email": cust["email"], "created_at": created, "updated_at": up,
                    "financial_status": rng.choice(["paid", "paid", "pending", "refunded",
                                                    "partially_refunded", "authorized"]),
                    "fulfillment_status": rng.choice([None, None, "fulfilled", "partial"]),
                    "currency": "USD", "total_price": f"{total / 100:.2f}",
                    "subtotal_price": f"{total / 100:.2f}", "line_items": items,
                    "customer": {"id": cust["id"], "email": cust["email"]},
                    "admin_graphql_api_id": f"gid://shopify/Order/{oid}"})
    return out


# ---------------------------------------------------------------- leaky bucket, webhooks
def check_leaky_bucket(times, capacity: int = 40, leak_per_s: float = 2.0) -> float:
    """Replay request times (floats, or journal tuples whose [0] is the time) through
    Shopify's REST leaky bucket: each request adds 1, the bucket drains `leak_per_s`/s.
    Returns the highest level reached (a test asserts it stays <= capacity)."""
    ts = sorted(t[0] if isinstance(t, (tuple, list)) else float(t) for t in times)
    level = peak = 0.0
    prev = None
    for t in ts:
        if prev is not None:
            level = max(0.0, level - (t - prev) * leak_per_s)
        level += 1.0
        peak, prev = max(peak, level), t
    return peak


def signed_webhook(topic: str, payload: dict, secret: str | bytes, *,
                   shop_domain: str = "shopfake.myshopify.com", api_version: str = API_VERSION,
                   webhook_id: str | None = None, event_id: str | None = None,
                   triggered_at: str | None = None) -> tuple[dict, bytes]:
    """(headers, raw body) of a Shopify webhook delivery, e.g. topic "products/update" with
    the REST product as payload, "products/delete" with {"id": ...}.  The HMAC is
    base64(HMAC-SHA256(secret, raw body)); POST exactly these bytes."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    key = secret.encode() if isinstance(secret, str) else secret
    digest = base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()
    seed = hashlib.sha256(topic.encode() + b"\0" + body).digest()[:16]
    if triggered_at is None:
        now = _dt.datetime.now(_dt.timezone.utc)
        triggered_at = now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond:06d}000Z"
    return {"Content-Type": "application/json", "X-Shopify-Topic": topic,
            "X-Shopify-Hmac-Sha256": digest, "X-Shopify-Shop-Domain": shop_domain,
            "X-Shopify-API-Version": api_version,
            "X-Shopify-Webhook-Id": webhook_id or str(uuid.UUID(bytes=seed, version=4)),
            "X-Shopify-Event-Id": event_id or str(uuid.UUID(bytes=seed[::-1], version=4)),
            "X-Shopify-Triggered-At": triggered_at}, body


def verify_webhook(body: bytes, hmac_header: str, secret: str | bytes) -> bool:
    key = secret.encode() if isinstance(secret, str) else secret
    want = base64.b64encode(hmac.new(key, body, hashlib.sha256).digest()).decode()
    return hmac.compare_digest(want, hmac_header)


# ---------------------------------------------------------------- the fake
def _jregex_literal(s: str) -> str:
    """A Java regex matching `s` literally; '+' also matches ' ' (undecoded form posts)."""
    return "".join(c if c.isalnum() else "[+ ]" if c == "+" else "\\" + c for c in s)


class ShopFake:
    """WireMock-backed Shopify Admin REST fake; use as a context manager.

    Attributes after start: ``port``, ``base_url`` (http://127.0.0.1:PORT), ``root`` (the
    WireMock root dir), ``token``, ``forbidden_token``, ``version``."""

    def __init__(self, token: str = "shpat_test_token", forbidden_token: str = "shpat_forbidden",
                 version: str = API_VERSION, call_limit: str = "1/40", jar: str | None = None,
                 port: int | None = None, startup_timeout: float = 60.0):
        self.token, self.forbidden_token, self.version = token, forbidden_token, version
        self.call_limit, self.jar, self.port = call_limit, jar, port
        self.startup_timeout = startup_timeout
        self.proc = self.root = self.base_url = None
        self._http = _rq.Session()
        self._data: dict[str, dict] = {}
        self._first_ids: dict[str, list] = {}
        self._page_ids: dict[tuple, list] = {}
        self._faults = 0

    # -- lifecycle
    def __enter__(self) -> "ShopFake":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "ShopFake":
        jar = self.jar or ensure_wiremock()
        self.root = tempfile.mkdtemp(prefix="shopfake-")
        for d in ("mappings", "__files"):
            os.makedirs(os.path.join(self.root, d))
        want, err = self.port, ""
        for _ in range(3):
            port = want or _free_port()
            log = open(os.path.join(self.root, "wiremock.log"), "wb")
            self.proc = subprocess.Popen(
                ["java", "-XX:TieredStopAtLevel=1", "-jar", jar, "--port", str(port),
                 "--bind-address", "127.0.0.1", "--disable-banner", "--root-dir", self.root],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
            log.close()
            self.port, self.base_url = port, f"http://127.0.0.1:{port}"
            if self._wait_ready():
                self._install_static()
                return self
            with open(os.path.join(self.root, "wiremock.log"), errors="replace") as f:
                err = f.read()[-3000:]
            self._kill()
        self.stop()
        raise RuntimeError(f"shopfake: WireMock did not start; log tail:\n{err}")

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                if self._http.get(self.base_url + "/__admin/mappings", timeout=2).ok:
                    return True
            except _rq.RequestException:
                pass
            time.sleep(0.1)
        return False

    def _kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)

    def stop(self) -> None:
        self._kill()
        self._http.close()
        if self.root and not os.environ.get("SHOPFAKE_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)

    # -- admin helpers
    def _admin(self, method: str, path: str, body=None):
        r = self._http.request(method, self.base_url + "/__admin" + path, json=body, timeout=60)
        if r.status_code >= 300:
            raise RuntimeError(f"shopfake: WireMock admin {method} {path}: {r.status_code} {r.text[:500]}")
        return r.json() if r.content else None

    def _import(self, stubs: list[dict]) -> list[str]:
        for s in stubs:
            s.setdefault("id", str(uuid.uuid4()))
        self._admin("POST", "/mappings/import", {"mappings": stubs, "importOptions": {
            "duplicatePolicy": "OVERWRITE", "deleteAllNotInImport": False}})
        return [s["id"] for s in stubs]

    def _delete(self, ids) -> None:
        for i in ids:
            self._http.delete(f"{self.base_url}/__admin/mappings/{i}", timeout=30)

    def _headers(self, **extra) -> dict:
        return {"Content-Type": CT_JSON, "X-Shopify-Shop-Api-Call-Limit": self.call_limit,
                "X-Shopify-API-Version": self.version, **extra}

    def _resp(self, status: int, body, *, template=False, **headers) -> dict:
        r = {"status": status, "headers": self._headers(**headers),
             "body": body if isinstance(body, str) else json.dumps(body)}
        if template:
            r["transformers"] = ["response-template"]
        return r

    def path(self, resource: str) -> str:
        return f"/admin/api/{self.version}/{resource}.json"

    def url(self, resource: str = "products") -> str:
        return self.base_url + self.path(resource)

    def _install_static(self) -> None:
        v, s, present, absent = self.version, [], {"matches": ".*"}, {"absent": True}

        def add(prio, req, status, body, template=False, **hdrs):
            s.append({"priority": prio, "request": req,
                      "response": self._resp(status, body, template=template, **hdrs)})

        toks = "^(" + _jregex_literal(self.token) + "|" + _jregex_literal(self.forbidden_token) + ")$"
        for m, st, e in [(absent, 401, ERR_401), ({"doesNotMatch": toks}, 401, ERR_401),
                         ({"equalTo": self.forbidden_token}, 403, ERR_403)]:
            add(1, {"urlPathPattern": "/admin/.*", "headers": {"X-Shopify-Access-Token": m}}, st, {"errors": e})
        api = f"/admin/api/{v}/[a-z_]+\\.json"
        big = "0*([3-9][0-9]{2}|2[6-9][0-9]|25[1-9]|[1-9][0-9]{3,})"
        add(3, {"method": "GET", "urlPathPattern": api, "queryParameters": {"limit": {"matches": big}}},
            400, {"errors": {"limit": "Invalid value."}}, **{"X-Shopfake-Reason": "limit must be <= 250"})
        for p in PAGE_INFO_FORBIDDEN:
            msg = f"{p} cannot be passed when page_info is present. See {PAGINATION_DOC} for more information."
            add(3, {"method": "GET", "urlPathPattern": api,
                    "queryParameters": {"page_info": present, p: present}},
                400, {"errors": {p: msg}})
        only = "\\?(?:[^&]*&)*(?!(?:{})(?:=|&|$))[^&]+.*"     # a parameter not in {}
        add(4, {"method": "GET", "urlPattern": api + only.format("limit|fields|page_info"),
                "queryParameters": {"page_info": present}}, 400, {"errors": {"page_info": (
                    f"Only limit and fields can be passed when page_info is present. See {PAGINATION_DOC}")}})
        for r in RESOURCES:
            allowed = "limit|fields|page_info|updated_at_min|since_id" + ("|status" if r == "orders" else "")
            path = self.path(r)
            add(5, {"method": "GET", "urlPattern": path.replace(".", "\\.") + only.format(allowed)},
                400, {"errors": f"shopfake has no stub for this query parameter on {r}.json "
                                f"(it serves: {allowed.replace('|', ', ')})"})
            if r == "orders":
                for m in (absent, {"doesNotMatch": "any"}):
                    add(7, {"method": "GET", "urlPath": path,
                            "queryParameters": {"status": m, "page_info": absent}},
                        400, {"errors": "shopfake serves orders.json only with status=any"})
            add(8, {"method": "GET", "urlPath": path, "queryParameters": {"page_info": present}},
                400, {"errors": {"page_info": "Invalid value."}},
                **{"X-Shopfake-Reason": "no stub for this page_info+limit (follow the Link URL exactly)"})
            for q, kw in (("updated_at_min", "incremental_from"), ("since_id", "since_ids"),
                          ("limit", "limits")):
                add(8, {"method": "GET", "urlPath": path, "queryParameters": {q: present}},
                    400, {"errors": {q: f"shopfake has no stub for {q}={{{{request.query.{q}}}}}; "
                                        f"declare it with serve(..., {kw}=[...])"}}, template=True)
            add(9, {"method": "GET", "urlPath": path}, 400,
                {"errors": f"shopfake has no stub for this {r}.json request (was serve() called for it?)"})
        add(10, {"urlPattern": ".*"}, 404, {"errors": "Not Found"})
        self._import(s)

    # -- datasets
    def expected(self, resource: str = "products", updated_at_min: str | None = None,
                 since_id: int | None = None) -> list[dict]:
        """The items the fake serves for a filter, in served order."""
        items = self._data[resource]["items"]
        if since_id is not None:
            return sorted((i for i in items if i["id"] > int(since_id)), key=lambda i: i["id"])
        if updated_at_min is not None:
            lo = _epoch(updated_at_min)
            items = [i for i in items if _epoch(i["updated_at"]) >= lo]
        return sorted(items, key=lambda i: (_epoch(i["updated_at"]), i["id"]))

    def page_token(self, resource: str = "products", page: int = 1, limit: int = 250,
                   updated_at_min: str | None = None, since_id: int | None = None,
                   direction: str = "next", version: int | None = None) -> str:
        """The page_info that the Link header of the neighbouring page carries."""
        f = f"updated_at_min={updated_at_min}" if updated_at_min else (
            f"since_id={since_id}" if since_id is not None else "all")
        v = self._data[resource]["version"] if version is None else version
        raw = json.dumps({"r": resource, "v": v, "f": hashlib.sha1(f.encode()).hexdigest()[:10],
                          "l": limit, "p": page, "d": direction[0]}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    def serve(self, dataset, resource: str | None = None, *, incremental_from=(), since_ids=(),
              limits=(50, 250)) -> None:
        """Serve `dataset` (a list of `resource` items, default products, or a dict
        {resource: items}).  `incremental_from`: updated_at_min values to answer (exact
        strings); `since_ids`: since_id values; `limits`: page sizes to answer."""
        if isinstance(dataset, dict):
            for r, items in dataset.items():
                self.serve(items, r, incremental_from=incremental_from, since_ids=since_ids, limits=limits)
            return
        r = resource or "products"
        if r not in RESOURCES:
            raise ValueError(f"shopfake serves {RESOURCES}, not {r!r}")
        old = self._data.get(r)
        self._data[r] = d = {"version": (old["version"] + 1) if old else 1, "items": list(dataset),
                             "incremental_from": list(incremental_from), "since_ids": list(since_ids),
                             "limits": tuple(limits)}
        first, pages = [], []
        for uam, sid in [(None, None)] + [(t, None) for t in d["incremental_from"]] + [
                (None, int(x)) for x in d["since_ids"]]:
            sel = self.expected(r, uam, sid)
            for lim in d["limits"]:
                self._page_stubs(r, d["version"], sel, lim, uam, sid, first, pages)
        old_first, self._first_ids[r] = self._first_ids.get(r, []), self._import(first)
        self._delete(old_first)                 # after the import: no window without a first page
        self._page_ids[(r, d["version"])] = self._import(pages)

    def _page_stubs(self, r, version, sel, lim, uam, sid, first, pages) -> None:
        chunks = [sel[i:i + lim] for i in range(0, len(sel), lim)] or [[]]
        tok = lambda k, dr: self.page_token(r, k, lim, uam, sid, dr, version)  # noqa: E731
        absent, url = {"absent": True}, self.url(r)
        for k, chunk in enumerate(chunks):
            fname = f"{r}-v{version}-{hashlib.sha1(tok(k, 'n').encode()).hexdigest()[:12]}.json"
            with open(os.path.join(self.root, "__files", fname), "w") as f:
                json.dump({r: chunk}, f, separators=(",", ":"))
            link = [f'<{url}?limit={lim}&page_info={tok(j, dr)}>; rel="{rel}"'
                    for j, dr, rel in ((k - 1, "prev", "previous"), (k + 1, "next", "next"))
                    if 0 <= j < len(chunks)]
            resp = {"status": 200, "bodyFileName": fname,
                    "headers": self._headers(**({"Link": ", ".join(link)} if link else {}))}
            stub = lambda qp: {"priority": 6, "response": resp, "request": {  # noqa: E731
                "method": "GET", "urlPath": self.path(r), "queryParameters": qp},
                "metadata": {"shopfake": {"resource": r, "version": version, "page": k}}}
            if k == 0:
                qp = {"page_info": absent, "since_id": {"equalTo": str(sid)} if sid is not None else absent,
                      "updated_at_min": {"matches": _jregex_literal(uam)} if uam else absent,
                      **({"status": {"equalTo": "any"}} if r == "orders" else {})}
                first += [stub({**qp, "limit": lq})
                          for lq in [{"equalTo": str(lim)}] + ([absent] if lim == 50 else [])]
            pages += [stub({"page_info": {"equalTo": tok(k, dr)}, "limit": {"equalTo": str(lim)}})
                      for dr, ok in (("next", k > 0), ("prev", k < len(chunks) - 1)) if ok]

    def swap_dataset(self, new_items: list[dict], resource: str = "products", *, incremental_from=None,
                     since_ids=None, limits=None, drop_old_pages: bool = False) -> None:
        """Replace `resource`'s data (a new dataset version; declared filters and limits
        carry over unless given).  page_info tokens of older versions keep answering their
        old snapshot unless `drop_old_pages` (then they get 400 page_info Invalid value)."""
        d = self._data[resource]
        old_v = d["version"]
        self.serve(new_items, resource,
                   incremental_from=d["incremental_from"] if incremental_from is None else incremental_from,
                   since_ids=d["since_ids"] if since_ids is None else since_ids,
                   limits=d["limits"] if limits is None else limits)
        if drop_old_pages:
            for v in range(1, old_v + 1):
                self._delete(self._page_ids.pop((resource, v), []))

    # -- faults
    def _target(self, target, resource: str, limit: int) -> dict:
        if isinstance(target, int):
            if target == 0:
                qp = {"page_info": {"absent": True}, "updated_at_min": {"absent": True},
                      "since_id": {"absent": True}, "limit": {"equalTo": str(limit)}}
            else:
                qp = {"page_info": {"equalTo": self.page_token(resource, target, limit)}}
            return {"method": "GET", "urlPath": self.path(resource), "queryParameters": qp}
        u = urllib.parse.urlsplit(str(target))
        pi = urllib.parse.parse_qs(u.query).get("page_info")
        path = u.path if u.path.startswith("/") else self.path(u.path.removesuffix(".json"))
        req = {"method": "GET", "urlPath": path}
        if pi:
            req["queryParameters"] = {"page_info": {"equalTo": pi[0]}}
        return req

    def inject(self, target, status: int, body, times: int = 1, *, resource: str = "products",
               limit: int = 250, **headers) -> None:
        """The next `times` requests matching `target` answer `status`/`body`, then normal.
        target: a page index of the unfiltered `resource` walk at `limit` (0 = first page),
        a URL or path with page_info=..., a path, or a resource name ("products")."""
        self._faults += 1
        req, name = self._target(target, resource, limit), f"shopfake-fault-{self._faults}"
        self._import([{"priority": 2, "request": req, "scenarioName": name,
                       "requiredScenarioState": "Started" if i == 0 else f"hit{i}",
                       "newScenarioState": f"hit{i + 1}", "metadata": {"shopfake": {"kind": "fault"}},
                       "response": self._resp(status, body, **headers)} for i in range(times)])

    def inject_429(self, path_or_page, times: int = 1, retry_after: str = "2.0", **kw) -> None:
        self.inject(path_or_page, 429, {"errors": ERR_429}, times, **kw, **{
            "Retry-After": str(retry_after), "X-Shopify-Shop-Api-Call-Limit": "40/40"})

    def inject_500(self, path_or_page, times: int = 1, **kw) -> None:
        self.inject(path_or_page, 500, {"errors": "Internal Server Error"}, times, **kw)

    def reset(self) -> None:
        """Drop injected faults, reset scenarios, clear the journal; datasets stay."""
        self._admin("POST", "/mappings/remove-by-metadata",
                    {"matchesJsonPath": {"expression": "$.shopfake.kind", "equalTo": "fault"}})
        self._admin("POST", "/scenarios/reset")
        self._admin("DELETE", "/requests")

    # -- journal
    def requests(self, path_prefix: str | None = None) -> list[Request]:
        """The request journal, oldest first: (loggedDate in float seconds, method, url, status).
        path_prefix: a URL path prefix, or a resource name ("products")."""
        if path_prefix in RESOURCES:
            path_prefix = self.path(path_prefix)
        out = [Request(e["request"]["loggedDate"] / 1000.0, e["request"]["method"], e["request"]["url"],
                       (e.get("response") or {}).get("status"))
               for e in self._admin("GET", "/requests")["requests"]]
        return sorted((q for q in out if not path_prefix or q.url.startswith(path_prefix)), key=lambda q: q.t)

    check_leaky_bucket = staticmethod(check_leaky_bucket)
