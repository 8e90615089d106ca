"""Fake Stripe API for the payment task family: localstripe plus the gaps.

Runs PyPI ``localstripe`` (a stateful fake Stripe server built on aiohttp)
*in this process*, on a loopback port, with one outer aiohttp middleware and a
few monkeypatches that make it answer what ``async-stripe`` 1.0.0-rc.10
(miniserde deserialization, ``deserialize`` feature off) needs:

* fills the fields async-stripe requires and localstripe lacks
  (PaymentIntent ``amount_capturable``/``amount_received``/
  ``confirmation_method``/``payment_method_types``, ``latest_charge`` as an
  id, Charge ``amount_captured``/``billing_details``/``disputed``, Event
  ``pending_webhooks``/``api_version``/``request``, error ``type``...);
* Stripe ``Idempotency-Key`` semantics for POSTs (replay with
  ``Idempotent-Replayed: true``, 400 ``idempotency_error`` on other
  parameters, 409 while in flight), scoped per API key;
* ``GET /v1/payment_intents/search`` with Stripe's query language subset;
* deterministic fault injection keyed by a stable hash of the idempotency key
  (``--fail-first-ratio``, ``--lose-response-ratio``);
* card declines as ``card_error`` with ``decline_code`` (Stripe test payment
  method ids, plus ``--decline-payment-method``);
* webhooks signed ``t=..,v1=HMAC-SHA256(secret, "t.payload")`` with the filled
  fields, retries, optional duplicates; ``charge.refunded``/``refund.created``
  on refunds and ``charge.dispute.created`` via ``POST /_launcher/disputes``;
* ``/_launcher/*`` control endpoints (stats, webhooks, disputes, config,
  reset).

Why in-process rather than a proxy in front of a localstripe subprocess:
localstripe keeps its state in module globals and pickles it to a *shared*
``/tmp/localstripe.pickle`` on every write, rejects parameters async-stripe
sends (``description``), reports declines as ``invalid_request_error``
without ``decline_code``, and signs webhooks itself, so the payloads it signs
would lack the filled fields: all of that needs patching inside localstripe.
Isolation between tests comes from running one launcher per process; the
importable ``StripeLauncher`` class starts this file as a subprocess.

CLI::

    python stripe_launcher.py [--host 127.0.0.1] [--port 0]
        [--fail-first-ratio R] [--lose-response-ratio R]
        [--lose-mode {500,drop}] [--fault-seed S]
        [--decline-payment-method NAME[=DECLINE_CODE]]...
        [--webhook URL=SECRET]... [--webhook-delay S] [--webhook-retries N]
        [--webhook-retry-delay S] [--webhook-duplicate-ratio R]
        [--search-lag S] [--no-validate] [--verbose]

prints ``READY <port>`` on stdout once listening.
"""

import argparse
import asyncio
import base64
import contextvars
import hashlib
import hmac
import json
import os
import random
import re
import signal
import string
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "stripe_schema_rc10.json")

# ``stripe_shared::version::VERSION`` of async-stripe 1.0.0-rc.10.
API_VERSION = "2026-09-30.endive"

# Stripe test payment method ids -> card number.  Success unless listed in
# DECLINES.  See https://docs.stripe.com/testing (declined payments).
TEST_PAYMENT_METHODS = {
    "pm_card_visa": "4242424242424242",
    "pm_card_mastercard": "5555555555554444",
    "pm_card_visa_debit": "4000056655665556",
    "pm_card_visa_chargeDeclined": "4000000000000002",
    "pm_card_chargeCustomerFail": "4000000000000341",
    "pm_card_visa_chargeDeclinedInsufficientFunds": "4000000000009995",
    "pm_card_visa_chargeDeclinedLostCard": "4000000000009987",
    "pm_card_visa_chargeDeclinedStolenCard": "4000000000009979",
    "pm_card_chargeDeclinedExpiredCard": "4000000000000069",
    "pm_card_chargeDeclinedIncorrectCvc": "4000000000000127",
    "pm_card_chargeDeclinedProcessingError": "4000000000000119",
    "pm_card_visa_chargeDeclinedVelocityLimitExceeded": "4000000000006975",
    "pm_card_radarBlock": "4100000000000019",
    "pm_card_authenticationRequired": "4000002760003184",
}

# card number -> (error code, decline_code or None), as Stripe test mode.
DECLINES = {
    "4000000000000002": ("card_declined", "generic_decline"),
    "4000000000000341": ("card_declined", "generic_decline"),
    "4000000000009995": ("card_declined", "insufficient_funds"),
    "4000000000009987": ("card_declined", "lost_card"),
    "4000000000009979": ("card_declined", "stolen_card"),
    "4000000000000069": ("expired_card", None),
    "4000000000000127": ("incorrect_cvc", None),
    "4000000000000119": ("processing_error", None),
    "4000000000006975": ("card_declined", "card_velocity_exceeded"),
    "4100000000000019": ("card_declined", "fraudulent"),
}

MESSAGES = {
    "insufficient_funds": "Your card has insufficient funds.",
    "expired_card": "Your card has expired.",
    "incorrect_cvc": "Your card's security code is incorrect.",
    "processing_error": ("An error occurred while processing your card. "
                         "Try again in a little bit."),
    "authentication_required": ("Your card was declined. This transaction "
                                "requires authentication."),
}

IDEMPOTENCY_MISMATCH = (
    "Keys for idempotent requests can only be used with the same parameters "
    "they were first used with. Try using a key other than '%s' if you meant "
    "to execute a different request.")

# (request id, idempotency key) of the API request being handled, so that
# events created while handling it carry ``request``.
REQUEST_CTX = contextvars.ContextVar("stripe_launcher_request", default=None)
EXPAND_CTX = contextvars.ContextVar("stripe_launcher_expand", default=())


# --------------------------------------------------------------------------
# Schema validation (what async-stripe's miniserde deserializer demands)
# --------------------------------------------------------------------------

_SCHEMA = None
_PARSED = {}
_PRIMS = {"i64": "int", "i32": "int", "u64": "uint", "u32": "uint",
          "u8": "uint", "f64": "float", "bool": "bool", "String": "str",
          "Timestamp": "int", "Currency": "str", "Value": "any",
          "SmolStr": "str"}

# Event type prefix -> type of data.object (as async-stripe-webhook parses).
EVENT_OBJECT_TYPES = [
    ("payment_intent.", "PaymentIntent"), ("charge.dispute.", "Dispute"),
    ("charge.refund.", "Refund"), ("charge.", "Charge"),
    ("refund.", "Refund"), ("customer.", "Customer"),
    ("payment_method.", "PaymentMethod"),
]

OBJECT_TYPES = {"payment_intent": "PaymentIntent", "charge": "Charge",
                "refund": "Refund", "event": "Event", "dispute": "Dispute",
                "payment_method": "PaymentMethod", "customer": "Customer",
                "balance_transaction": "BalanceTransaction"}


def load_schema(path=SCHEMA_PATH):
    """Load (once) the schema derived by ``stripe_schema_extract.py``."""
    global _SCHEMA
    if _SCHEMA is None:
        with open(path, encoding="utf-8") as f:
            _SCHEMA = json.load(f)["types"]
    return _SCHEMA


