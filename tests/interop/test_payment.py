"""The payment task family end to end: a Python Celery 5.7 client, celeriac workers, PostgreSQL (a schema of
the test's own, workers as the application role), ``celeriac webhooks`` and the Stripe-compatible launcher of
``tests/peers/stripe_launcher.py`` (localstripe with Stripe's idempotency keys, search, declines, faults).

    p1  a charge succeeds; re-published, it answers from the row (replayed) and Stripe holds one PaymentIntent
    p2  a declined card fails with CardDeclined(decline code); a new attempt needs the next number
    p3  bad input fails at once with ValueError naming the field; an unknown tenant with UnknownTenant
    p4  500s before and after Stripe processed a request: retries send the same key, one PaymentIntent
    p5  refunds: replayed by refund_id, never more than was charged, the default is the rest
    p6  webhooks: signed events applied once, duplicates and out-of-order deliveries change nothing, a bad
        signature is refused and stores nothing
    p7  200 orders, each published four times, two acks_late workers, one SIGKILLed in a loop, 20 % of first
        requests answered 500: one succeeded PaymentIntent per order; random refunds never exceed the charge
    p8  a charge left unfinished past the key's lifetime is reconciled by its metadata, not charged again
"""
import collections
import hashlib
import hmac
import json
import random
import time
import urllib.parse
import urllib.request

import pytest

from interop_helpers import wait_for

pytestmark = pytest.mark.celeriac_only(reason="the payment task family is celeriac's")

GET = 30
SECRET = "sk_test_celeriac"
WEBHOOK_SECRET = "whsec_celeriac_test"


def section(launcher, **extra):
    return {"api_base": launcher.base_url, "secret_key": SECRET, "webhook_secret": WEBHOOK_SECRET,
            "retry_backoff": 0.1, "retry_backoff_max": 0.5, "request_timeout": 5.0, "claim_lease": 10.0, **extra}


def start_worker(workers, domain, launcher, *, payment=None, **kw):
    settings = domain.settings(payment=section(launcher, **(payment or {})))
    return workers.start(settings=settings, **kw)


def charge(app, queue, order, amount=1000, pm="pm_card_visa", tenant="acme", **kw):
    return app.send_task("payment.charge", kwargs=dict(tenant_id=tenant, order_id=order, amount=amount,
                                                       currency="usd", payment_method=pm, **kw), queue=queue)


def call(app, queue, task, **kwargs):
    return app.send_task(task, kwargs=kwargs, queue=queue).get(timeout=GET)


def raises(result):
    with pytest.raises(Exception) as info:
        result.get(timeout=GET)
    return type(info.value).__name__, info.value.args


def stripe_get(launcher, path, **params):
    url = launcher.base_url + "v1/" + path + ("?" + urllib.parse.urlencode(params) if params else "")
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {SECRET}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def intents_by_order(launcher, tenant_id):
    """Every PaymentIntent at the launcher for this tenant, grouped by metadata.order_id."""
    out = collections.defaultdict(list)
    page = None
    while True:
        params = {"query": f"metadata['tenant_id']:'{tenant_id}'", "limit": 100}
        if page:
            params["page"] = page
        res = stripe_get(launcher, "payment_intents/search", **params)
        for pi in res["data"]:
            out[pi["metadata"]["order_id"]].append(pi)
        if not res.get("has_more"):
            return out
        page = res["next_page"]


