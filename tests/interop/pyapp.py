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

Task contract (same names as celeriac's built-in tasks):

    bench.noop(*args)            -> None
    bench.add(x, y)              -> x + y
    bench.echo(x)                -> x
    bench.sleep(seconds)         -> None, after sleeping
    bench.xsum(numbers)          -> sum(numbers)
    bench.mark(i, key, url)      -> i, after HINCRBY key i 1 on Redis ``url``
    bench.fail(message)          -> raises ValueError(message)
    bench.panic()                -> raises TaskPanicked

Extra side effect, Python-only: ``bench.mark`` also does
``HINCRBY <key>:workers <node name> 1`` so mixed-fleet tests can tell which
Python node ran how many marks (celeriac is not required to do this; its share
is "total minus the Python nodes' shares").
"""
import os
import time

import redis
from celery import Celery


def celery_settings(broker, backend, keyprefix="", acks_late=False,
                    visibility_timeout=None, default_queue="celery"):
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
    )


app = Celery("pyapp")
app.conf.update(_settings_from_env())


class TaskPanicked(Exception):
    """Python stand-in for a Rust task panic (celeriac stores exc_type TaskPanicked)."""


@app.task(name="bench.noop")
def noop(*args):
    return None


@app.task(name="bench.add")
def add(x, y):
    return x + y


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
