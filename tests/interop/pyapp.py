"""Python Celery app implementing celeriac's ``bench.*`` task contract.

This is the *reference* side of the interop suite and of ``bench/drain.py``:
a stock Celery 5.7 worker started with ``celery -A pyapp worker ...`` runs the
same task names, argument conventions and failure modes that the celeriac
binary implements natively, so the two can share queues (mixed fleets) and be
compared (benchmarks).

Everything is configured from the environment, so one module serves every
test isolation (key prefix, acks_late, visibility timeout):

    INTEROP_BROKER              broker URL       (default redis://127.0.0.1:6379/0)
    INTEROP_BACKEND             result backend   (default: same as the broker)
    INTEROP_KEYPREFIX           global_keyprefix for broker *and* result keys
                                (default "", i.e. none)
    INTEROP_ACKS_LATE           "1" = task_acks_late (default "0")
    INTEROP_VISIBILITY_TIMEOUT  broker visibility_timeout in seconds (default:
                                kombu's 3600)
    INTEROP_QUEUE               task_default_queue (default "celery"), used by
                                ``celery -A pyapp call`` when --queue is omitted
    INTEROP_CONF_JSON           JSON object of extra Celery settings (e.g.
                                ``{"task_track_started": true}``); the
                                ``*_transport_options`` dicts are merged, not
                                replaced; celeriac-only keys are dropped
    INTEROP_TASK_ANNOTATIONS_JSON
                                JSON ``task_annotations`` (task name -> options);
                                ``autoretry_for`` holds exception class *names*
                                (as in celeriac's TOML), resolved here to classes;
                                celeriac-only options are dropped

Task contract (same names as celeriac's built-in tasks):

    bench.noop(*args)            -> None
    bench.add(x, y)              -> x + y
    bench.mul(x, y)              -> x * y
    bench.echo(x)                -> x
    bench.sleep(seconds)         -> None, after sleeping
    bench.xsum(numbers)          -> sum(numbers)
    bench.mark(i, key, url)      -> i, after HINCRBY key i 1 on Redis ``url``
    bench.fail(message)          -> raises ValueError(message)
    bench.panic()                -> raises TaskPanicked
    bench.flaky(times, countdown) -> self.retry(countdown=countdown) while
                                 request.retries < times, then returns
                                 request.retries (max_retries: Celery's 3)
    bench.slow(seconds)          -> loops in small sleeps for ``seconds``; True
                                 when stopped early by the soft time limit
                                 (SoftTimeLimitExceeded), else False
    bench.progress(steps)        -> steps, after update_state(PROGRESS,
                                 {"done": i, "total": steps}) + 0.2 s sleep
                                 for i in 1..=steps

Tracing (test_traces.py): with ``INTEROP_OTLP_ENDPOINT`` set, each pool process instruments Celery with
``opentelemetry-instrumentation-celery`` and exports its spans there (service ``python-worker``).

Extra side effect, Python-only: ``bench.mark`` also does
``HINCRBY <key>:workers <node name> 1`` so mixed-fleet tests can tell which
Python node ran how many marks (celeriac is not required to do this; its share
is "total minus the Python nodes' shares").
"""
import builtins
import json
import os
import time

import redis
from celery import Celery
from celery import exceptions as celery_exceptions
from celery.exceptions import SoftTimeLimitExceeded

#: Settings / per-task options only celeriac knows; Python Celery has no equivalent.
CELERIAC_ONLY_SETTINGS = frozenset({"worker_eta_horizon", "worker_shutdown_timeout", "worker_bench_tasks"})
CELERIAC_ONLY_TRANSPORT_OPTIONS = frozenset({"queue_order_strategy", "queue_weights"})
CELERIAC_ONLY_TASK_OPTIONS = frozenset({"rate_limit_scope"})


def celery_settings(broker, backend, keyprefix="", acks_late=False,
                    visibility_timeout=None, default_queue="celery", ignore_result=False):
    """The Celery configuration shared by the test client and this worker.

    Kept in one function so the client side of the tests (conftest.py) and the
    worker side can never disagree about prefixes or serializers.
    """
    broker_opts = {}
    backend_opts = {}
    if keyprefix:
        # kombu prefixes every broker key (queues, bindings, unacked, ...);
        # Celery's Redis backend prefixes every result key and its channel.
        broker_opts["global_keyprefix"] = keyprefix
        backend_opts["global_keyprefix"] = keyprefix
    if visibility_timeout is not None:
        broker_opts["visibility_timeout"] = visibility_timeout
    return {
        "broker_url": broker,
        "result_backend": backend,
        "broker_transport_options": broker_opts,
        "result_backend_transport_options": backend_opts,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_default_queue": default_queue,
        "task_acks_late": acks_late,
        "task_ignore_result": ignore_result,
        "broker_connection_retry_on_startup": True,
        # No events, no remote control: nothing but task traffic, so tests
        # running one after another cannot hear each other's broadcasts.
        "worker_send_task_events": False,
        "task_send_sent_event": False,
        "worker_enable_remote_control": False,
    }