# ------------------------------------------------------------------ p1
def test_p1_charge_then_replays(workers, iso, client_app, domain, stripe):
    launcher = stripe()
    tid = domain.add_tenant("acme")
    start_worker(workers, domain, launcher)
    first = charge(client_app, iso.queue, "o-1", metadata={"cart": "c9"}, description="Order 1").get(timeout=GET)
    assert first["status"] == "succeeded" and first["replayed"] is False
    assert (first["amount"], first["currency"]) == (1000, "usd") and first["payment_intent"].startswith("pi_")
    again = charge(client_app, iso.queue, "o-1", metadata={"cart": "c9"}, description="Order 1").get(timeout=GET)
    assert again == {**first, "replayed": True}
    intents = intents_by_order(launcher, tid)
    assert list(intents) == ["o-1"] and len(intents["o-1"]) == 1
    pi = intents["o-1"][0]
    assert pi["metadata"] == {"cart": "c9", "tenant_id": tid, "order_id": "o-1", "attempt": "1"}
    assert pi["status"] == "succeeded" and pi["amount"] == 1000
    status = call(client_app, iso.queue, "payment.status", tenant_id="acme", order_id="o-1")
    assert {k: status[k] for k in ("status", "payment_intent", "amount", "currency", "refunded")} == \
        {"status": "succeeded", "payment_intent": first["payment_intent"], "amount": 1000, "currency": "usd",
         "refunded": 0}
    assert status["attempts"] == [{"attempt": 1, "status": "succeeded", "payment_intent": first["payment_intent"],
                                   "decline_code": None, "tries": 1}]
    assert call(client_app, iso.queue, "payment.status", tenant_id="acme", order_id="nope") is None
    # Changing a charge's parameters under the same attempt is refused, nothing sent.
    assert raises(charge(client_app, iso.queue, "o-1", amount=999))[0] == "ValueError"
    assert len(intents_by_order(launcher, tid)["o-1"]) == 1


# ------------------------------------------------------------------ p2
def test_p2_declined_card_then_a_new_attempt(workers, iso, client_app, domain, stripe):
    launcher = stripe()
    tid = domain.add_tenant("acme")
    start_worker(workers, domain, launcher)
    name, args = raises(charge(client_app, iso.queue, "o-2", pm="pm_card_visa_chargeDeclinedInsufficientFunds"))
    assert name == "CardDeclined" and args[0] == "insufficient_funds", args
    # A re-publish of the declined attempt answers the same decline without calling Stripe.
    before = launcher.stats()
    assert raises(charge(client_app, iso.queue, "o-2", pm="pm_card_visa_chargeDeclinedInsufficientFunds"))[1][0] == \
        "insufficient_funds"
    assert launcher.stats()["requests"] == before["requests"], "answered from the row, Stripe not called"
    ok = charge(client_app, iso.queue, "o-2", attempt=2).get(timeout=GET)
    assert ok["status"] == "succeeded"
    name, args = raises(charge(client_app, iso.queue, "o-2", attempt=3))
    assert name == "LiveCharge" and "attempt 2 is succeeded" in args[0]
    status = call(client_app, iso.queue, "payment.status", tenant_id="acme", order_id="o-2")
    assert [(a["attempt"], a["status"], a["decline_code"]) for a in status["attempts"]] == \
        [(1, "declined", "insufficient_funds"), (2, "succeeded", None)]
    assert status["status"] == "succeeded"
    assert sorted(pi["status"] for pi in intents_by_order(launcher, tid)["o-2"]) == \
        ["requires_payment_method", "succeeded"]


# ------------------------------------------------------------------ p3
def test_p3_bad_input_fails_at_once(workers, iso, client_app, domain, stripe):
    launcher = stripe()
    tid = domain.add_tenant("acme")
    start_worker(workers, domain, launcher)
    q = iso.queue
    cases = [
        (dict(amount=0), "amount: expected a positive integer amount in minor units, got 0"),
        (dict(amount=10.5), "amount: expected a positive integer amount in minor units, got 10.5"),
        (dict(amount="10"), 'amount: expected a positive integer amount in minor units, got "10"'),
        (dict(currency="USD"), 'currency: expected an ISO 4217 code in lower case (usd, eur), got "USD"'),
        (dict(payment_method=None), "payment_method is required"),
        (dict(metadata={"order_id": "x"}), 'metadata: "order_id" is set by the payment worker'),
        (dict(attempt=0), "attempt: expected a positive integer, got 0"),
    ]
    for bad, message in cases:
        kwargs = dict(tenant_id="acme", order_id="o-3", amount=1000, currency="usd", payment_method="pm_card_visa")
        kwargs.update(bad)
        res = client_app.send_task("payment.charge", kwargs=kwargs, queue=q)
        assert raises(res) == ("ValueError", (message,)), bad
    assert raises(charge(client_app, q, "o-3", tenant="nobody")) == ("UnknownTenant", ("nobody",))
    assert intents_by_order(launcher, tid) == {}
    assert domain.sql("SELECT count(*) FROM payments") == [["0"]]