def _parse_type(t):
    """Parse ``Option<Vec<X>>`` into ``("Option", [("Vec", [("X", [])])])``."""
    if t in _PARSED:
        return _PARSED[t]
    pos = 0

    def parse():
        nonlocal pos
        m = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*").match(t, pos)
        if not m:
            raise ValueError("bad type %r" % t)
        name, pos, args = m.group(1), m.end(), []
        if pos < len(t) and t[pos] == "<":
            pos += 1
            while True:
                args.append(parse())
                if t[pos] == ",":
                    pos += 1
                elif t[pos] == ">":
                    pos += 1
                    break
        return (name, args)

    _PARSED[t] = parse()
    return _PARSED[t]


def required_fields(type_name):
    """Fields async-stripe needs present and non-null on ``type_name``."""
    fields = load_schema()[type_name]["fields"]
    return sorted(k for k, t in fields.items() if not t.startswith("Option<"))


def validate(value, type_name):
    """Return a list of reasons ``value`` would fail to deserialize as the
    async-stripe type ``type_name`` (a Rust type like ``PaymentIntent`` or
    ``SearchList<PaymentIntent>``); empty when it would deserialize."""
    errors = []
    _check(value, _parse_type(type_name), "$", errors)
    return errors


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _check(v, parsed, path, errs):
    name, args = parsed
    schema = load_schema()
    if name == "Option":
        if v is not None:
            _check(v, args[0], path, errs)
    elif name == "Box":
        _check(v, args[0], path, errs)
    elif name == "Vec":
        if not isinstance(v, list):
            errs.append("%s: expected array, got %r" % (path, v))
        else:
            for i, item in enumerate(v):
                _check(item, args[0], "%s[%d]" % (path, i), errs)
    elif name == "HashMap":
        if not isinstance(v, dict):
            errs.append("%s: expected object (map), got %r" % (path, v))
        else:
            for k, item in v.items():
                _check(item, args[1], "%s.%s" % (path, k), errs)
    elif name == "Expandable":
        if isinstance(v, dict):
            _check(v, args[0], path, errs)
        elif not isinstance(v, str):
            errs.append("%s: expected id string or object, got %r" % (path, v))
    elif name in ("List", "SearchList"):
        if not isinstance(v, dict):
            errs.append("%s: expected list object, got %r" % (path, v))
            return
        for k, ok in (("data", isinstance(v.get("data"), list)),
                      ("has_more", isinstance(v.get("has_more"), bool)),
                      ("url", isinstance(v.get("url"), str))):
            if not ok:
                errs.append("%s.%s: missing or wrong type" % (path, k))
        if name == "SearchList":
            if v.get("next_page") is not None and not isinstance(
                    v["next_page"], str):
                errs.append("%s.next_page: expected string or null" % path)
            if v.get("total_count") is not None and not (
                    _is_int(v["total_count"]) and v["total_count"] >= 0):
                errs.append("%s.total_count: expected u64 or null" % path)
        for i, item in enumerate(v.get("data") or []):
            _check(item, args[0], "%s.data[%d]" % (path, i), errs)
    elif name in _PRIMS:
        kind = _PRIMS[name]
        ok = {"int": _is_int(v), "uint": _is_int(v) and v >= 0,
              "float": _is_int(v) or isinstance(v, float),
              "bool": isinstance(v, bool), "str": isinstance(v, str),
              "any": True}[kind]
        if not ok:
            errs.append("%s: expected %s, got %r" % (path, name, v))
    elif name in schema:
        spec = schema[name]
        kind = spec["kind"]
        if kind in ("enum", "id"):
            if not isinstance(v, str):
                errs.append("%s: expected %s string, got %r" % (path, name, v))
        elif kind == "tagged":
            obj = v.get("object") if isinstance(v, dict) else None
            if obj not in spec["variants"]:
                errs.append("%s: object %r is no variant of %s"
                            % (path, obj, name))
            else:
                _check(v, _parse_type(spec["variants"][obj]), path, errs)
        elif not isinstance(v, dict):
            errs.append("%s: expected %s object, got %r" % (path, name, v))
        else:
            for key, ft in sorted(spec["fields"].items()):
                if key not in v or v[key] is None:
                    if not ft.startswith("Option<"):
                        errs.append("%s.%s: required by %s, %s" % (
                            path, key, name,
                            "missing" if key not in v else "null"))
                else:
                    _check(v[key], _parse_type(ft), "%s.%s" % (path, key),
                           errs)
    else:
        errs.append("%s: unknown type %s in schema" % (path, name))


def event_object_type(event_type):
    """Type async-stripe-webhook parses ``data.object`` as, for a type."""
    for prefix, t in EVENT_OBJECT_TYPES:
        if event_type.startswith(prefix):
            return t
    return None


def validate_body(body, status=200):
    """Validate an API response body by its ``object`` (or as ``Error`` for
    non-2xx); for events also ``data.object`` as the webhook crate would."""
    if not 200 <= status < 300:
        return validate(body, "Error")
    if not isinstance(body, dict):
        return ["$: not a JSON object"]
    obj = body.get("object")
    if obj in ("list", "search_result"):
        errs = validate(body, "List<Value>" if obj == "list"
                        else "SearchList<Value>")
        for i, item in enumerate(body.get("data") or []):
            errs += ["data[%d]%s" % (i, e[1:]) for e in validate_body(item)]
        return errs
    if obj not in OBJECT_TYPES:
        return []
    errs = validate(body, OBJECT_TYPES[obj])
    if obj == "event":
        t = event_object_type(body.get("type", ""))
        if t is not None:
            errs += validate(((body.get("data") or {}).get("object")), t)
    return errs


# --------------------------------------------------------------------------
# Launcher state
# --------------------------------------------------------------------------

