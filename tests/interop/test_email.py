"""The email task family end to end: a Python Celery 5.7 client, a celeriac worker, PostgreSQL (a schema of
the test's own, the worker as the application role) and the aiosmtpd sink of ``tests/peers/smtp_sink.py``.

    e1  inline and stored templates (locale fallback), cc/bcc/reply-to/headers, status
    e2  the same key again (a second publish, a redelivery under the same task id): duplicate, one mail
    e3  bad input fails at once with ValueError naming the field, the row failed, nothing sent
    e4  451 on the first attempt retries with the same claim; 550 fails and suppresses the recipient
    e5  the window no sender can close: the worker killed after the server stored the mail, before the
        outcome was recorded: held (default) or resent with the same Message-ID (resend)
    e6  a campaign on the bulk queue never holds back transactional mail; a campaign re-run sends nothing twice
    e7  the provider rate limit spaces mails cluster-wide; the daily quota defers the rest
    e8  300 keys, each published three times, two acks_late workers, one SIGKILLed in a loop, 10 % of first
        attempts answered 451: one mail per key (one Message-ID each), every result sent or duplicate
"""
import collections
import json
import time

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from interop_helpers import free_port, wait_for

pytestmark = pytest.mark.celeriac_only(reason="the email task family is celeriac's")

GET = 20


def email_section(sink, **extra):
    return {"smtp_url": f"smtp://127.0.0.1:{sink.port}", "from": "Shop <shop@example.com>",
            "retry_backoff": 0.2, "retry_backoff_max": 1.0, **extra}


def start_worker(workers, domain, sink, *, concurrency=2, queues=None, email=None, **kw):
    """A celeriac worker on the test's queue(s) with the domain database and ``[email]`` pointing at ``sink``;
    its ``/metrics`` address is ``worker.metrics_addr``."""
    settings = domain.settings(email=email_section(sink, **(email or {})))
    settings.update(kw.pop("settings", {}))
    addr = f"127.0.0.1:{free_port()}"
    worker = workers.start(concurrency=concurrency, queues=queues, settings=settings,
                           extra_args=["--metrics-addr", addr], **kw)
    worker.metrics_addr = addr
    return worker


def send(app, queue, **kwargs):
    return app.send_task("email.send", kwargs=kwargs, queue=queue)


def call(app, queue, task, **kwargs):
    return app.send_task(task, kwargs=kwargs, queue=queue).get(timeout=GET)


def raises(result):
    with pytest.raises(Exception) as info:
        result.get(timeout=GET)
    return type(info.value).__name__, str(info.value)