# ------------------------------------------------------------------ p4
def test_p4_lost_requests_and_lost_answers_retry_with_the_same_key(workers, iso, client_app, domain, stripe):
    launcher = stripe()
    tid = domain.add_tenant("acme")
    start_worker(workers, domain, launcher)
    launcher.configure(fail_first_ratio=1.0)        # 500 before Stripe processes the first request of each key
    one = charge(client_app, iso.queue, "o-4a").get(timeout=GET)
    launcher.configure(fail_first_ratio=0.0, lose_response_ratio=1.0)  # processed, then the answer is lost
    two = charge(client_app, iso.queue, "o-4b").get(timeout=GET)
    assert one["status"] == two["status"] == "succeeded"
    stats = launcher.stats()
    assert stats["injected_failures"] >= 1 and stats["lost_responses"] >= 1 and stats["idempotent_replays"] >= 1, stats
    intents = intents_by_order(launcher, tid)
    assert {k: len(v) for k, v in intents.items()} == {"o-4a": 1, "o-4b": 1}
    tries = dict(tuple(r) for r in domain.sql("SELECT order_id, tries FROM payments ORDER BY order_id"))
    assert tries == {"o-4a": "2", "o-4b": "2"}


# ------------------------------------------------------------------ p5
def test_p5_refunds_never_exceed_the_charge(workers, iso, client_app, domain, stripe):
    launcher = stripe()
    domain.add_tenant("acme")
    start_worker(workers, domain, launcher)
    q = iso.queue
    paid = charge(client_app, q, "o-5").get(timeout=GET)
    r1 = call(client_app, q, "payment.refund", tenant_id="acme", order_id="o-5", amount=300, refund_id="r1")
    assert (r1["status"], r1["amount"], r1["refunded"], r1["replayed"]) == ("succeeded", 300, 300, False)
    assert call(client_app, q, "payment.refund", tenant_id="acme", order_id="o-5", amount=300, refund_id="r1") == \
        {**r1, "replayed": True, "refunded": 300}
    name, args = raises(client_app.send_task("payment.refund", kwargs=dict(
        tenant_id="acme", order_id="o-5", amount=800, refund_id="r2"), queue=q))
    assert name == "RefundExceedsCharge" and "a refund of 800 exceeds the 700 still refundable" in args[0]
    rest = call(client_app, q, "payment.refund", tenant_id="acme", order_id="o-5", refund_id="r3")
    assert (rest["amount"], rest["refunded"]) == (700, 1000)
    assert raises(client_app.send_task("payment.refund", kwargs=dict(
        tenant_id="acme", order_id="o-5", refund_id="r4"), queue=q))[0] == "RefundExceedsCharge"
    refunds = stripe_get(launcher, "refunds", payment_intent=paid["payment_intent"])["data"]
    assert sorted(r["amount"] for r in refunds) == [300, 700]
    status = call(client_app, q, "payment.status", tenant_id="acme", order_id="o-5")
    assert status["refunded"] == 1000
    assert [(r["refund_id"], r["amount"], r["status"]) for r in status["refunds"]] == \
        [("r1", 300, "succeeded"), ("r3", 700, "succeeded")]


def signed(payload, secret=WEBHOOK_SECRET, t=None):
    body = json.dumps(payload)
    t = int(time.time()) if t is None else t
    sig = hmac.new(secret.encode(), f"{t}.{body}".encode(), hashlib.sha256).hexdigest()
    return body.encode(), {"Stripe-Signature": f"t={t},v1={sig}", "Content-Type": "application/json"}