def fault_selected(kind, key, ratio, seed=""):
    """Deterministic choice of idempotency keys for fault injection: true
    for a share ``ratio`` of keys, stable across runs and processes."""
    if ratio <= 0:
        return False
    if ratio >= 1:
        return True
    digest = hashlib.sha256(("%s:%s:%s" % (seed, kind, key)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < ratio


class State:
    """Everything the launcher adds on top of localstripe's store."""

    def __init__(self, args):
        self.args = args
        self.config = {
            "fail_first_ratio": args.fail_first_ratio,
            "lose_response_ratio": args.lose_response_ratio,
            "lose_mode": args.lose_mode,
            "fault_seed": args.fault_seed,
            "webhook_delay": args.webhook_delay,
            "webhook_retries": args.webhook_retries,
            "webhook_retry_delay": args.webhook_retry_delay,
            "webhook_duplicate_ratio": args.webhook_duplicate_ratio,
            "search_lag": args.search_lag,
        }
        self.defaults = dict(self.config)
        self.decline_pms = {}
        for spec in args.decline_payment_method or []:
            name, _, dc = spec.partition("=")
            self.decline_pms[name] = dc or "generic_decline"
        self.reset()

    def reset(self):
        for task in list(getattr(self, "tasks", ())):
            task.cancel()       # webhooks still queued from before
        self.tasks = set()
        self.config = dict(self.defaults)
        self.idem = {}          # (scope, key) -> cached response dict
        self.inflight = set()   # (scope, key)
        self.attempts = {}      # (scope, key) -> requests seen
        self.lost = set()       # (scope, key) whose response was lost
        self.disputes = {}      # du_ id -> dispute dict
        self.disputed_charges = set()
        self.pending = {}       # event id -> set of endpoint ids
        self.deliveries = []
        self.stats = {
            "requests": {}, "idempotent_replays": 0,
            "idempotency_errors": 0, "idempotency_in_flight": 0,
            "injected_failures": 0, "lost_responses": 0,
            "schema_violations": 0, "schema_violation_samples": [],
            "webhooks": {"delivered": 0, "failed_attempts": 0,
                         "duplicates": 0, "gave_up": 0, "by_type": {}},
        }

    def count_request(self, method, path, status):
        parts = path.split("/")
        if len(parts) > 3 and parts[1] == "v1" and parts[3] != "search":
            parts[3] = "{id}"
        if len(parts) > 5 and parts[1] == "v1":
            parts[5] = "{id}"
        route = "%s %s" % (method, "/".join(parts))
        by_status = self.stats["requests"].setdefault(route, {})
        by_status[str(status)] = by_status.get(str(status), 0) + 1

    def pending_count(self, event_id):
        return len(self.pending.get(event_id, ()))


STATE = None
LS = None  # the imported localstripe modules, set by patch_localstripe()


def _rand(n):
    return "".join(random.choice(string.ascii_letters + string.digits)
                   for _ in range(n))


# --------------------------------------------------------------------------
# localstripe patches
# --------------------------------------------------------------------------

PI_EXTRA_STORED = ("description", "receipt_email", "statement_descriptor",
                   "statement_descriptor_suffix", "setup_future_usage",
                   "confirmation_method", "transfer_group")
PI_EXTRA_IGNORED = ("error_on_requires_action", "return_url",
                    "use_stripe_sdk", "mandate", "mandate_data",
                    "radar_options", "payment_details", "shipping",
                    "automatic_payment_methods", "amount_details",
                    "excluded_payment_method_types",
                    "allowed_payment_method_types",
                    "payment_method_configuration", "hooks")
REFUND_IGNORED = ("instructions_email", "origin", "refund_application_fee",
                  "reverse_transfer", "currency", "customer")
REFUND_REASONS = ("duplicate", "fraudulent", "requested_by_customer")


class _Raw:
    """A plain dict that localstripe's Event can snapshot."""

    def __init__(self, data):
        self._data = data

    def _export(self, expand=None):
        return json.loads(json.dumps(self._data))


def patch_localstripe():
    """Import localstripe and patch it; returns its ``server`` module."""
    global LS
    from localstripe import resources, server, webhooks
    from localstripe.errors import UserError
    LS = resources
    R = resources

    # 1. No pickling of the store to the shared /tmp/localstripe.pickle.
    R.Store.dump_to_disk = lambda self: None
    R.Store.try_load_from_disk = lambda self: None

    # 2. Test payment methods and declines.
    orig_canonical = R.PaymentMethod._try_get_canonical_test_article.__func__

    def canonical(cls, id):
        number = TEST_PAYMENT_METHODS.get(id)
        decline = STATE.decline_pms.get(id)
        if number is None and decline is not None:
            number = "4000000000000341"
        if number is None:
            return orig_canonical(cls, id)
        pm = R.PaymentMethod(type="card", card=dict(
            number=number, exp_month="12", exp_year="2034", cvc="123"))
        brand = "mastercard" if number.startswith("5") else "visa"
        pm.card["brand"] = brand
        pm.card["country"] = "US"
        if decline is not None:
            code = "card_declined"
            if decline in ("expired_card", "incorrect_cvc",
                           "processing_error"):
                code = decline
            pm._decline = (code, decline)
        return pm
    R.PaymentMethod._try_get_canonical_test_article = classmethod(canonical)

    def decline_of(pm):
        if getattr(pm, "_decline", None):
            return pm._decline
        number = getattr(pm, "_card_number", None)
        if number in DECLINES:
            return DECLINES[number]
        return None

    orig_declined = R.PaymentMethod._charging_is_declined

    def charging_is_declined(self):
        return bool(decline_of(self)) or orig_declined(self)
    R.PaymentMethod._charging_is_declined = charging_is_declined

    def set_auth_failure(self):
        try:
            pm = R.PaymentMethod._api_retrieve(self.payment_method)
            code, dc = decline_of(pm) or ("card_declined", "generic_decline")
        except Exception:
            code, dc = "card_declined", "generic_decline"
        self.status = "failed"
        self.failure_code = code
        self._decline_code = dc
        self.failure_message = MESSAGES.get(dc or code,
                                            "Your card was declined.")
        self.outcome = {
            "type": "blocked" if dc == "fraudulent" else "issuer_declined",
            "network_status": ("not_sent_to_network" if dc == "fraudulent"
                               else "declined_by_network"),
            "reason": dc or code, "risk_level": "normal",
            "seller_message": "The bank did not return any further details "
                              "with this decline."}
    R.Charge._set_auth_failure = set_auth_failure

    def raise_failure(self):
        contents = {"code": self.failure_code, "charge": self.id,
                    "doc_url": "https://docs.stripe.com/error-codes/"
                               + self.failure_code.replace("_", "-")}
        if getattr(self, "_decline_code", None):
            contents["decline_code"] = self._decline_code
        if self.payment_intent:
            contents["payment_intent"] = self.payment_intent
        err = UserError(402, self.failure_message, contents)
        err.body["error"]["type"] = "card_error"
        raise err
    R.Charge._raise_failure = raise_failure

    # 3. PaymentIntent: accept the parameters async-stripe sends.
    orig_pi_init = R.PaymentIntent.__init__

    def pi_init(self, payment_method_types=None, **kwargs):
        extra = {k: kwargs.pop(k) for k in PI_EXTRA_STORED if k in kwargs}
        for k in PI_EXTRA_IGNORED:
            kwargs.pop(k, None)
        sfu = extra.get("setup_future_usage")
        if sfu is not None and sfu not in ("on_session", "off_session"):
            raise UserError(400, "Invalid setup_future_usage",
                            {"param": "setup_future_usage"})
        orig_pi_init(self, **kwargs)
        for k in PI_EXTRA_STORED:
            setattr(self, k, extra.get(k))
        if self.confirmation_method is None:
            self.confirmation_method = "automatic"
        if isinstance(payment_method_types, list) and payment_method_types:
            self.payment_method_types = payment_method_types
        else:
            self.payment_method_types = ["card"]
        self.__dict__.setdefault("canceled_at", None)
        self.cancellation_reason = None
        self._searchable_at = time.time() + STATE.config["search_lag"]
    R.PaymentIntent.__init__ = pi_init

    orig_pi_create = R.PaymentIntent._api_create.__func__

    def pi_create(cls, confirm=None, off_session=None, **data):
        if off_session in ("one_off", "recurring"):
            off_session = "true"
        obj = orig_pi_create(cls, confirm=confirm, off_session=off_session,
                             **data)
        off = R.try_convert_to_bool(off_session) is True
        if off and obj.status == "requires_action":
            # Off-session payments cannot authenticate: Stripe fails them.
            obj.next_action = None
            obj.payment_method = None
            obj._lpe_override = {
                "type": "card_error", "code": "authentication_required",
                "decline_code": "authentication_required",
                "message": MESSAGES["authentication_required"],
                "doc_url": "https://docs.stripe.com/error-codes/"
                           "authentication-required"}
            R.schedule_webhook(R.Event("payment_intent.payment_failed", obj))
            err = UserError(402, MESSAGES["authentication_required"], {
                "code": "authentication_required",
                "decline_code": "authentication_required",
                "payment_intent": obj.id})
            err.body["error"]["type"] = "card_error"
            raise err
        return obj
    R.PaymentIntent._api_create = classmethod(pi_create)

    # The cancel route holds the original _api_cancel (localstripe binds its
    # extra routes at import), so record canceled_at where it sets _canceled.
    def get_canceled(self):
        return self.__dict__.get("_canceled_flag", False)

    def set_canceled(self, flag):
        self.__dict__["_canceled_flag"] = flag
        if flag and self.__dict__.get("canceled_at") is None:
            self.__dict__["canceled_at"] = int(time.time())
    R.PaymentIntent._canceled = property(get_canceled, set_canceled)

    orig_lpe = R.PaymentIntent.last_payment_error.fget

    def last_payment_error(self):
        if getattr(self, "_lpe_override", None):
            return dict(self._lpe_override)
        err = orig_lpe(self)
        if err is None:
            return None
        err = dict(err)
        if err.get("code") == "payment_intent_authentication_failure":
            err["type"] = "invalid_request_error"
        else:
            err["type"] = "card_error"
            dc = getattr(self.latest_charge, "_decline_code", None)
            if dc:
                err["decline_code"] = dc
        if err.get("code"):
            err["doc_url"] = ("https://docs.stripe.com/error-codes/"
                              + err["code"].replace("_", "-"))
        return err
    R.PaymentIntent.last_payment_error = property(last_payment_error)

    # 4. Refunds: reason, over-refund checks, charge.refunded events.
    orig_refund_init = R.Refund.__init__

    def refund_init(self, charge=None, payment_intent=None, amount=None,
                    metadata=None, reason=None, **kwargs):
        for k in REFUND_IGNORED:
            kwargs.pop(k, None)
        if reason is not None and reason not in REFUND_REASONS:
            raise UserError(400, "Invalid reason: must be one of "
                            + ", ".join(REFUND_REASONS), {"param": "reason"})
        charge_obj = None
        if payment_intent is not None and charge is None:
            pi = R.PaymentIntent._api_retrieve(payment_intent) \
                if isinstance(payment_intent, str) else None
            if pi is not None and pi.latest_charge is None:
                raise UserError(400, "PaymentIntent %s does not have a "
                                "successful charge to refund." % pi.id,
                                {"param": "payment_intent"})
            if pi is not None:
                charge_obj = pi.latest_charge
        elif isinstance(charge, str):
            charge_obj = R.Charge._api_retrieve(charge)
        if charge_obj is not None and charge_obj.status == "succeeded":
            left = charge_obj.amount - charge_obj.amount_refunded
            want = R.try_convert_to_int(amount) if amount is not None \
                else left
            if left <= 0:
                raise UserError(400, "Charge %s has already been refunded."
                                % charge_obj.id,
                                {"code": "charge_already_refunded"})
            if isinstance(want, int) and want > left:
                raise UserError(400, "Refund amount (%d) is greater than "
                                "unrefunded amount on charge (%d)"
                                % (want, left),
                                {"code": "amount_too_large",
                                 "param": "amount"})
        orig_refund_init(self, charge=charge, payment_intent=payment_intent,
                         amount=amount, metadata=metadata, **kwargs)
        self.reason = reason
        ch = R.Charge._api_retrieve(self.charge)
        if self.payment_intent is None:
            self.payment_intent = ch.payment_intent
        R.schedule_webhook(R.Event("charge.refunded", ch))
        R.schedule_webhook(R.Event("refund.created", self))
    R.Refund.__init__ = refund_init

    # 5. Events: api_version, request, pending_webhooks.
    orig_event_init = R.Event.__init__

    def event_init(self, type, data):
        orig_event_init(self, type, data)
        self.api_version = API_VERSION
        ctx = REQUEST_CTX.get()
        self.request = {"id": ctx[0] if ctx else None,
                        "idempotency_key": ctx[1] if ctx else None}
    R.Event.__init__ = event_init
    R.Event.pending_webhooks = property(
        lambda self: STATE.pending_count(self.id))

    # 6. Webhooks: filled payloads, fresh signatures, retries, duplicates.
    webhooks._send_webhook = send_webhook
    return server


# --------------------------------------------------------------------------
# Filling responses
# --------------------------------------------------------------------------

def _store_get(kind, id):
    if not isinstance(id, str):
        return None
    return LS.store.get(kind + ":" + id)


def fill(value):
    """Recursively add what async-stripe needs to a localstripe JSON body."""
    if isinstance(value, list):
        return [fill(v) for v in value]
    if not isinstance(value, dict):
        return value
    obj = value.get("object")
    filler = FILLERS.get(obj) if isinstance(obj, str) else None
    if filler is not None:
        filler(value)
    for k, v in list(value.items()):
        if isinstance(v, (dict, list)):
            value[k] = fill(v)
    return value


def _keep_expanded(field):
    return any(p.split(".")[-1] == field for p in EXPAND_CTX.get())


def fill_payment_intent(d):
    d.pop("charges", None)   # removed from the API in 2022-11-15
    d.pop("invoice", None)   # removed from PaymentIntent in 2025
    lc = d.get("latest_charge")
    if isinstance(lc, dict) and not _keep_expanded("latest_charge"):
        d["latest_charge"] = lc.get("id")
    status, amount = d.get("status"), d.get("amount") or 0
    d["amount_capturable"] = amount if status == "requires_capture" else 0
    d["amount_received"] = amount if status == "succeeded" else 0
    d.setdefault("confirmation_method", "automatic")
    d.setdefault("payment_method_types", ["card"])
    if d.get("capture_method") is None:
        d["capture_method"] = "automatic_async"
    for k in ("description", "setup_future_usage", "canceled_at",
              "cancellation_reason", "receipt_email", "statement_descriptor",
              "statement_descriptor_suffix", "transfer_group", "processing",
              "review", "shipping", "application", "application_fee_amount",
              "on_behalf_of", "transfer_data", "payment_method_options"):
        d.setdefault(k, None)
    d.setdefault("metadata", {})
    d.setdefault("livemode", False)


def fill_charge(d):
    d.pop("invoice", None)
    status = d.get("status")
    d["amount_captured"] = (d.get("amount") or 0) if (
        d.get("captured") and status == "succeeded") else 0
    d["disputed"] = d.get("id") in STATE.disputed_charges
    pm = _pm_for(d.get("payment_method"))
    details = {"address": None, "email": None, "name": None, "phone": None,
               "tax_id": None}
    if pm is not None and isinstance(getattr(pm, "billing_details", None),
                                     dict):
        details.update({k: v for k, v in pm.billing_details.items()
                        if k in details})
    d["billing_details"] = details
    if pm is not None and getattr(pm, "type", None) == "card" and \
            isinstance(getattr(pm, "card", None), dict):
        c = pm.card
        d["payment_method_details"] = {"type": "card", "card": {
            "brand": c.get("brand"), "last4": c.get("last4"),
            "exp_month": c.get("exp_month"), "exp_year": c.get("exp_year"),
            "country": c.get("country"), "funding": c.get("funding"),
            "fingerprint": c.get("fingerprint"), "network": c.get("brand")}}
    if d.get("outcome") is None and status == "succeeded":
        d["outcome"] = {"type": "authorized",
                        "network_status": "approved_by_network",
                        "reason": None, "risk_level": "normal",
                        "seller_message": "Payment complete."}
    for k in ("amount_refunded", "paid", "refunded", "captured"):
        d.setdefault(k, 0 if k == "amount_refunded" else False)
    d.setdefault("metadata", {})
    d.setdefault("livemode", False)


def _pm_for(pm_id):
    if not isinstance(pm_id, str):
        return None
    return LS.store.get("payment_method:" + pm_id)


def fill_refund(d):
    d.pop("date", None)
    d.setdefault("reason", None)
    d.setdefault("metadata", {})
    d.setdefault("status", "succeeded")


def fill_event(d):
    d["api_version"] = API_VERSION
    d.setdefault("request", {"id": None, "idempotency_key": None})
    d["pending_webhooks"] = STATE.pending_count(d.get("id"))
    d.setdefault("livemode", False)


def fill_payment_method(d):
    if not isinstance(d.get("billing_details"), dict):
        d["billing_details"] = {}
    for k in ("address", "email", "name", "phone", "tax_id"):
        d["billing_details"].setdefault(k, None)
    d.setdefault("livemode", False)
    d.setdefault("metadata", {})


def fill_customer(d):
    d.setdefault("livemode", False)
    d.pop("account_balance", None)


def fill_balance_transaction(d):
    d.setdefault("balance_type", "payments")
    if isinstance(d.get("exchange_rate"), int):
        d["exchange_rate"] = float(d["exchange_rate"])


def fill_list(d):
    d.setdefault("has_more", False)
    d.setdefault("url", "")


FILLERS = {"payment_intent": fill_payment_intent, "charge": fill_charge,
           "refund": fill_refund, "event": fill_event,
           "payment_method": fill_payment_method, "customer": fill_customer,
           "balance_transaction": fill_balance_transaction,
           "list": fill_list}


def fill_error(body, status):
    """Give an error body the shape async-stripe parses (``ApiErrors``)."""
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {"message": str(body)}
        body = {"error": err}
    if not err.get("type"):
        err["type"] = "api_error" if status >= 500 else "invalid_request_error"
    pi = err.get("payment_intent")
    if isinstance(pi, str):
        obj = _store_get("payment_intent", pi)
        if obj is None:
            err.pop("payment_intent")
        else:
            err["payment_intent"] = fill(obj._export())
    return body


# --------------------------------------------------------------------------
# Webhooks
# --------------------------------------------------------------------------

_SESSION = None


async def _session():
    global _SESSION
    import aiohttp
    if _SESSION is None or _SESSION.closed:
        _SESSION = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=10))
    return _SESSION