# ------------------------------------------------------------------ e1
def test_e1_templates_locales_and_headers(workers, iso, client_app, domain, smtp_sink):
    sink = smtp_sink()
    domain.add_tenant("acme")
    start_worker(workers, domain, sink)
    q = iso.queue
    assert call(client_app, q, "email.template_put", tenant_id="acme", name="welcome", locale="en",
                subject="Welcome {{ name }}", text="Hello {{ name }}!", html="<p>Hello {{ name }}</p>") == \
        {"name": "welcome", "locale": "en", "stored": True}
    call(client_app, q, "email.template_put", tenant_id=domain.tenants["acme"], name="welcome", locale="de",
         subject="Willkommen {{ name }}", text="Hallo {{ name }}!")
    assert call(client_app, q, "email.template_get", tenant_id="acme", name="welcome", locale="de-AT")["locale"] == "de"
    assert call(client_app, q, "email.template_get", tenant_id="acme", name="welcome", locale="fr")["subject"] == \
        "Welcome {{ name }}"

    german = send(client_app, q, tenant_id="acme", to="Bob <bob@example.org>", template="welcome",
                  context={"name": "Bob <b>"}, locale="de-AT", cc=["carol@example.org"], bcc="audit@example.org",
                  reply_to="help@example.com", headers={"X-Campaign": "spring"}, idempotency_key="order-1")
    inline = send(client_app, q, tenant_id="acme", to=["dan@example.org"], subject="Order {{ n }}",
                  text="Order {{ n }} shipped {{ extra }}", html="<b>{{ n }}</b> {{ extra }}",
                  context={"n": 7, "extra": "& more"})
    first, second = german.get(timeout=GET), inline.get(timeout=GET)
    assert first["status"] == "sent" and second["status"] == "sent"
    mails = {m["Message-ID"]: m for m in sink.mails()}
    assert set(mails) == {first["message_id"], second["message_id"]}
    de = mails[first["message_id"]]
    assert de["Subject"] == "Willkommen Bob <b>"
    assert de.get_content().strip() == "Hallo Bob <b>!"
    assert de["To"] == "Bob <bob@example.org>" and de["Cc"] == "carol@example.org"
    assert de["Reply-To"] == "help@example.com" and de["X-Campaign"] == "spring"
    assert de["Bcc"] is None
    envelopes = {d["message_id"]: sorted(d["rcpt_tos"]) for d in sink.deliveries()}
    assert envelopes[first["message_id"]] == ["audit@example.org", "bob@example.org", "carol@example.org"]
    en = mails[second["message_id"]]
    assert en.get_body(("html",)).get_content().strip() == "<b>7</b> &amp; more"
    assert en.get_body(("plain",)).get_content().strip() == "Order 7 shipped & more"

    status = call(client_app, q, "email.status", tenant_id="acme", idempotency_key="order-1")
    assert {k: status[k] for k in ("status", "attempts", "message_id", "template", "locale", "last_code")} == \
        {"status": "sent", "attempts": 1, "message_id": first["message_id"], "template": "welcome",
         "locale": "de", "last_code": 250}
    assert status["to"] == ["Bob <bob@example.org>"] and status["sent_at"].endswith("Z")
    # The default key is the Celery task id.
    assert call(client_app, q, "email.status", tenant_id="acme", idempotency_key=inline.id)["outbox_id"] == \
        second["outbox_id"]
    assert call(client_app, q, "email.status", tenant_id="acme", idempotency_key="never") is None


# ------------------------------------------------------------------ e2
def test_e2_the_same_key_is_sent_once(workers, iso, client_app, domain, smtp_sink):
    sink = smtp_sink()
    domain.add_tenant("acme")
    start_worker(workers, domain, sink)
    q = iso.queue
    args = dict(tenant_id="acme", to="bob@example.org", subject="Receipt", text="Thanks")
    first = send(client_app, q, idempotency_key="receipt-9", **args).get(timeout=GET)
    again = send(client_app, q, idempotency_key="receipt-9", **args).get(timeout=GET)
    assert first["status"] == "sent"
    assert again == {**first, "status": "duplicate"}
    # A redelivery: the same task id published twice, no explicit key (the key is the task id). The second
    # run answers duplicate; the stored SUCCESS of the first stays what the client reads.
    one = client_app.send_task("email.send", kwargs=args, queue=q, task_id="fixed-task-id").get(timeout=GET)
    two = client_app.send_task("email.send", kwargs=args, queue=q, task_id="fixed-task-id")
    wait_for(lambda: metric(workers.started[-1], "celeriac_email_duplicates_total", tenant="acme") == 2, 10,
             message="the second run answered from the outbox")
    assert one["status"] == "sent" and two.get(timeout=GET) == one
    assert sorted(sink.message_ids().values()) == [1, 1]
    assert domain.sql("SELECT count(*) FROM email_outbox") == [["2"]]