def post(url, body, headers):
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# ------------------------------------------------------------------ p6
def test_p6_webhooks_once_in_order_and_signed(workers, iso, client_app, domain, stripe, webhooks):
    launcher = stripe(webhook_duplicate_ratio=1.0)   # every event delivered twice
    domain.add_tenant("acme")
    settings = domain.settings(payment=section(launcher, events_queue=iso.queue))
    base = webhooks(settings)
    launcher.register_webhook(base + "/webhooks/stripe", WEBHOOK_SECRET)
    start_worker(workers, domain, launcher)
    q = iso.queue
    paid = charge(client_app, q, "o-6").get(timeout=GET)
    pi = paid["payment_intent"]
    call(client_app, q, "payment.refund", tenant_id="acme", order_id="o-6", amount=250, refund_id="r1")
    launcher.create_dispute(payment_intent=pi, amount=750)

    def applied():
        events = call(client_app, q, "payment.status", tenant_id="acme", order_id="o-6")["events"]
        return {e["type"]: e for e in events}

    seen = wait_for(lambda: (e := applied()) and {"payment_intent.succeeded", "charge.refunded",
                                                  "charge.dispute.created"} <= set(e) and e, 30,
                    interval=0.3, message="the three events applied")
    assert seen["payment_intent.succeeded"]["applied"] is False  # the charge had recorded it already
    assert seen["charge.refunded"]["applied"] is False           # so had the refund
    assert seen["charge.dispute.created"]["applied"] is True
    status = call(client_app, q, "payment.status", tenant_id="acme", order_id="o-6")
    assert (status["status"], status["refunded"], status["disputed"]) == ("succeeded", 250, True)
    stored = int(domain.sql("SELECT count(*) FROM stripe_events")[0][0])
    delivered = [d for d in launcher.deliveries() if d.get("status") == 200]
    assert len(delivered) >= 2 * 3 and stored == len({d["event"] for d in delivered}), (stored, delivered)
    assert any(d["duplicate"] for d in delivered)
    # Out of order: a payment_failed after the success changes nothing; delivered twice, stored once.
    late = {"id": "evt_late_failure", "object": "event", "type": "payment_intent.payment_failed", "created": 1,
            "livemode": False, "pending_webhooks": 1, "api_version": "2026-09-30.endive",
            "data": {"object": stripe_get(launcher, f"payment_intents/{pi}")}}
    body, headers = signed(late)
    assert post(base + "/webhooks/stripe", body, headers) == 200
    assert post(base + "/webhooks/stripe", body, headers) == 200
    wait_for(lambda: "payment_intent.payment_failed" in applied(), 20, interval=0.3, message="the late event")
    status = call(client_app, q, "payment.status", tenant_id="acme", order_id="o-6")
    assert status["status"] == "succeeded"
    assert [e for e in status["events"] if e["event_id"] == "evt_late_failure"][0]["applied"] is False
    # A bad or missing signature: 400, nothing stored.
    count = domain.sql("SELECT count(*) FROM stripe_events")
    bad = dict(late, id="evt_forged")
    body, headers = signed(bad, secret="whsec_wrong")
    assert post(base + "/webhooks/stripe", body, headers) == 400
    body, _ = signed(bad)
    assert post(base + "/webhooks/stripe", body, {"Content-Type": "application/json"}) == 400
    body, headers = signed(bad, t=int(time.time()) - 3600)
    assert post(base + "/webhooks/stripe", body, headers) == 400
    assert domain.sql("SELECT count(*) FROM stripe_events") == count
    text = urllib.request.urlopen(base + "/metrics", timeout=5).read().decode()
    assert "celeriac_payment_webhook_signature_failures_total 3" in text


