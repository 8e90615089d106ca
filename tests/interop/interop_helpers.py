"""Small helpers shared by the interop tests and fixtures (no pytest fixtures here).

Polling, fast publishing through the real Celery client, reading result metas
straight from Redis, and the kombu Redis key layout (priority sub-lists,
unacked bookkeeping) that both celeriac and Python Celery must use; a client
for Flower's HTTP API (the real Flower's and ``celeriac flower``'s) and a
Prometheus text parser; a progress sampler for failover tests.
"""
import contextlib
import json
import re
import socket
import threading
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


# ------------------------------------------------------------ Flower's HTTP API
class HttpAnswer:
    """One HTTP answer: status, headers, raw body; ``body`` is the decoded JSON when the
    Content-Type says JSON, else the text (exactly as sent, no unquoting)."""

    def __init__(self, status, headers, raw):
        self.status = status
        self.headers = headers
        self.raw = raw

    @property
    def content_type(self):
        return self.headers.get("Content-Type", "")

    @property
    def text(self):
        return self.raw.decode(errors="replace")

    def json(self):
        return json.loads(self.raw)

    @property
    def body(self):
        return self.json() if self.content_type.startswith("application/json") else self.text

    def __repr__(self):
        return f"<{self.status} {self.content_type!r} {self.text[:400]!r}>"


class FlowerClient:
    """A client for a running Flower (the real one or ``celeriac flower``) and its process.

    ``request`` / ``get`` / ``post`` take query parameters as keywords (``get`` and ``post`` insist on 200);
    ``call`` is the general form: JSON or form bodies, basic auth, and the whole ``HttpAnswer``.
    """

    def __init__(self, proc, kind, base=None, auth=None):
        self.proc = proc
        #: "flower" (the real one) or "celeriac"
        self.kind = kind
        self.base = base
        #: "user:password" sent as basic auth with every request unless ``call`` says otherwise
        self.auth = auth

    def log_tail(self, lines=40):
        return self.proc.log_tail(lines)

    def call(self, method, path, params=None, *, json_body=None, form=None, auth=None, timeout=15):
        """``METHOD path?params`` (``json_body`` or ``form`` as the body; POST without either sends an
        empty body); returns an ``HttpAnswer`` whatever the status."""
        import base64
        import urllib.error
        import urllib.parse
        import urllib.request

        url = self.base + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {}
        data = b"" if method == "POST" else None
        if json_body is not None:
            data = json.dumps(json_body).encode()
            headers["Content-Type"] = "application/json"
        elif form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        auth = self.auth if auth is None else auth
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return HttpAnswer(resp.status, resp.headers, resp.read())
        except urllib.error.HTTPError as exc:
            return HttpAnswer(exc.code, exc.headers, exc.read())

    def request(self, method, path, **query):
        """(status, decoded JSON body or text) of ``METHOD path?query``."""
        answer = self.call(method, path, query or None)
        return answer.status, answer.body

    def get(self, path, **query):
        answer = self.call("GET", path, query or None)
        assert answer.status == 200, f"{self.kind}: GET {path} {query}: {answer!r}\nlog:\n{self.log_tail()}"
        return answer.body

    def post(self, path, **query):
        answer = self.call("POST", path, query or None)
        assert answer.status == 200, f"{self.kind}: POST {path} {query}: {answer!r}\nlog:\n{self.log_tail()}"
        return answer.body

    def wait(self, predicate, timeout, message):
        try:
            return wait_for(predicate, timeout, interval=0.2, message=f"{self.kind}: {message}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.kind} log:\n{self.log_tail()}") from None

    def task(self, task_id):
        """/api/task/info/<id>, or None while Flower has seen no event of it."""
        answer = self.call("GET", f"/api/task/info/{task_id}")
        return answer.body if answer.status == 200 else None

    def task_in(self, task_id, state):
        info = self.task(task_id)
        return info if info and info["state"] == state else None

    def dashboard_row(self, name):
        """The worker's row of the dashboard (``/workers?json=1``, what the workers table renders)."""
        rows = [row for row in self.get("/workers", json=1)["data"] if row["hostname"] == name]
        return rows[0] if rows else None


_METRIC_LINE = re.compile(r'^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$')
_METRIC_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text):
    """Prometheus text or OpenMetrics -> ``{(name, frozenset(labels.items())): float}`` (comments skipped)."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        found = _METRIC_LINE.match(line)
        assert found, f"not a metric sample line: {line!r}"
        name, labels, value = found.groups()
        labels = frozenset(_METRIC_LABEL.findall(labels or ""))
        samples[(name, labels)] = float(value)
    return samples


def metric(samples, name, **labels):
    """The value of series ``name{labels}`` (exactly those labels), or None."""
    return samples.get((name, frozenset(labels.items())))


class Progress:
    """Samples the executions count every 5 ms; after the fault, the longest stretch without a new execution
    is the failover as the worker lives it, and its end is when it consumes again."""

    def __init__(self, client, key):
        self.client, self.key, self.points, self.stop_flag = client, key, [], False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop_flag:
            self.points.append((time.monotonic(), self.client.hlen(self.key)))
            time.sleep(0.005)

    def stop(self, t0):
        """(seconds from ``t0`` to the end of the longest stall after it, that stall's length)."""
        self.stop_flag = True
        self.thread.join(2)
        changes = [(t, n) for (t, n), (_, prev) in zip(self.points[1:], self.points) if n != prev and t >= t0]
        best, last = (0.0, t0), t0
        for t, _ in changes:
            if t - last > best[0]:
                best = (t - last, t)
            last = t
        return best[1] - t0, best[0]


def free_port():
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_metric(worker, name, **labels):
    """The value of series ``name{labels}`` on a worker's ``/metrics`` (``worker.metrics_addr``); 0 when absent."""
    import urllib.request
    text = urllib.request.urlopen(f"http://{worker.metrics_addr}/metrics", timeout=5).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} " if want else f"{name} "):
            return float(line.split()[-1])
    return 0.0