# ------------------------------------------------------------------ e3
def test_e3_bad_input_fails_at_once_and_sends_nothing(workers, iso, client_app, domain, smtp_sink):
    sink = smtp_sink()
    domain.add_tenant("acme")
    start_worker(workers, domain, sink)
    q = iso.queue
    call(client_app, q, "email.template_put", tenant_id="acme", name="w", locale="en",
         subject="Hi {{ user.name }}", text="x")
    cases = {
        "bad-to": (dict(to="not an address", subject="s", text="t"),
                   ("ValueError", 'to: invalid address "not an address" (Missing domain or user)')),
        "bad-cc": (dict(to="a@example.org", cc=["b@"], subject="s", text="t"),
                   ("ValueError", 'cc: invalid address "b@" (Invalid email domain)')),
        "missing-var": (dict(to="a@example.org", template="w", context={"user": {}}),
                        ("ValueError", "subject: template \"w\" (en): undefined value 'user.name' at line 1")),
        "unknown-template": (dict(to="a@example.org", template="nope", locale="de"),
                             ("ValueError", 'template: unknown template "nope" (locales tried: de, en)')),
        "both": (dict(to="a@example.org", template="w", subject="s"),
                 ("ValueError", "give either template or subject with text/html, not both")),
        "syntax": (dict(to="a@example.org", subject="{{ x", text="t"),
                   ("ValueError", None)),
    }
    for key, (kwargs, (exc, message)) in cases.items():
        name, text = raises(send(client_app, q, tenant_id="acme", idempotency_key=key, **kwargs))
        assert name == exc, (key, name, text)
        if message is not None:
            assert text == message, key
        row = call(client_app, q, "email.status", tenant_id="acme", idempotency_key=key)
        assert (row["status"], row["error_type"], row["attempts"]) == ("failed", "ValueError", 0), key
    # A re-publish of a failed key answers the same failure, still without SMTP.
    assert raises(send(client_app, q, tenant_id="acme", idempotency_key="bad-to", to="ok@example.org",
                       subject="s", text="t")) == cases["bad-to"][1]
    assert raises(send(client_app, q, tenant_id="nobody", to="a@example.org", subject="s", text="t")) == \
        ("UnknownTenant", "nobody")
    name, text = raises(call_async(client_app, q, "email.template_put", tenant_id="acme", name="w", locale="en",
                                   subject="ok", text="{% if %}"))
    assert name == "ValueError" and text.startswith('text: template "w" (en): syntax error'), text
    assert sink.mails() == []


def call_async(app, queue, task, **kwargs):
    return app.send_task(task, kwargs=kwargs, queue=queue)


# ------------------------------------------------------------------ e4
def test_e4_tempfail_retries_permanent_refusal_suppresses(workers, iso, client_app, domain, smtp_sink):
    sink = smtp_sink(tempfail_first_ratio=1.0, reject_rcpt_regex=r"^bounce@")
    domain.add_tenant("acme")
    start_worker(workers, domain, sink)
    q = iso.queue
    ok = send(client_app, q, tenant_id="acme", to="bob@example.org", subject="s", text="t",
              idempotency_key="k1").get(timeout=GET)
    assert ok["status"] == "sent"
    row = call(client_app, q, "email.status", tenant_id="acme", idempotency_key="k1")
    assert (row["attempts"], row["last_code"]) == (2, 250)
    assert list(sink.message_ids().values()) == [1]

    name, text = raises(send(client_app, q, tenant_id="acme", to="bounce@example.org", subject="s", text="t",
                             idempotency_key="k2"))
    assert name == "SMTPPermanentError" and "550" in text, text
    row = call(client_app, q, "email.status", tenant_id="acme", idempotency_key="k2")
    assert (row["status"], row["last_code"], row["attempts"]) == ("failed", 550, 1)
    assert domain.sql("SELECT address, code FROM email_suppressions") == [["bounce@example.org", "550"]]
    # Later sends to a suppressed address fail without touching SMTP.
    before = len(sink.deliveries())
    name, text = raises(send(client_app, q, tenant_id="acme", to=["x@example.org", "Bounce@Example.org"],
                             subject="s", text="t", idempotency_key="k3"))
    assert (name, text) == ("Suppressed", "suppressed recipient(s): bounce@example.org (a permanent refusal earlier)")
    assert len(sink.deliveries()) == before


