"""Small helpers shared by the interop tests and fixtures (no pytest fixtures here).

Polling, fast publishing through the real Celery client, reading result metas
straight from Redis, and the kombu Redis key layout (priority sub-lists,
unacked bookkeeping) that both celeriac and Python Celery must use.
"""
import contextlib
import json
import time

#: kombu's Redis priority separator and steps (kombu/transport/redis.py).
PRIORITY_SEP = "\x06\x16"
PRIORITY_STEPS = (0, 3, 6, 9)


def priority_key(prefix, queue, priority=0):
    """The Redis list kombu LPUSHes a message of ``priority`` into.

    The step is the largest of 0/3/6/9 not above ``priority``; step 0 is the
    bare queue name, the others are ``queue + "\\x06\\x16" + step``.
    """
    step = max(s for s in PRIORITY_STEPS if s <= priority)
    return prefix + queue if step == 0 else f"{prefix}{queue}{PRIORITY_SEP}{step}"


def queue_depth(redis_client, prefix, queue):
    """Messages waiting in ``queue`` over all four priority sub-lists."""
    pipe = redis_client.pipeline(transaction=False)
    for step in PRIORITY_STEPS:
        pipe.llen(priority_key(prefix, queue, step))
    return sum(pipe.execute())


def unacked_counts(redis_client, prefix):
    """(HLEN unacked, ZCARD unacked_index) under ``prefix``: both 0 when nothing is held."""
    pipe = redis_client.pipeline(transaction=False)
    pipe.hlen(prefix + "unacked")
    pipe.zcard(prefix + "unacked_index")
    return tuple(pipe.execute())


def wait_for(predicate, timeout, interval=0.05, message="condition"):
    """Poll ``predicate()`` until it returns a truthy value; return that value.

    Raises AssertionError naming ``message`` (and the last value seen) when
    ``timeout`` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message} (last value: {last!r})")
        time.sleep(interval)


@contextlib.contextmanager
def _no_result_subscriptions(app):
    """Skip the Redis backend's per-task SUBSCRIBE while publishing in bulk.

    A stock client subscribes to ``celery-task-meta-<id>`` for every task it
    sends so that ``.get()`` cannot miss the result; for thousands of tasks
    that is thousands of extra round trips. Bulk publishers read results back
    with MGET instead (``fetch_metas``).
    """
    backend = app.backend
    backend.on_task_call = lambda producer, task_id: None
    try:
        yield
    finally:
        del backend.on_task_call  # back to the class method


def publish_many(app, task, arg_list, batch=1000, **options):
    """Send ``task`` once per args tuple through one producer, pipelined.

    Uses kombu 5.7's ``Producer.batch`` (N LPUSHes per round trip) on one
    connection: this is the real Celery client path, only batched. Returns
    the task ids in publish order. ``options`` go to ``send_task`` (queue,
    priority, ignore_result, ...).
    """
    ids = []
    with _no_result_subscriptions(app), app.producer_or_acquire() as producer, \
            producer.batch(max_size=batch):
        for args in arg_list:
            ids.append(app.send_task(task, args=args, producer=producer, **options).id)
    return ids


def fetch_metas(redis_client, prefix, task_ids, chunk=2000):
    """Result metas (decoded JSON dicts, or None when absent) for ``task_ids``, via MGET."""
    metas = []
    for i in range(0, len(task_ids), chunk):
        keys = [f"{prefix}celery-task-meta-{tid}" for tid in task_ids[i:i + chunk]]
        metas.extend(json.loads(v) if v is not None else None for v in redis_client.mget(keys))
    return metas