def sign(payload, secret, timestamp=None):
    """``Stripe-Signature`` header value for ``payload`` (bytes)."""
    t = int(time.time()) if timestamp is None else int(timestamp)
    mac = hmac.new(secret.encode("utf-8"), b"%d." % t + payload,
                   hashlib.sha256).hexdigest()
    return "t=%d,v1=%s" % (t, mac)


async def send_webhook(event):
    """Replacement for localstripe's ``webhooks._send_webhook``."""
    from localstripe import webhooks
    # Like Stripe: an event goes to the endpoints that exist when it is
    # created, not to those registered while it waits to be sent.
    targets = [(wid, w) for wid, w in list(webhooks._webhooks.items())
               if w.events is None or event.type in w.events]
    if not targets:
        return
    STATE.pending[event.id] = set(wid for wid, _ in targets)
    task = asyncio.current_task()
    STATE.tasks.add(task)
    try:
        await asyncio.sleep(STATE.config["webhook_delay"])
        await asyncio.gather(*(_deliver(event, wid, w)
                               for wid, w in targets))
    finally:
        STATE.tasks.discard(task)


async def _deliver(event, wid, hook):
    import aiohttp
    cfg = STATE.config
    tries = 1 + max(0, int(cfg["webhook_retries"]))
    stats = STATE.stats["webhooks"]
    copies = 1
    if fault_selected("duplicate", event.id, cfg["webhook_duplicate_ratio"],
                      cfg["fault_seed"]):
        copies = 2
    for copy in range(copies):
        for attempt in range(tries):
            body = fill(event._export())
            if copy:
                body["pending_webhooks"] = 0
            payload = json.dumps(body, indent=2, sort_keys=True).encode()
            headers = {"Content-Type": "application/json; charset=utf-8",
                       "Stripe-Signature": sign(payload, hook.secret),
                       "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/"
                                     "webhooks)"}
            status, error = None, None
            try:
                session = await _session()
                async with session.post(hook.url, data=payload,
                                        headers=headers) as r:
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                error = "%s: %s" % (type(e).__name__, e)
            ok = status is not None and 200 <= status < 300
            STATE.deliveries.append({
                "event": event.id, "type": event.type, "endpoint": wid,
                "url": hook.url, "attempt": attempt + 1,
                "duplicate": bool(copy),
                "status": status, "error": error, "at": time.time()})
            if ok:
                STATE.pending.get(event.id, set()).discard(wid)
                if copy:
                    stats["duplicates"] += 1
                else:
                    stats["delivered"] += 1
                    by = stats["by_type"]
                    by[event.type] = by.get(event.type, 0) + 1
                break
            stats["failed_attempts"] += 1
            if attempt + 1 < tries:
                await asyncio.sleep(cfg["webhook_retry_delay"] * 2 ** attempt)
        else:
            stats["gave_up"] += 1
            return