def _settings_from_env():
    broker = os.environ.get("INTEROP_BROKER", "redis://127.0.0.1:6379/0")
    vt = os.environ.get("INTEROP_VISIBILITY_TIMEOUT")
    return celery_settings(
        broker=broker,
        backend=os.environ.get("INTEROP_BACKEND", broker),
        keyprefix=os.environ.get("INTEROP_KEYPREFIX", ""),
        acks_late=os.environ.get("INTEROP_ACKS_LATE", "0") == "1",
        visibility_timeout=float(vt) if vt else None,
        default_queue=os.environ.get("INTEROP_QUEUE", "celery"),
        ignore_result=os.environ.get("INTEROP_IGNORE_RESULT", "0") == "1",
    )


def _exception_class(name):
    """``"ValueError"`` -> ValueError (builtins, celery.exceptions, or this module)."""
    for namespace in (builtins, celery_exceptions):
        cls = getattr(namespace, name, None)
        if isinstance(cls, type) and issubclass(cls, BaseException):
            return cls
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        return cls
    raise ValueError(f"pyapp: unknown exception class in autoretry_for: {name!r}")


def _extra_settings_from_env(settings):
    """Apply INTEROP_CONF_JSON / INTEROP_TASK_ANNOTATIONS_JSON on top of ``settings``."""
    extra = json.loads(os.environ.get("INTEROP_CONF_JSON") or "{}")
    for key, value in extra.items():
        if key in CELERIAC_ONLY_SETTINGS:
            continue
        if key.endswith("_transport_options"):
            merged = dict(settings.get(key) or {})
            merged.update({k: v for k, v in value.items() if k not in CELERIAC_ONLY_TRANSPORT_OPTIONS})
            settings[key] = merged
        else:
            settings[key] = value
    annotations = json.loads(os.environ.get("INTEROP_TASK_ANNOTATIONS_JSON") or "{}")
    if annotations:
        prepared = {}
        for task_name, options in annotations.items():
            options = {k: v for k, v in options.items() if k not in CELERIAC_ONLY_TASK_OPTIONS}
            if "autoretry_for" in options:
                options["autoretry_for"] = tuple(_exception_class(n) for n in options["autoretry_for"])
            prepared[task_name] = options
        settings["task_annotations"] = prepared
    return settings


app = Celery("pyapp")

if os.environ.get("INTEROP_OTLP_ENDPOINT"):
    from celery.signals import worker_process_init

    @worker_process_init.connect(weak=False)
    def _init_tracing(*args, **kwargs):
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.instrumentation.celery import CeleryInstrumentor
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": "python-worker"}))
        endpoint = os.environ["INTEROP_OTLP_ENDPOINT"].rstrip("/") + "/v1/traces"
        provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
        trace.set_tracer_provider(provider)
        CeleryInstrumentor().instrument()
# Before any task is defined: annotations (autoretry_for above all) are applied
# when a task class is bound to the app.
app.conf.update(_extra_settings_from_env(_settings_from_env()))


class TaskPanicked(Exception):
    """Python stand-in for a Rust task panic (celeriac stores exc_type TaskPanicked)."""


@app.task(name="bench.noop")
def noop(*args):
    return None


@app.task(name="bench.add")
def add(x, y):
    return x + y


@app.task(name="bench.mul")
def mul(x, y):
    return x * y


@app.task(name="bench.echo")
def echo(x):
    return x


@app.task(name="bench.sleep")
def sleep(seconds):
    time.sleep(seconds)
    return None


@app.task(name="bench.xsum")
def xsum(numbers):
    return sum(numbers)


# One Redis client per URL per (pool) process: bench.mark may run thousands of
# times and must not pay a new TCP connection each time.
_mark_clients = {}


@app.task(name="bench.mark", bind=True)
def mark(self, i, key, redis_url):
    """Exactly-once probe: HINCRBY key i 1 (plus the per-node tally, see module doc)."""
    client = _mark_clients.get(redis_url)
    if client is None:
        client = _mark_clients[redis_url] = redis.Redis.from_url(redis_url)
    pipe = client.pipeline(transaction=True)
    pipe.hincrby(key, i, 1)
    pipe.hincrby(f"{key}:workers", self.request.hostname or "?", 1)
    pipe.execute()
    return i


@app.task(name="bench.fail")
def fail(message):
    raise ValueError(message)


@app.task(name="bench.panic")
def panic():
    raise TaskPanicked("task panicked")


@app.task(name="bench.flaky", bind=True)
def flaky(self, times, countdown):
    """Retry (no exception) ``times`` times, ``countdown`` seconds apart; return the retry count."""
    if self.request.retries < times:
        raise self.retry(countdown=countdown)
    return self.request.retries


@app.task(name="bench.slow")
def slow(seconds):
    """Busy for ``seconds`` in 50 ms sleeps; True when the soft time limit stopped it early."""
    deadline = time.monotonic() + seconds
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(0.05, left))
    except SoftTimeLimitExceeded:
        return True


@app.task(name="bench.progress", bind=True)
def progress(self, steps):
    """Store PROGRESS {"done": i, "total": steps} for i in 1..=steps, 0.2 s apart; return steps."""
    for i in range(1, steps + 1):
        self.update_state(state="PROGRESS", meta={"done": i, "total": steps})
        time.sleep(0.2)
    return steps