# ------------------------------------------------------------------ e5
@pytest.mark.parametrize("policy", ["held", "resend"])
def test_e5_a_claim_that_expired_mid_send(policy, workers, iso, client_app, domain, smtp_sink, tmp_path):
    pause = tmp_path / "pause"
    sink = smtp_sink(pause_before_reply_file=str(pause))
    domain.add_tenant("acme")
    email = {"ambiguous": policy, "claim_lease": 2.0, "send_timeout": 1.0}
    opts = dict(acks_late=True, visibility_timeout=3, email=email)
    first = start_worker(workers, domain, sink, **opts)
    result = send(client_app, iso.queue, tenant_id="acme", to="bob@example.org", subject="s", text="t",
                  idempotency_key="window")
    message_id = sink.wait_paused(1)
    first.kill()          # the server has the mail; the worker never heard the 250
    sink.release()
    start_worker(workers, domain, sink, **opts)
    got = result.get(timeout=GET)
    ids = sink.message_ids()
    row = call(client_app, iso.queue, "email.status", tenant_id="acme", idempotency_key="window")
    if policy == "held":
        assert got["status"] == "held" and got["message_id"] == message_id
        assert ids == {message_id: 1}
        assert row["status"] == "held" and "claim expired" in row["last_error"]
        assert metric(workers.started[-1], "celeriac_email_held_total", tenant="acme") == 1
    else:
        assert got["status"] == "sent"
        assert ids == {message_id: 2}, "resent with the same Message-ID"
        assert row["status"] == "sent" and row["attempts"] == 2
        assert metric(workers.started[-1], "celeriac_email_resent_total", tenant="acme") == 1