# ------------------------------------------------------------------ p7
def test_p7_kill_loop_one_charge_per_order(workers, iso, client_app, domain, stripe):
    launcher = stripe(fail_first_ratio=0.2, fault_seed=7)
    tid = domain.add_tenant("acme")
    opts = dict(acks_late=True, visibility_timeout=4, concurrency=4, payment={"claim_lease": 3.0, "request_timeout": 1.5})
    start_worker(workers, domain, launcher, **opts)
    victim = start_worker(workers, domain, launcher, **opts)
    orders = [f"o-{i}" for i in range(200)]
    results = collections.defaultdict(list)
    for _ in range(4):
        for o in orders:
            results[o].append(charge(client_app, iso.queue, o, amount=1000 + int(o[2:])))
    kills = 0
    started = time.monotonic()
    while kills < 6:
        time.sleep(0.15 + 0.05 * kills)   # while charges are in flight
        victim.kill()
        kills += 1
        victim = start_worker(workers, domain, launcher, **opts)
    outcomes = collections.Counter()
    for o, rs in results.items():
        for r in rs:
            got = r.get(timeout=120)
            assert got["status"] == "succeeded", (o, got)
            outcomes["replayed" if got["replayed"] else "first"] += 1
    charging = time.monotonic() - started
    intents = intents_by_order(launcher, tid)
    per_order = {o: [pi for pi in intents.get(o, []) if pi["status"] == "succeeded"] for o in orders}
    doubles = {o: len(v) for o, v in per_order.items() if len(v) != 1}
    assert doubles == {}, f"orders without exactly one succeeded PaymentIntent: {doubles}"
    # Random refunds, some ids repeated, some asking for more than is left: never more than was charged.
    rng = random.Random(11)
    refunds = []
    for i in range(150):
        o = rng.choice(orders[:40])
        rid = f"rf-{rng.randrange(120)}"
        refunds.append(client_app.send_task("payment.refund", kwargs=dict(
            tenant_id="acme", order_id=o, refund_id=rid, amount=rng.choice([100, 300, 700, 2000])), queue=iso.queue))
    names = collections.Counter()
    for r in refunds:
        try:
            r.get(timeout=60)
            names["ok"] += 1
        except Exception as e:  # RefundExceedsCharge, or ValueError for a refund id reused with another amount
            names[type(e).__name__] += 1
    for o in orders[:40]:
        pi = per_order[o][0]
        total = sum(r["amount"] for r in stripe_get(launcher, "refunds", payment_intent=pi["id"], limit=100)["data"])
        assert total <= pi["amount"], (o, total, pi["amount"])
    print(f"\npayment kill loop: {kills} kills in {charging:.1f} s of charging, results {dict(outcomes)}, "
          f"double charges 0, refunds {dict(names)}")
    (workers.log_dir / "kill-loop.json").write_text(json.dumps(
        {"kills": kills, "results": dict(outcomes), "double_charges": len(doubles), "refunds": dict(names)}))


# ------------------------------------------------------------------ p8
def test_p8_reconciled_past_the_key_lifetime(workers, iso, client_app, domain, stripe):
    launcher = stripe(lose_response_ratio=1.0)
    tid = domain.add_tenant("acme")
    start_worker(workers, domain, launcher, payment={"max_retries": 0, "key_lifetime": 1.0})
    name, args = raises(charge(client_app, iso.queue, "o-8"))
    assert name == "PaymentUnknown", args
    assert len(intents_by_order(launcher, tid)["o-8"]) == 1      # Stripe has it; we never heard
    assert domain.sql("SELECT status FROM payments") == [["unknown"]]
    time.sleep(1.2)                                              # the key has expired
    launcher.configure(lose_response_ratio=0.0)
    got = charge(client_app, iso.queue, "o-8").get(timeout=GET)
    assert got["status"] == "succeeded" and got["replayed"] is False
    intents = intents_by_order(launcher, tid)["o-8"]
    assert len(intents) == 1 and got["payment_intent"] == intents[0]["id"], "reconciled, not charged again"
