"""The benchmarks' latency mode: tasks sent at a fixed rate through the Python Celery client. Two latencies per
task: from ``send_task`` to its result's PUBLISH on the Redis result backend (a PSUBSCRIBE listener stamps
arrivals: what a waiting client sees), and from ``send_task`` to the ``date_done`` the worker wrote into the result
(the shared yardstick's definition, ``shared/bench/celery_bench.py``: the worker's part, without the result's
round trip and the listener's wake-up)."""
import json
import threading
import time
import uuid
from datetime import datetime


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def fixed_rate(app, queue, r, name, kwargs_of, rate, seconds):
    """Sends ``name`` at ``rate``/s for ``seconds``; returns each task's latency in ms (send → result published)."""
    return fixed_rate_detail(app, queue, r, name, kwargs_of, rate, seconds)["published"]


def fixed_rate_detail(app, queue, r, name, kwargs_of, rate, seconds):
    """As :func:`fixed_rate`; returns latencies in ms, the first second (warm-up) left out of each:
    ``published`` (send → result PUBLISH heard), ``date_done`` (send → the worker's ``date_done``) and ``queued``
    (``send_task`` returned, so the message is in Redis → ``date_done``: the worker alone, without the client's
    ~0.6 ms of ``send_task``)."""
    arrived, sent, sent_wall, queued_wall = {}, {}, {}, {}
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe("*celery-task-meta-*")
    stop = threading.Event()

    def listen():
        while not stop.is_set():
            m = pubsub.get_message(timeout=0.05)
            if m and m["type"] == "pmessage":
                arrived[m["channel"].decode().rsplit("celery-task-meta-", 1)[1]] = time.perf_counter()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    n = int(rate * seconds)
    # As the shared yardstick sends: one producer held throughout, and no SUBSCRIBE per task (a stock client
    # subscribes to each result's channel before publishing; the listener above hears every result anyway).
    on_task_call = app.backend.on_task_call
    app.backend.on_task_call = lambda producer, task_id: None
    try:
        with app.producer_or_acquire() as producer:
            start = time.perf_counter() + 0.2
            for i in range(n):
                due = start + i / rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                tid = str(uuid.uuid4())
                sent_wall[tid] = time.time()
                sent[tid] = time.perf_counter()
                app.send_task(name, kwargs=kwargs_of(i), queue=queue, task_id=tid, producer=producer)
                queued_wall[tid] = time.time()
    finally:
        app.backend.on_task_call = on_task_call
    deadline = time.time() + 30
    while len([t for t in sent if t in arrived]) < n and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    listener.join()
    pubsub.close()
    lat = [1000 * (arrived[t] - sent[t]) for t in sent if t in arrived]
    assert len(lat) == n, f"{name}: {n - len(lat)} of {n} results never arrived"
    ids = list(sent)
    done, queued = [], []
    for lo in range(0, n, 500):
        chunk = ids[lo:lo + 500]
        for tid, raw in zip(chunk, r.mget([f"celery-task-meta-{t}" for t in chunk])):
            if raw is not None:
                at = json.loads(raw).get("date_done")
                if at:
                    at = datetime.fromisoformat(at).timestamp()
                    done.append(1000 * (at - sent_wall[tid]))
                    queued.append(1000 * (at - queued_wall[tid]))
    skip = int(rate)  # the first second warms up
    return {k: v[skip:] if len(v) > 2 * skip else v
            for k, v in (("published", lat), ("date_done", done), ("queued", queued))}