def metric(worker, name, **labels):
    import urllib.request
    text = urllib.request.urlopen(f"http://{worker.metrics_addr}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.split()[-1])
    return 0.0


# ------------------------------------------------------------------ e6
def test_e6_campaigns_go_to_bulk_and_never_hold_back_transactional_mail(workers, iso, client_app, domain, smtp_sink):
    sink = smtp_sink()
    domain.add_tenant("acme")
    bulk = f"{iso.queue}.bulk"
    start_worker(workers, domain, sink, concurrency=2, queues=[iso.queue, bulk], email={"bulk_queue": bulk})
    call(client_app, iso.queue, "email.template_put", tenant_id="acme", name="news", locale="en",
         subject="News for {{ name }}", text="Hi {{ name }}")
    n = 150
    recipients = [{"to": f"user{i}@example.org", "context": {"name": f"U{i}"}} for i in range(n)]
    fanout = client_app.send_task("email.send_bulk", kwargs=dict(
        tenant_id="acme", template="news", recipients=recipients, campaign_id="spring"), queue=bulk)
    assert fanout.get(timeout=GET) == {"campaign_id": "spring", "recipients": n, "published": n, "finished": 0}
    urgent = send(client_app, iso.queue, tenant_id="acme", to="vip@example.org", subject="Your order",
                  text="shipped", idempotency_key="urgent")
    assert urgent.get(timeout=GET)["status"] == "sent"
    delivered_before_urgent = len(sink.deliveries())
    assert delivered_before_urgent < n // 2, f"the transactional mail waited for {delivered_before_urgent} campaign mails"
    wait_for(lambda: len(sink.deliveries()) == n + 1, 60, message="the campaign delivered")
    assert set(sink.message_ids().values()) == {1}
    # Run again (a redelivered fan-out): nothing is published, nothing sent twice.
    again = client_app.send_task("email.send_bulk", kwargs=dict(
        tenant_id="acme", template="news", recipients=recipients, campaign_id="spring"), queue=bulk)
    assert again.get(timeout=GET) == {"campaign_id": "spring", "recipients": n, "published": 0, "finished": n}
    assert domain.sql("SELECT count(*) FROM email_outbox WHERE campaign_id = 'spring' AND status = 'sent'") == [[str(n)]]
    assert domain.sql("SELECT idempotency_key FROM email_outbox WHERE campaign_id = 'spring' ORDER BY 1 LIMIT 1") == \
        [["campaign:spring:user0@example.org"]]


# ------------------------------------------------------------------ e7
def test_e7_rate_limit_and_daily_quota(workers, iso, client_app, domain, smtp_sink):
    sink = smtp_sink()
    domain.add_tenant("acme")
    domain.add_tenant("other")
    # Two workers share one limit (cluster-wide, through Redis): 20 mails/s per tenant and account.
    for _ in range(2):
        start_worker(workers, domain, sink, concurrency=4, email={"rate_limit": "20/s", "daily_quota": 25})
    results = [send(client_app, iso.queue, tenant_id="acme", to=f"u{i}@example.org", subject="s", text="t",
                    idempotency_key=f"k{i}") for i in range(30)]
    deadline = time.monotonic() + GET
    outcomes = {}
    while len(outcomes) < 25 and time.monotonic() < deadline:
        for i, r in enumerate(results):
            if i not in outcomes and r.ready():
                outcomes[i] = r.get()
        time.sleep(0.05)
    assert len(outcomes) == 25 and all(o["status"] == "sent" for o in outcomes.values())
    times = sorted(d["time"] for d in sink.deliveries())
    assert len(times) == 25
    # 20/s with bursts of one: 25 mails cannot go out in under (25 - 1) / 20 s.
    assert times[-1] - times[0] >= 24 / 20 - 0.05, times[-1] - times[0]
    # Past the quota the rest wait for the next day, not sent, not failed.
    time.sleep(0.5)
    waiting = [r for r in results if not r.ready()]
    assert len(waiting) == 5
    rows = domain.sql("SELECT status, last_error FROM email_outbox WHERE status <> 'sent'")
    assert len(rows) == 5 and all(s == "retry" and "daily quota of 25" in e for s, e in rows)
    # The quota is per tenant: another tenant still sends.
    assert send(client_app, iso.queue, tenant_id="other", to="o@example.org", subject="s",
                text="t").get(timeout=GET)["status"] == "sent"


# ------------------------------------------------------------------ e8
def test_e8_kill_loop_one_mail_per_key(workers, iso, client_app, domain, smtp_sink):
    sink = smtp_sink(tempfail_first_ratio=0.1)
    domain.add_tenant("acme")
    email = {"ambiguous": "resend", "claim_lease": 3.0, "send_timeout": 1.5}
    opts = dict(acks_late=True, visibility_timeout=4, email=email, concurrency=4)
    stable = start_worker(workers, domain, sink, **opts)
    victim = start_worker(workers, domain, sink, **opts)
    keys = [f"order-{i}" for i in range(300)]
    results = collections.defaultdict(list)
    for rnd in range(3):  # every key published three times, under new task ids
        for k in keys:
            results[k].append(send(client_app, iso.queue, tenant_id="acme", to=f"{k}@example.org",
                                   subject=f"Order {k}", text="thanks", idempotency_key=k))
    kills = 0
    deadline = time.monotonic() + 30
    while kills < 6 and time.monotonic() < deadline:
        time.sleep(0.4 + 0.1 * kills)
        victim.kill()
        kills += 1
        victim = start_worker(workers, domain, sink, **opts)
    outcomes = collections.Counter()
    for k, rs in results.items():
        for r in rs:
            outcomes[r.get(timeout=90)["status"]] += 1
    assert set(outcomes) <= {"sent", "duplicate"}, outcomes
    assert sum(outcomes.values()) == 900
    ids = sink.message_ids()
    assert len(ids) == 300, "one Message-ID per key"
    rows = dict(tuple(r) for r in domain.sql("SELECT idempotency_key, message_id FROM email_outbox"))
    assert sorted(rows) == sorted(keys) and set(rows.values()) == set(ids)
    duplicates = sum(ids.values()) - 300
    print(f"\nkill loop: {kills} kills, {sum(ids.values())} mails for 300 keys, duplicates {duplicates}, "
          f"results {dict(outcomes)}, workers {stable.name}")
    (workers.log_dir / "kill-loop.json").write_text(json.dumps(
        {"kills": kills, "mails": sum(ids.values()), "duplicates": duplicates, "results": dict(outcomes)}))
    # Each duplicate needs a kill inside the window between the server's 250 and the outcome's commit.
    assert duplicates <= kills