# --------------------------------------------------------------------------
# HTTP layer
# --------------------------------------------------------------------------

def _json(body, status=200, headers=None):
    from aiohttp import web
    resp = web.Response(
        body=json.dumps(body, indent=2, sort_keys=True).encode() + b"\n",
        status=status, content_type="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _error(status, type_, message, headers=None, **extra):
    err = {"type": type_, "message": message}
    err.update(extra)
    return _json({"error": err}, status, headers)


def _authorized(request):
    from localstripe.server import get_api_key
    try:
        return get_api_key(request) is not None
    except Exception:
        return False


def _expand_paths(pairs):
    return tuple(v for k, v in pairs if re.match(r"^expand(\[\d*\])?$", k))


def _canonical(body):
    try:
        return ("json", json.dumps(json.loads(body), sort_keys=True))
    except (ValueError, UnicodeDecodeError):
        pairs = urllib.parse.parse_qsl(body.decode("utf-8", "replace"),
                                       keep_blank_values=True)
        return ("form", tuple(sorted(pairs)))


async def _forward(request, handler):
    """Run localstripe's handler; return (status, JSON body or None, resp)."""
    from aiohttp import web
    try:
        resp = await handler(request)
    except web.HTTPException as e:
        status = e.status
        if status == 404:
            msg = "Unrecognized request URL (%s: %s)." % (request.method,
                                                          request.path)
        else:
            msg = e.reason or "HTTP %d" % status
        body = {"error": {"message": msg, "type": "invalid_request_error"}}
        return status, body, None
    except Exception as e:  # a localstripe bug: answer like Stripe would
        if STATE.args.verbose:
            import traceback
            traceback.print_exc()
        body = {"error": {"type": "api_error",
                          "message": "localstripe raised %s: %s"
                                     % (type(e).__name__, e)}}
        return 500, body, None
    status = resp.status
    raw = getattr(resp, "body", None)
    if resp.content_type != "application/json" or not isinstance(
            raw, (bytes, bytearray)):
        if status >= 400:
            text = raw.decode("utf-8", "replace") if isinstance(
                raw, (bytes, bytearray)) else resp.reason
            return status, fill_error({"error": {"message": text}},
                                      status), None
        return status, None, resp
    body = json.loads(raw)
    if status == 404:
        m = re.match(r"^/v1/(\w+?)s/([^/]+)", request.path)
        err = body.get("error") if isinstance(body, dict) else None
        if m and isinstance(err, dict) and err.get("message") == "Not Found":
            err.update(code="resource_missing", param="id",
                       message="No such %s: '%s'" % m.groups())
    if status >= 400:
        body = fill_error(body, status)
    else:
        body = fill(body)
    return status, body, resp


def _check_schema(body, status, route):
    if not STATE.args.validate or body is None:
        return
    errs = validate_body(body, status)
    if errs:
        STATE.stats["schema_violations"] += len(errs)
        samples = STATE.stats["schema_violation_samples"]
        if len(samples) < 20:
            samples.append({"route": route, "errors": errs[:5]})
        sys.stderr.write("schema violations on %s: %s\n" % (route, errs[:5]))


async def _respond(request, handler, req_id, idem_key):
    status, body, resp = await _forward(request, handler)
    headers = {"Request-Id": req_id, "Stripe-Version": API_VERSION}
    if idem_key:
        headers["Idempotency-Key"] = idem_key
    if body is None:
        for k, v in headers.items():
            resp.headers[k] = v
        return status, None, resp
    _check_schema(body, status, request.method + " " + request.path)
    return status, body, _json(body, status, headers)


async def _idempotent(request, handler, req_id, key):
    from aiohttp import web
    scope = "%s|%s" % (request.headers.get("Authorization", ""),
                       request.headers.get("Stripe-Account", ""))
    ck = (scope, key)
    raw = await request.read()
    fingerprint = (request.method, request.path, _canonical(raw))
    cfg = STATE.config
    entry = STATE.idem.get(ck)
    if entry is not None:
        if entry["fingerprint"] != fingerprint:
            STATE.stats["idempotency_errors"] += 1
            return _error(400, "idempotency_error", IDEMPOTENCY_MISMATCH % key,
                          {"Request-Id": req_id, "Idempotency-Key": key,
                           "Stripe-Should-Retry": "false"})
        STATE.stats["idempotent_replays"] += 1
        resp = web.Response(body=entry["body"], status=entry["status"],
                            content_type="application/json")
        resp.headers.update({"Request-Id": req_id, "Idempotency-Key": key,
                             "Idempotent-Replayed": "true",
                             "Original-Request": entry["request_id"],
                             "Stripe-Version": API_VERSION})
        return resp
    if ck in STATE.inflight:
        STATE.stats["idempotency_in_flight"] += 1
        return _error(409, "idempotency_error",
                      "There is currently another in-progress request using "
                      "this Stripe API key and idempotency key (%s). Please "
                      "try again later." % key,
                      {"Request-Id": req_id, "Idempotency-Key": key,
                       "Stripe-Should-Retry": "true"},
                      code="idempotency_key_in_use")
    STATE.attempts[ck] = STATE.attempts.get(ck, 0) + 1
    if STATE.attempts[ck] == 1 and fault_selected(
            "fail-first", key, cfg["fail_first_ratio"], cfg["fault_seed"]):
        STATE.stats["injected_failures"] += 1
        return _error(500, "api_error",
                      "injected: first request for this idempotency key "
                      "failed before processing",
                      {"Request-Id": req_id, "Idempotency-Key": key,
                       "Stripe-Should-Retry": "true"})
    STATE.inflight.add(ck)
    try:
        status, body, resp = await _respond(request, handler, req_id, key)
    finally:
        STATE.inflight.discard(ck)
    # Stripe stores the result once the endpoint started executing; requests
    # that failed validation (400, 404...) are not stored.  402 declines are.
    if body is not None and (200 <= status < 300 or status == 402):
        STATE.idem[ck] = {"fingerprint": fingerprint, "status": status,
                          "body": resp.body, "request_id": req_id}
        if ck not in STATE.lost and fault_selected(
                "lose-response", key, cfg["lose_response_ratio"],
                cfg["fault_seed"]):
            STATE.lost.add(ck)
            STATE.stats["lost_responses"] += 1
            if cfg["lose_mode"] == "drop":
                transport = request.transport
                if transport is not None:
                    transport.abort()   # the client sees the socket close
                return web.Response(status=500)  # never reaches the client
            return _error(500, "api_error",
                          "injected: request was processed but the response "
                          "was lost",
                          {"Request-Id": req_id, "Idempotency-Key": key,
                           "Stripe-Should-Retry": "true"})
    return resp


def _middleware():
    from aiohttp import web

    @web.middleware
    async def launcher_middleware(request, handler):
        path = request.path
        if path.startswith("/_launcher/"):
            return await control(request)
        if path.startswith("/_config/"):
            return await handler(request)
        req_id = "req_" + _rand(14)
        key = request.headers.get("Idempotency-Key")
        token = REQUEST_CTX.set((req_id, key))
        pairs = list(request.query.items())
        if request.method == "POST":
            raw = await request.read()
            if not raw.lstrip().startswith(b"{"):
                pairs += urllib.parse.parse_qsl(raw.decode("utf-8", "replace"))
        etoken = EXPAND_CTX.set(_expand_paths(pairs))
        status = 500
        try:
            if request.method == "GET" and \
                    path == "/v1/payment_intents/search":
                resp = await search(request, req_id)
            elif request.method == "GET" and re.match(r"^/v1/disputes/[^/]+$",
                                                      path):
                resp = await get_dispute(request, req_id)
            elif request.method == "POST" and key and path.startswith("/v1/"):
                if not _authorized(request):
                    resp = _error(401, "invalid_request_error",
                                  "Invalid API Key provided.")
                else:
                    resp = await _idempotent(request, handler, req_id, key)
            else:
                _, _, resp = await _respond(request, handler, req_id, None)
            status = resp.status
            if request.transport is None or request.transport.is_closing():
                status = "dropped"
            return resp
        except Exception as e:  # a launcher bug: still answer in Stripe form
            import traceback
            traceback.print_exc()
            resp = _error(500, "api_error", "launcher raised %s: %s"
                          % (type(e).__name__, e), {"Request-Id": req_id})
            status = 500
            return resp
        finally:
            STATE.count_request(request.method, path, status)
            REQUEST_CTX.reset(token)
            EXPAND_CTX.reset(etoken)
            if STATE.args.verbose:
                sys.stderr.write("%s %s %s key=%s\n" % (request.method, path,
                                                        status, key))
    return launcher_middleware


# --------------------------------------------------------------------------
# Search
# --------------------------------------------------------------------------

_CLAUSE = re.compile(r"""\s*(?P<neg>-)?
    (?P<field>metadata\[(?P<q>['"])(?P<mkey>.*?)(?P=q)\]|[a-z_]+)
    \s*(?P<op>>=|<=|:|>|<)\s*
    (?P<val>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|[^\s'"]+)\s*""", re.X)
_JOIN = re.compile(r"\s*(AND|OR)\b\s*")
SEARCH_FIELDS = ("amount", "created", "currency", "customer", "status",
                 "metadata")


class QueryError(ValueError):
    pass


def parse_query(query):
    """Parse Stripe's search language (subset) into (joiner, clauses)."""
    pos, clauses, joins = 0, [], set()
    query = query.strip()
    if not query:
        raise QueryError("The query is empty.")
    while True:
        m = _CLAUSE.match(query, pos)
        if not m:
            raise QueryError("Invalid query: could not parse at offset %d "
                             "(%r)." % (pos, query[pos:pos + 20]))
        field = "metadata" if m.group("mkey") is not None else m.group("field")
        if field not in SEARCH_FIELDS:
            raise QueryError(
                "Field `%s` is an unsupported search field for resource "
                "`payment_intents`. See http://stripe.com/docs/search#query-"
                "fields-for-payment-intents for a list of supported fields."
                % field)
        val = m.group("val")
        if val[0] in "'\"":
            val = re.sub(r"\\(.)", r"\1", val[1:-1])
        elif val != "null":
            try:
                val = int(val)
            except ValueError:
                raise QueryError("Invalid value %r: strings must be quoted."
                                 % val)
        else:
            val = None
        op = m.group("op")
        if op != ":" and field not in ("amount", "created"):
            raise QueryError("Operator %s is only supported on numeric "
                             "fields." % op)
        clauses.append((bool(m.group("neg")), field, m.group("mkey"), op, val))
        pos = m.end()
        if pos >= len(query):
            break
        j = _JOIN.match(query, pos)
        if not j:
            raise QueryError("Invalid query: expected AND or OR at offset %d."
                             % pos)
        joins.add(j.group(1))
        pos = j.end()
    if len(joins) > 1:
        raise QueryError("Mixing AND and OR in a query is not supported.")
    if len(clauses) > 10:
        raise QueryError("A query may have at most 10 clauses.")
    return (joins.pop() if joins else "AND"), clauses


def _clause_matches(pi, clause):
    neg, field, mkey, op, val = clause
    if field == "metadata":
        have = (pi.get("metadata") or {}).get(mkey)
    else:
        have = pi.get(field)
    if op == ":":
        ok = have == val if not isinstance(val, int) or isinstance(
            have, int) else str(have) == str(val)
    else:
        ok = isinstance(have, int) and isinstance(val, int) and {
            ">": have > val, "<": have < val, ">=": have >= val,
            "<=": have <= val}[op]
    return ok != neg


async def search(request, req_id):
    if not _authorized(request):
        return _error(401, "invalid_request_error",
                      "Invalid API Key provided.")
    q = request.query
    try:
        joiner, clauses = parse_query(q.get("query", ""))
        limit = int(q.get("limit", "10"))
        if not 1 <= limit <= 100:
            raise QueryError("Invalid limit: must be between 1 and 100.")
        page = q.get("page")
        offset = 0
        if page:
            try:
                offset = int(base64.urlsafe_b64decode(
                    page[len("page_"):].encode() + b"==").decode())
            except Exception:
                raise QueryError("Invalid page token.")
    except (QueryError, ValueError) as e:
        return _error(400, "invalid_request_error", str(e),
                      {"Request-Id": req_id}, param="query")
    now = time.time()
    items = [(i, o) for i, (k, o) in enumerate(list(LS.store.items()))
             if k.startswith("payment_intent:")
             and getattr(o, "_searchable_at", 0) <= now]
    items.sort(key=lambda io: (io[1].created, io[0]), reverse=True)
    combine = all if joiner == "AND" else any
    found = []
    for _, o in items:
        d = fill(o._export())
        if combine(_clause_matches(d, c) for c in clauses):
            found.append(d)
    chunk = found[offset:offset + limit]
    has_more = offset + limit < len(found)
    next_page = None
    if has_more:
        next_page = "page_" + base64.urlsafe_b64encode(
            str(offset + limit).encode()).decode().rstrip("=")
    body = {"object": "search_result", "data": chunk, "has_more": has_more,
            "next_page": next_page, "url": "/v1/payment_intents/search"}
    _check_schema(body, 200, "GET /v1/payment_intents/search")
    return _json(body, 200, {"Request-Id": req_id,
                             "Stripe-Version": API_VERSION})


# --------------------------------------------------------------------------
# Disputes and control endpoints
# --------------------------------------------------------------------------

def create_dispute(charge=None, payment_intent=None, amount=None,
                   reason="fraudulent"):
    if charge is None and payment_intent is not None:
        pi = _store_get("payment_intent", payment_intent)
        if pi is None or pi.latest_charge is None:
            raise ValueError("no charge for payment_intent %r"
                             % payment_intent)
        charge = pi.latest_charge.id
    ch = _store_get("charge", charge)
    if ch is None:
        raise ValueError("no such charge %r" % charge)
    now = int(time.time())
    dispute = {
        "id": "du_" + _rand(14), "object": "dispute",
        "amount": int(amount) if amount is not None else ch.amount,
        "balance_transactions": [], "charge": ch.id, "created": now,
        "currency": ch.currency, "enhanced_eligibility_types": [],
        "evidence": {"enhanced_evidence": {}},
        "evidence_details": {"due_by": now + 7 * 86400,
                             "enhanced_eligibility": {},
                             "has_evidence": False, "past_due": False,
                             "submission_count": 0},
        "is_charge_refundable": False, "livemode": False, "metadata": {},
        "payment_intent": ch.payment_intent, "reason": reason,
        "status": "needs_response"}
    STATE.disputes[dispute["id"]] = dispute
    STATE.disputed_charges.add(ch.id)
    LS.schedule_webhook(LS.Event("charge.dispute.created", _Raw(dispute)))
    return dispute


async def get_dispute(request, req_id):
    if not _authorized(request):
        return _error(401, "invalid_request_error",
                      "Invalid API Key provided.")
    did = request.path.rsplit("/", 1)[1]
    d = STATE.disputes.get(did)
    if d is None:
        return _error(404, "invalid_request_error",
                      "No such dispute: '%s'" % did, {"Request-Id": req_id},
                      code="resource_missing", param="id")
    return _json(d, 200, {"Request-Id": req_id})


async def _payload(request):
    raw = await request.read()
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        from localstripe.server import unflatten_data
        return unflatten_data(await request.post())


async def control(request):
    """``/_launcher/*``: stats, webhooks, disputes, config, reset, health."""
    from localstripe import webhooks
    path, method = request.path, request.method
    try:
        if path == "/_launcher/health":
            return _json({"ok": True})
        if path == "/_launcher/stats" and method == "GET":
            return _json(STATE.stats)
        if path == "/_launcher/webhooks" and method == "POST":
            data = await _payload(request)
            url = data.get("url")
            if not url or not str(url).startswith("http"):
                return _error(400, "invalid_request_error", "url required")
            secret = data.get("secret") or "whsec_" + _rand(24)
            events = data.get("events")
            if isinstance(events, str):
                events = [events]
            wid = data.get("id") or "we_" + _rand(14)
            webhooks.register_webhook(wid, url, secret, events)
            return _json({"id": wid, "url": url, "secret": secret,
                          "events": events})
        if path == "/_launcher/webhooks" and method == "GET":
            return _json({"endpoints": [
                {"id": k, "url": w.url, "events": w.events}
                for k, w in webhooks._webhooks.items()]})
        if path == "/_launcher/webhooks/deliveries" and method == "GET":
            return _json({"deliveries": STATE.deliveries})
        if path == "/_launcher/disputes" and method == "POST":
            data = await _payload(request)
            try:
                d = create_dispute(data.get("charge"),
                                   data.get("payment_intent"),
                                   data.get("amount"),
                                   data.get("reason") or "fraudulent")
            except ValueError as e:
                return _error(400, "invalid_request_error", str(e))
            return _json(d)
        if path == "/_launcher/config" and method in ("GET", "POST"):
            if method == "POST":
                data = await _payload(request)
                for k, v in data.items():
                    if k == "decline_payment_methods":
                        STATE.decline_pms.update(v)
                    elif k not in STATE.config:
                        return _error(400, "invalid_request_error",
                                      "unknown config key %s" % k)
                    else:
                        STATE.config[k] = v if isinstance(v, str) and k in (
                            "lose_mode", "fault_seed") else float(v)
            return _json(dict(STATE.config,
                              decline_payment_methods=STATE.decline_pms))
        if path == "/_launcher/reset" and method == "POST":
            LS.store.clear()
            STATE.reset()
            webhooks._webhooks.clear()
            register_cli_webhooks()
            return _json({"ok": True})
    except Exception as e:
        return _error(500, "api_error", "%s: %s" % (type(e).__name__, e))
    return _error(404, "invalid_request_error",
                  "Unrecognized request URL (%s: %s)." % (method, path))


# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

def build_parser():
    p = argparse.ArgumentParser(
        description="Fake Stripe API (localstripe + idempotency, search, "
                    "fault injection, filled fields) for async-stripe tests.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0,
                   help="0 picks a free port (printed as READY <port>)")
    p.add_argument("--fail-first-ratio", type=float, default=0.0,
                   help="share of idempotency keys whose first request is "
                        "answered 500 api_error without being processed")
    p.add_argument("--lose-response-ratio", type=float, default=0.0,
                   help="share of idempotency keys whose first processed "
                        "request is stored but answered 500 (or dropped)")
    p.add_argument("--lose-mode", choices=("500", "drop"), default="500",
                   help="how a lost response looks: 500 api_error, or the "
                        "connection closed without an answer")
    p.add_argument("--fault-seed", default="",
                   help="salt for the key hash, to pick other keys")
    p.add_argument("--decline-payment-method", action="append",
                   metavar="NAME[=DECLINE_CODE]",
                   help="make payment method id NAME decline (default "
                        "decline code generic_decline); repeatable")
    p.add_argument("--webhook", action="append", metavar="URL=SECRET",
                   help="register a webhook endpoint at start; repeatable")
    p.add_argument("--webhook-delay", type=float, default=0.2,
                   help="seconds before an event is sent (localstripe: 1)")
    p.add_argument("--webhook-retries", type=int, default=3)
    p.add_argument("--webhook-retry-delay", type=float, default=0.5,
                   help="first retry delay, doubled each retry")
    p.add_argument("--webhook-duplicate-ratio", type=float, default=0.0,
                   help="share of events (by id hash) delivered twice")
    p.add_argument("--search-lag", type=float, default=0.0,
                   help="seconds before a new PaymentIntent is searchable")
    p.add_argument("--no-validate", dest="validate", action="store_false",
                   help="do not check responses against the async-stripe "
                        "schema (violations are counted in stats)")
    p.add_argument("--verbose", action="store_true")
    return p


def register_cli_webhooks():
    """(Re-)register the ``--webhook URL=SECRET`` endpoints."""
    from localstripe import webhooks
    for i, spec in enumerate(STATE.args.webhook or []):
        url, _, secret = spec.rpartition("=")
        webhooks.register_webhook("we_cli_%d" % i, url, secret, None)


async def serve(args, ready=None):
    """Run until cancelled; call ``ready(port)`` once listening."""
    global STATE
    from aiohttp import web
    STATE = State(args)
    server = patch_localstripe()
    if args.validate:
        load_schema()
    app = server.app
    app.middlewares.insert(0, _middleware())
    register_cli_webhooks()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port)
    await site.start()
    port = runner.addresses[0][1]
    if ready:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        if _SESSION is not None:
            await _SESSION.close()
        await runner.cleanup()


