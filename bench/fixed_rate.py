"""The benchmarks' latency mode: tasks sent at a fixed rate through the Python Celery client, each one's latency
from ``send_task`` to its result's PUBLISH on the Redis result backend (a PSUBSCRIBE listener stamps arrivals)."""
import threading
import time
import uuid


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def fixed_rate(app, queue, r, name, kwargs_of, rate, seconds):
    """Sends ``name`` at ``rate``/s for ``seconds``; returns each task's latency in ms (send → result published)."""
    arrived, sent = {}, {}
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
    start = time.perf_counter() + 0.2
    for i in range(n):
        due = start + i / rate
        pause = due - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        tid = str(uuid.uuid4())
        sent[tid] = time.perf_counter()
        app.send_task(name, kwargs=kwargs_of(i), queue=queue, task_id=tid)
    deadline = time.time() + 30
    while len([t for t in sent if t in arrived]) < n and time.time() < deadline:
        time.sleep(0.05)
    stop.set()
    listener.join()
    pubsub.close()
    lat = [1000 * (arrived[t] - sent[t]) for t in sent if t in arrived]
    assert len(lat) == n, f"{name}: {n - len(lat)} of {n} results never arrived"
    skip = int(rate)  # the first second warms up
    return lat[skip:] if len(lat) > 2 * skip else lat
