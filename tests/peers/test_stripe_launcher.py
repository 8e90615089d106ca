"""Tests for stripe_launcher.py, the fake Stripe peer of the payment tasks.

They start the launcher as a subprocess on a free loopback port and speak
HTTP to it with the standard library only, the way async-stripe does (form
bodies, ``Authorization: Bearer``, ``Idempotency-Key``).  Every JSON answer
is also checked against the deserialization schema derived from async-stripe
1.0.0-rc.10 (``stripe_schema_rc10.json``).

Run: ``~/.cache/celeriac/venv/bin/python -m pytest tests/peers -q``
(needs ``pip install -r tests/peers/requirements-stripe.txt``).
"""

import hashlib
import hmac
import http.client
import http.server
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import stripe_launcher as sl  # noqa: E402

pytest.importorskip("localstripe")

API_KEY = "sk_test_celeriac"


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------

class Api:
    """Minimal Stripe client: form bodies, bearer auth, idempotency keys."""

    def __init__(self, base_url, api_key=API_KEY):
        self.base_url, self.api_key = base_url, api_key

    def call(self, method, path, params=None, key=None, api_key=None):
        url = self.base_url + path.lstrip("/")
        data = None
        if params is not None and method == "GET":
            url += "?" + urllib.parse.urlencode(params)
        elif params is not None:
            data = urllib.parse.urlencode(params).encode()
        headers = {"Authorization": "Bearer " + (api_key or self.api_key),
                   "Stripe-Version": sl.API_VERSION}
        if data is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if key:
            headers["Idempotency-Key"] = key
        req = urllib.request.Request(url, data=data, method=method,
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status, hdrs, raw = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, hdrs, raw = e.code, dict(e.headers), e.read()
        body = json.loads(raw)
        errs = sl.validate_body(body, status)
        assert not errs, "async-stripe would not parse %s %s: %s" % (
            method, path, errs)
        return status, hdrs, body


def pi_params(order_id, tenant="t1", amount=1000, pm="pm_card_visa",
              attempt=1, customer=None):
    """The parameters the Rust payment worker sends to create a charge."""
    params = [("amount", str(amount)), ("currency", "usd"),
              ("payment_method", pm), ("confirm", "true"),
              ("off_session", "true"),
              ("description", "celeriac order %s" % order_id),
              ("metadata[tenant_id]", tenant),
              ("metadata[order_id]", order_id),
              ("metadata[attempt]", str(attempt))]
    if customer:
        params.append(("customer", customer))
    return params


def pis_for(api, order_id):
    status, _, body = api.call("GET", "/v1/payment_intents",
                               [("limit", "100")])
    assert status == 200
    return [p for p in body["data"]
            if p["metadata"].get("order_id") == order_id]


class Receiver:
    """A local webhook endpoint recording what it receives."""

    def __init__(self, status=200):
        received = self.received = []
        lock = self.lock = threading.Lock()
        self.status = status
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                with lock:
                    received.append((dict(self.headers), raw))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                      Handler)
        self.url = "http://127.0.0.1:%d/stripe/webhook" % (
            self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever,
                         daemon=True).start()

    def events(self, type_=None):
        with self.lock:
            items = list(self.received)
        out = [(h, raw, json.loads(raw)) for h, raw in items]
        return [x for x in out if type_ is None or x[2]["type"] == type_]

    def wait_for(self, pred, timeout=10.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            found = [e for e in self.events() if pred(e[2])]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError("no matching webhook; got %s" % [
            e[2]["type"] for e in self.events()])

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def verify_signature(header, payload, secret, tolerance=300):
    """What async-stripe's ``Webhook::construct_event`` checks."""
    parts = [p.split("=", 1) for p in header.split(",")]
    t = int(dict(parts)["t"])
    v1 = [v for k, v in parts if k == "v1"]
    expected = hmac.new(secret.encode(), b"%d." % t + payload,
                        hashlib.sha256).hexdigest()
    assert any(hmac.compare_digest(expected, v) for v in v1), "bad signature"
    assert abs(time.time() - t) <= tolerance, "timestamp out of tolerance"


# --------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def launcher():
    with sl.StripeLauncher(webhook_delay=0.05, webhook_retry_delay=0.1) as s:
        yield s
        stats = s.stats()
    assert stats["schema_violations"] == 0, stats["schema_violation_samples"]


@pytest.fixture
def api(launcher):
    launcher.reset()
    return Api(launcher.base_url)


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def key():
    return "idem-" + uuid.uuid4().hex


# --------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------

def test_replay_same_key_same_params(api, launcher):
    k = key()
    s1, h1, b1 = api.call("POST", "/v1/payment_intents", pi_params("o-rep"),
                          key=k)
    s2, h2, b2 = api.call("POST", "/v1/payment_intents", pi_params("o-rep"),
                          key=k)
    assert s1 == s2 == 200
    assert "Idempotent-Replayed" not in h1
    assert h2["Idempotent-Replayed"] == "true"
    assert h2["Original-Request"] == h1["Request-Id"]
    assert b1 == b2
    assert [p["id"] for p in pis_for(api, "o-rep")] == [b1["id"]]
    assert launcher.stats()["idempotent_replays"] == 1


def test_same_key_other_params_is_idempotency_error(api, launcher):
    k = key()
    s1, _, b1 = api.call("POST", "/v1/payment_intents", pi_params("o-x"),
                         key=k)
    assert s1 == 200
    s2, h2, b2 = api.call("POST", "/v1/payment_intents",
                          pi_params("o-x", amount=2000), key=k)
    assert s2 == 400
    assert b2["error"]["type"] == "idempotency_error"
    assert b2["error"]["message"].startswith(
        "Keys for idempotent requests can only be used with the same "
        "parameters they were first used with")
    assert h2["Stripe-Should-Retry"] == "false"
    # Same key under another API key is another request.
    s3, _, b3 = api.call("POST", "/v1/payment_intents", pi_params("o-x"),
                         key=k, api_key="sk_test_other_account")
    assert s3 == 200 and b3["id"] != b1["id"]
    assert len(pis_for(api, "o-x")) == 2
    assert launcher.stats()["idempotency_errors"] == 1


def test_fields_async_stripe_requires(api):
    # The required (non-Option) fields derived from async-stripe rc.10.
    assert sl.required_fields("PaymentIntent") == [
        "amount", "amount_capturable", "amount_received", "capture_method",
        "confirmation_method", "created", "currency", "id", "livemode",
        "metadata", "payment_method_types", "status"]
    assert sl.required_fields("Event") == [
        "created", "data", "id", "livemode", "pending_webhooks", "type"]
    assert sl.required_fields("ApiErrors") == ["type"]
    cus = api.call("POST", "/v1/customers", [("email", "a@example.com")])[2]
    s, _, pi = api.call("POST", "/v1/payment_intents",
                        pi_params("o-f", customer=cus["id"]), key=key())
    assert s == 200 and pi["status"] == "succeeded"
    for f in sl.required_fields("PaymentIntent"):
        assert pi.get(f) is not None, f
    assert isinstance(pi["latest_charge"], str)
    assert pi["amount_received"] == 1000 and pi["amount_capturable"] == 0
    assert pi["description"] == "celeriac order o-f"
    assert pi["metadata"] == {"tenant_id": "t1", "order_id": "o-f",
                              "attempt": "1"}
    assert sl.validate(pi, "PaymentIntent") == []
    s, _, got = api.call("GET", "/v1/payment_intents/" + pi["id"])
    assert got == pi
    s, _, exp = api.call("GET", "/v1/payment_intents/" + pi["id"],
                         [("expand[]", "latest_charge")])
    assert exp["latest_charge"]["id"] == pi["latest_charge"]
    ch = api.call("GET", "/v1/charges/" + pi["latest_charge"])[2]
    assert sl.validate(ch, "Charge") == []
    assert ch["amount_captured"] == 1000 and ch["disputed"] is False
    assert ch["payment_method_details"]["card"]["last4"] == "4242"
    events = api.call("GET", "/v1/events")[2]
    assert sl.validate(events, "List<Event>") == []
    assert {e["type"] for e in events["data"]} >= {
        "payment_intent.succeeded", "customer.created"}
    s, _, missing = api.call("GET", "/v1/payment_intents/pi_missing")
    assert s == 404 and missing["error"]["code"] == "resource_missing"
    # A body without the filled fields would not deserialize:
    assert sl.validate({"id": "pi_1", "object": "payment_intent"},
                       "PaymentIntent")


def test_search_by_metadata(api):
    ids = {}
    for order, tenant in (("o-1", "t1"), ("o-2", "t1"), ("o-2", "t2")):
        ids[order, tenant] = api.call(
            "POST", "/v1/payment_intents", pi_params(order, tenant),
            key=key())[2]["id"]
    api.call("POST", "/v1/payment_intents",
             pi_params("o-3", "t1", pm="pm_card_chargeCustomerFail"),
             key=key())
    q = "metadata['order_id']:'o-2' AND metadata['tenant_id']:'t1'"
    s, _, res = api.call("GET", "/v1/payment_intents/search", [("query", q)])
    assert s == 200
    assert res["object"] == "search_result"
    assert res["url"] == "/v1/payment_intents/search"
    assert res["has_more"] is False and res["next_page"] is None
    assert [p["id"] for p in res["data"]] == [ids["o-2", "t1"]]
    assert sl.validate(res, "SearchList<PaymentIntent>") == []
    q = "status:'succeeded' AND metadata[\"tenant_id\"]:\"t1\""
    res = api.call("GET", "/v1/payment_intents/search", [("query", q)])[2]
    assert sorted(p["id"] for p in res["data"]) == sorted(
        [ids["o-1", "t1"], ids["o-2", "t1"]])
    res = api.call("GET", "/v1/payment_intents/search",
                   [("query", "status:'requires_payment_method'")])[2]
    assert [p["metadata"]["order_id"] for p in res["data"]] == ["o-3"]
    # paging: newest first, one at a time
    seen, page = [], None
    while True:
        params = [("query", "metadata['tenant_id']:'t1'"), ("limit", "1")]
        if page:
            params.append(("page", page))
        res = api.call("GET", "/v1/payment_intents/search", params)[2]
        seen += [p["id"] for p in res["data"]]
        page = res["next_page"]
        if not res["has_more"]:
            break
    assert len(seen) == 3 and len(set(seen)) == 3
    s, _, bad = api.call("GET", "/v1/payment_intents/search",
                         [("query", "nonsense_field:'x'")])
    assert s == 400 and bad["error"]["type"] == "invalid_request_error"


def test_fail_first_is_not_processed(api, launcher):
    launcher.configure(fail_first_ratio=1)
    k = key()
    s1, h1, b1 = api.call("POST", "/v1/payment_intents", pi_params("o-ff"),
                          key=k)
    assert s1 == 500 and b1["error"]["type"] == "api_error"
    assert h1["Stripe-Should-Retry"] == "true"
    assert pis_for(api, "o-ff") == []
    s2, h2, b2 = api.call("POST", "/v1/payment_intents", pi_params("o-ff"),
                          key=k)
    assert s2 == 200 and "Idempotent-Replayed" not in h2
    s3, h3, b3 = api.call("POST", "/v1/payment_intents", pi_params("o-ff"),
                          key=k)
    assert h3["Idempotent-Replayed"] == "true" and b3["id"] == b2["id"]
    assert [p["id"] for p in pis_for(api, "o-ff")] == [b2["id"]]
    assert launcher.stats()["injected_failures"] == 1


def test_lose_response_processed_once_then_replayed(api, launcher):
    launcher.configure(lose_response_ratio=1)
    k = key()
    s1, _, b1 = api.call("POST", "/v1/payment_intents", pi_params("o-lr"),
                         key=k)
    assert s1 == 500 and b1["error"]["type"] == "api_error"
    created = pis_for(api, "o-lr")
    assert len(created) == 1 and created[0]["status"] == "succeeded"
    s2, h2, b2 = api.call("POST", "/v1/payment_intents", pi_params("o-lr"),
                          key=k)
    assert s2 == 200 and h2["Idempotent-Replayed"] == "true"
    assert b2["id"] == created[0]["id"]
    assert len(pis_for(api, "o-lr")) == 1
    assert launcher.stats()["lost_responses"] == 1


def test_lose_response_drop_mode(api, launcher):
    launcher.configure(lose_response_ratio=1, lose_mode="drop")
    k = key()
    with pytest.raises((ConnectionError, http.client.HTTPException,
                        urllib.error.URLError)):
        api.call("POST", "/v1/payment_intents", pi_params("o-drop"), key=k)
    assert len(pis_for(api, "o-drop")) == 1
    s, h, b = api.call("POST", "/v1/payment_intents", pi_params("o-drop"),
                       key=k)
    assert s == 200 and h["Idempotent-Replayed"] == "true"
    assert b["id"] == pis_for(api, "o-drop")[0]["id"]


def test_fault_selection_is_deterministic_by_key(launcher):
    keys = ["order-%d-attempt-1" % i for i in range(400)]
    chosen = [k for k in keys if sl.fault_selected("fail-first", k, 0.25)]
    assert 60 < len(chosen) < 140
    assert chosen == [k for k in keys
                      if sl.fault_selected("fail-first", k, 0.25)]
    other = [k for k in keys
             if sl.fault_selected("fail-first", k, 0.25, seed="s2")]
    assert other != chosen
    with sl.StripeLauncher(fail_first_ratio=0.25) as s:
        api = Api(s.base_url)
        for k in keys[:12]:
            status = api.call("POST", "/v1/payment_intents",
                              pi_params(k), key=k)[0]
            assert (status == 500) == (k in chosen), k


def test_declined_card_is_card_error_with_decline_code(api, launcher,
                                                       receiver):
    launcher.register_webhook(receiver.url, "whsec_test",
                              ["payment_intent.payment_failed"])
    k = key()
    s, h, b = api.call("POST", "/v1/payment_intents",
                       pi_params("o-dec", pm="pm_card_chargeCustomerFail"),
                       key=k)
    assert s == 402
    err = b["error"]
    assert err["type"] == "card_error"
    assert err["code"] == "card_declined"
    assert err["decline_code"] == "generic_decline"
    assert err["charge"].startswith("ch_")
    pi = err["payment_intent"]
    assert pi["status"] == "requires_payment_method"
    assert pi["last_payment_error"]["decline_code"] == "generic_decline"
    assert sl.validate(pi, "PaymentIntent") == []
    # replayed with the same key, as Stripe stores 402 results
    s2, h2, b2 = api.call("POST", "/v1/payment_intents",
                          pi_params("o-dec", pm="pm_card_chargeCustomerFail"),
                          key=k)
    assert s2 == 402 and h2["Idempotent-Replayed"] == "true" and b2 == b
    assert len(pis_for(api, "o-dec")) == 1
    for pm, code, dc in (
            ("pm_card_visa_chargeDeclinedInsufficientFunds", "card_declined",
             "insufficient_funds"),
            ("pm_card_chargeDeclinedExpiredCard", "expired_card", None),
            ("pm_card_authenticationRequired", "authentication_required",
             "authentication_required")):
        s, _, b = api.call("POST", "/v1/payment_intents",
                           pi_params("o-" + pm, pm=pm), key=key())
        assert s == 402 and b["error"]["type"] == "card_error", pm
        assert b["error"]["code"] == code, pm
        assert b["error"].get("decline_code") == dc, pm
    launcher.configure(decline_payment_methods={"pm_celeriac_nofunds":
                                                "insufficient_funds"})
    s, _, b = api.call("POST", "/v1/payment_intents",
                       pi_params("o-custom", pm="pm_celeriac_nofunds"),
                       key=key())
    assert s == 402 and b["error"]["decline_code"] == "insufficient_funds"
    hooks = receiver.wait_for(
        lambda e: e["data"]["object"]["metadata"].get("order_id") == "o-dec")
    obj = hooks[0][2]["data"]["object"]
    assert obj["last_payment_error"]["decline_code"] == "generic_decline"


def test_refund_with_idempotency_key(api, launcher):
    pi = api.call("POST", "/v1/payment_intents", pi_params("o-ref"),
                  key=key())[2]
    k = key()
    params = [("payment_intent", pi["id"]), ("amount", "300"),
              ("metadata[tenant_id]", "t1"), ("metadata[order_id]", "o-ref")]
    s1, _, r1 = api.call("POST", "/v1/refunds", params, key=k)
    s2, h2, r2 = api.call("POST", "/v1/refunds", params, key=k)
    assert s1 == s2 == 200 and h2["Idempotent-Replayed"] == "true"
    assert r1 == r2 and r1["status"] == "succeeded" and r1["amount"] == 300
    assert r1["payment_intent"] == pi["id"]
    assert sl.validate(r1, "Refund") == []
    refunds = api.call("GET", "/v1/refunds",
                       [("payment_intent", pi["id"])])[2]
    assert [r["id"] for r in refunds["data"]] == [r1["id"]]
    s, _, b = api.call("POST", "/v1/refunds",
                       [("payment_intent", pi["id"]), ("amount", "800")],
                       key=key())
    assert s == 400 and b["error"]["code"] == "amount_too_large"
    ch = api.call("GET", "/v1/charges/" + pi["latest_charge"])[2]
    assert ch["amount_refunded"] == 300 and ch["refunded"] is False


def test_webhooks_signed_and_complete(api, launcher, receiver):
    secret = launcher.register_webhook(receiver.url)["secret"]
    assert secret.startswith("whsec_")
    k = key()
    pi = api.call("POST", "/v1/payment_intents", pi_params("o-wh"),
                  key=k)[2]
    api.call("POST", "/v1/refunds", [("payment_intent", pi["id"]),
                                     ("amount", "1000")], key=key())
    dispute = launcher.create_dispute(payment_intent=pi["id"])
    assert dispute["charge"] == pi["latest_charge"]
    for type_, rust_type in (("payment_intent.succeeded", "PaymentIntent"),
                             ("charge.refunded", "Charge"),
                             ("charge.dispute.created", "Dispute")):
        headers, raw, ev = receiver.wait_for(
            lambda e, t=type_: e["type"] == t and pi["id"] in (
                e["data"]["object"].get("id"),
                e["data"]["object"].get("payment_intent")))[0]
        verify_signature(headers["Stripe-Signature"], raw, secret)
        assert ev["object"] == "event" and ev["livemode"] is False
        assert isinstance(ev["pending_webhooks"], int)
        assert ev["pending_webhooks"] >= 1
        assert ev["api_version"] == sl.API_VERSION
        assert sl.validate(ev, "Event") == []
        assert sl.validate(ev["data"]["object"], rust_type) == [], type_
    succeeded = receiver.events("payment_intent.succeeded")[0][2]
    assert succeeded["request"]["idempotency_key"] == k
    assert succeeded["data"]["object"]["id"] == pi["id"]
    refunded = receiver.events("charge.refunded")[0][2]["data"]["object"]
    assert refunded["refunded"] is True and refunded["amount_refunded"] == 1000
    # A tampered payload does not verify.
    headers, raw, _ = receiver.events("payment_intent.succeeded")[0]
    with pytest.raises(AssertionError):
        verify_signature(headers["Stripe-Signature"], raw + b" ", secret)
    ch = api.call("GET", "/v1/charges/" + pi["latest_charge"])[2]
    assert ch["disputed"] is True
    got = api.call("GET", "/v1/disputes/" + dispute["id"])[2]
    assert sl.validate(got, "Dispute") == []
    stats = launcher.stats()["webhooks"]
    assert stats["delivered"] >= 3


def test_webhook_retries_until_2xx(api, launcher):
    failing = Receiver(status=500)
    try:
        launcher.register_webhook(failing.url, "whsec_retry",
                                  ["payment_intent.succeeded"])
        api.call("POST", "/v1/payment_intents", pi_params("o-retry"),
                 key=key())
        deadline = time.time() + 10
        while time.time() < deadline and len(failing.events()) < 4:
            time.sleep(0.05)
        assert len(failing.events()) == 4  # 1 try + 3 retries
        ids = {e[2]["id"] for e in failing.events()}
        assert len(ids) == 1
        deadline = time.time() + 5
        while time.time() < deadline and not launcher.stats()[
                "webhooks"]["gave_up"]:
            time.sleep(0.05)
        assert launcher.stats()["webhooks"]["gave_up"] == 1
    finally:
        failing.close()


def test_stats_and_cli(launcher):
    with sl.StripeLauncher(fail_first_ratio=1, lose_response_ratio=0,
                           decline_payment_method=["pm_x=lost_card"]) as s:
        api = Api(s.base_url)
        k = key()
        assert api.call("POST", "/v1/payment_intents", pi_params("o-cli"),
                        key=k)[0] == 500
        assert api.call("POST", "/v1/payment_intents", pi_params("o-cli"),
                        key=k)[0] == 200
        k2 = key()
        assert api.call("POST", "/v1/payment_intents",
                        pi_params("o-cli2", pm="pm_x"), key=k2)[0] == 500
        s402, _, b = api.call("POST", "/v1/payment_intents",
                              pi_params("o-cli2", pm="pm_x"), key=k2)
        assert s402 == 402 and b["error"]["decline_code"] == "lost_card"
        assert len(pis_for(api, "o-cli")) == 1
        stats = s.stats()
        assert stats["injected_failures"] == 2
        assert stats["requests"]["POST /v1/payment_intents"] == {
            "500": 2, "200": 1, "402": 1}
        assert stats["requests"]["GET /v1/payment_intents"] == {"200": 1}
        assert stats["schema_violations"] == 0