def main(argv=None):
    args = build_parser().parse_args(argv)

    def ready(port):
        sys.stdout.write("READY %d\n" % port)
        sys.stdout.flush()
    asyncio.run(serve(args, ready))


# --------------------------------------------------------------------------
# Importable handle for pytest
# --------------------------------------------------------------------------

class StripeLauncher:
    """Start ``stripe_launcher.py`` as a subprocess (one localstripe per
    process: its state is module-global) and talk to its control API.

    >>> with StripeLauncher(fail_first_ratio=0.2) as s:
    ...     s.base_url  # 'http://127.0.0.1:PORT/' for ClientBuilder::url
    """

    def __init__(self, port=0, host="127.0.0.1", python=None, log_path=None,
                 **options):
        self.host, self.requested_port = host, port
        self.python = python or sys.executable
        self.options = options
        self.log_path = log_path
        self.proc = None
        self.port = None

    def argv(self):
        argv = [self.python, os.path.abspath(__file__), "--host", self.host,
                "--port", str(self.requested_port)]
        for k, v in self.options.items():
            flag = "--" + k.replace("_", "-")
            if v is True:
                argv.append(flag)
            elif v is False and k == "validate":
                argv.append("--no-validate")
            elif isinstance(v, (list, tuple)):
                for item in v:
                    argv += [flag, str(item)]
            elif v is not None and v is not False:
                argv += [flag, str(v)]
        return argv

    def start(self, timeout=30.0):
        import tempfile
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="stripe_launcher_",
                                                 suffix=".log")
            os.close(fd)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv(), stdout=subprocess.PIPE,
                                     stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        result = {}

        def read():
            line = self.proc.stdout.readline().decode()
            result["line"] = line
        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        line = result.get("line", "")
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError("launcher did not start: %r; log:\n%s"
                               % (line, self.log_tail()))
        self.port = int(line.split()[1])
        return self

    def log_tail(self, n=4000):
        try:
            with open(self.log_path, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None and self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def base_url(self):
        """API base for async-stripe: ``ClientBuilder::new(sk).url(this)``."""
        return "http://%s:%d/" % (self.host, self.port)

    def control(self, method, path, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.base_url + "_launcher/" + path, data=data, method=method,
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stats(self):
        return self.control("GET", "stats")

    def reset(self):
        return self.control("POST", "reset", {})

    def configure(self, **config):
        return self.control("POST", "config", config)

    def register_webhook(self, url, secret=None, events=None):
        return self.control("POST", "webhooks", {"url": url, "secret": secret,
                                                 "events": events})

    def create_dispute(self, payment_intent=None, charge=None, amount=None,
                       reason="fraudulent"):
        return self.control("POST", "disputes", {
            "payment_intent": payment_intent, "charge": charge,
            "amount": amount, "reason": reason})

    def deliveries(self):
        return self.control("GET", "webhooks/deliveries")["deliveries"]


if __name__ == "__main__":
    main()
