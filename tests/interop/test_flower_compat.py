"""``celeriac flower`` (flower-compat) answers like the real Flower 2.2.

Most tests run the real, unmodified Flower (PyPI ``flower``, the ``flower`` fixture) and ``celeriac flower``
(the ``celeriac_flower`` fixture) side by side against the same celeriac worker, send the same requests to
both and compare the answers: status, Content-Type and body (same keys in the same order, same values;
ids and timestamps included, since both are built from the same events). Answers Flower gives with
values no second run can reproduce (a new task id) are compared on their shape. Status codes, content types
and messages are also checked against answers captured from Flower 2.2 (``captures/flower-*.json``,
copied from ``shared/spec/captures``).

Where celeriac flower does something Flower cannot (a persisted task history, retention, queue lengths
in ``/metrics``, a label-free metrics mode, RabbitMQ), the test asserts the documented behaviour.

A comparison collects every difference before failing, so one run lists all of them.
"""
import json
import os
import shutil
import subprocess
import time
import uuid
from datetime import datetime
from zoneinfo import ZoneInfo

import pytest

from conftest import HERE, celeriac_bin
from interop_helpers import metric, parse_metrics, queue_depth, wait_for

pytestmark = pytest.mark.celeriac_only(reason="celeriac flower is the implementation under test")

GET_TIMEOUT = 10
CAPTURES = HERE / "captures"
POSTGRES_URL = os.environ.get("CELERIAC_TEST_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
#: A server time zone other than the workers' UTC (and without DST), for test_server_time_zone_like_flower.
FLOWER_TZ = "Asia/Tokyo"


# ------------------------------------------------------------------- helpers
def capture(name):
    """A captured Flower 2.2 answer: {"request", "status", "content_type", "response"}."""
    return json.loads((CAPTURES / f"flower-{name}.json").read_text())


def watched_worker(workers, **options):
    """A worker sending task events and heartbeats (what both Flowers feed on)."""
    return workers.start(settings={"worker_send_task_events": True}, heartbeat=True, **options)


def online(fl, node, timeout=15):
    """Wait until ``fl`` shows ``node`` online (a heartbeat reached its event consumer)."""
    fl.wait(lambda: fl.get("/api/workers", status=1).get(node) is True, timeout, f"{node} online")


def view(answer):
    """What a client of the API sees of an answer."""
    return answer.status, answer.content_type, answer.body


def captured_view(name, **replace):
    """``view`` of a captured answer, with ``replace`` (old -> new: the capture's ids and names by the
    test's) applied to the body's text."""
    cap = capture(name)
    text = json.dumps(cap["response"])
    for old, new in replace.items():
        text = text.replace(old, new)
    return cap["status"], cap["content_type"], json.loads(text)


def short(value, limit=400):
    """``repr(value)``, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


class Differences:
    """Collects every way celeriac flower's answers differ from Flower's, then fails once with all of them."""

    def __init__(self):
        self.items = []

    def same(self, what, ours, flowers):
        if ours != flowers:
            self.items.append(f"{what}:\n      celeriac: {short(ours)}\n      flower:   {short(flowers)}")

    def same_answer(self, what, ours, flowers):
        self.same(what, view(ours), view(flowers) if hasattr(flowers, "status") else flowers)

    def same_dict(self, what, ours, flowers):
        """Same keys in the same order and the same values (each differing field listed)."""
        if not isinstance(ours, dict) or not isinstance(flowers, dict):
            self.same(what, ours, flowers)
            return
        if list(ours) != list(flowers):
            self.items.append(f"{what}: keys\n      celeriac: {list(ours)}\n      flower:   {list(flowers)}")
        for key in flowers:
            if key in ours and ours[key] != flowers[key]:
                self.items.append(f"{what}[{key!r}]:\n      celeriac: {short(ours[key])}\n"
                                  f"      flower:   {short(flowers[key])}")

    def check(self):
        assert not self.items, (f"celeriac flower differs from Flower 2.2 in {len(self.items)} place(s):\n  - "
                                + "\n  - ".join(self.items))


def series_name(name, labels):
    """``name{label="value",...}`` with the labels sorted."""
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels)) + "}"


def ask_both(ours, real, method, path, params=None, **body):
    """The same request to celeriac flower and to Flower: (ours, flower's) ``HttpAnswer``."""
    return (ours.call(method, path, params, **body), real.call(method, path, params, **body))


def wait_states(fl, expected, timeout=15):
    """Wait until ``fl`` shows every task id of ``expected`` ({id: state}) in that state."""
    def done():
        return all(fl.task_in(task_id, state) for task_id, state in expected.items())
    fl.wait(done, timeout, f"tasks in states {expected}")


def local_minute(ts, tz=FLOWER_TZ):
    """``%Y-%m-%d %H:%M`` of Unix time ``ts`` in ``tz`` (Flower reads received_start/received_end as the
    server's local time)."""
    return datetime.fromtimestamp(ts, ZoneInfo(tz)).strftime("%Y-%m-%d %H:%M")


def flower_has_option(option):
    """Whether ``celeriac flower --help`` lists ``option``."""
    done = subprocess.run([celeriac_bin(), "flower", "--help"], capture_output=True, text=True, timeout=30)
    return option in done.stdout


def psql(sql, url=POSTGRES_URL):
    """Run ``sql`` with the psql CLI; returns its unaligned output."""
    done = subprocess.run(["psql", url, "-v", "ON_ERROR_STOP=1", "-qAtc", sql],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"psql {sql!r}: {done.stderr}"
    return done.stdout


# --------------------------------------------------------------------- tests
def test_workers_like_flower(workers, iso, flower, celeriac_flower):
    worker = watched_worker(workers)
    node = worker.name
    real, ours = flower(), celeriac_flower()
    for fl in (real, ours):
        online(fl, node)
    # Flower's start-up inspection (stats, active_queues, registered, conf) lands in the background.
    summary = {"stats", "active_queues", "registered", "conf", "timestamp"}
    real.wait(lambda: set(real.get("/api/workers").get(node, ())) == summary, 10, "the start-up inspection")
    ours.wait(lambda: "registered" in ours.get("/api/workers").get(node, {}), 10, "the start-up inspection")
    diffs = Differences()

    # ?status=1: {node: alive}.
    status = ask_both(ours, real, "GET", "/api/workers", {"status": 1})
    diffs.same_answer("GET /api/workers?status=1", status[0], status[1])
    diffs.same("GET /api/workers?status=1 (capture)", status[0].status,
               capture("workers-status")["status"])
    assert view(status[1]) == (200, "application/json; charset=UTF-8", {node: True})

    # Without a worker name Flower inspects stats, active_queues, registered and conf only: the task lists
    # (scheduled, active, reserved, revoked) are fetched only when one worker is asked for.
    listing = ask_both(ours, real, "GET", "/api/workers")
    ours_all, real_all = listing[0].body, listing[1].body
    diffs.same("GET /api/workers: status, content type", (listing[0].status, listing[0].content_type),
               (listing[1].status, listing[1].content_type))
    diffs.same("GET /api/workers: nodes", sorted(ours_all), sorted(real_all))
    diffs.same("GET /api/workers: keys of the node", sorted(ours_all.get(node, {})), sorted(summary))
    # The same inspect replies (live counters such as clock, uptime and rusage aside).
    for method in ("registered", "active_queues", "conf"):
        diffs.same(f"GET /api/workers: {method}", ours_all.get(node, {}).get(method), real_all[node][method])
    for key in ("pid", "pool", "prefetch_count", "broker"):
        diffs.same(f"GET /api/workers: stats.{key}", ours_all.get(node, {}).get("stats", {}).get(key),
                   real_all[node]["stats"][key])
    assert isinstance(ours_all.get(node, {}).get("timestamp"), float)

    # One worker, refreshed: all eight inspect replies.
    one = ask_both(ours, real, "GET", "/api/workers", {"workername": node, "refresh": 1})
    full = summary | {"scheduled", "active", "reserved", "revoked"}
    diffs.same("GET /api/workers?workername=N&refresh=1: status, content type", one[0].status, one[1].status)
    diffs.same("GET /api/workers?workername=N&refresh=1: keys", sorted(one[0].body.get(node, {})), sorted(full))
    assert sorted(one[1].body[node]) == sorted(full)
    for method in ("scheduled", "active", "reserved", "revoked", "registered", "active_queues", "conf"):
        diffs.same(f"GET /api/workers?workername=N&refresh=1: {method}",
                   one[0].body.get(node, {}).get(method), one[1].body[node][method])
    # ... and served from the cache afterwards.
    cached = ask_both(ours, real, "GET", "/api/workers", {"workername": node})
    diffs.same("GET /api/workers?workername=N: keys", sorted(cached[0].body.get(node, {})),
               sorted(cached[1].body[node]))

    # An unknown worker: 404, the reason as plain text.
    unknown = ask_both(ours, real, "GET", "/api/workers", {"workername": "nope@x"})
    diffs.same_answer("GET /api/workers?workername=nope@x", unknown[0], unknown[1])
    diffs.same("GET /api/workers?workername=nope@x (capture)", view(unknown[0]), captured_view("workers-unknown"))
    health = ask_both(ours, real, "GET", "/healthcheck")
    diffs.same("GET /healthcheck (capture)", view(health[0]), captured_view("healthcheck"))

    # Shut down through celeriac flower: the worker exits, both hear worker-offline.
    bye = ours.call("POST", f"/api/worker/shutdown/{node}")
    diffs.same("POST /api/worker/shutdown/<node> (capture)", view(bye), captured_view("worker-shutdown"))
    wait_for(lambda: not worker.alive, 10, message="the worker to exit after celeriac flower's shutdown")
    assert worker.proc.returncode == 0
    real.wait(lambda: real.get("/api/workers", status=1) == {node: False}, 5, "the worker offline")
    offline = ask_both(ours, real, "GET", "/api/workers", {"status": 1})
    diffs.same_answer("GET /api/workers?status=1 after worker-offline", offline[0], offline[1])
    for fl in (ours, real):
        samples = parse_metrics(fl.call("GET", "/metrics").text)
        diffs.same(f"{fl.kind}: flower_worker_online after worker-offline",
                   metric(samples, "flower_worker_online", worker=node), 0.0)
    gone = ask_both(ours, real, "POST", f"/api/worker/pool/grow/{node}")
    diffs.same("POST /api/worker/pool/grow/<offline node>: status", gone[0].status, gone[1].status)
    diffs.check()


def test_tasks_like_flower(workers, iso, client_app, flower, celeriac_flower):
    worker = watched_worker(workers)
    node = worker.name
    real, ours = flower(env={"TZ": "UTC"}), celeriac_flower(env={"TZ": "UTC"})
    for fl in (real, ours):
        online(fl, node)
    t0 = time.time()
    # Its task-sent event comes after the task finished (a client publishes the event after the message,
    # so a fast worker often wins): Celery's state takes every field of a late event but the state.
    late = client_app.send_task("bench.add", (7, 7))
    assert late.get(timeout=GET_TIMEOUT) == 14
    for fl in (real, ours):
        wait_states(fl, {late.id: "SUCCESS"})
    with client_app.events.default_dispatcher(hostname=f"late-client@{iso.tag}") as dispatcher:
        dispatcher.send("task-sent", uuid=late.id, root_id=late.id, parent_id=None, name="bench.add",
                        args="(7, 7)", kwargs="{}", retries=0, eta=None, expires=None,
                        queue=iso.queue, exchange="", routing_key=iso.queue)
    for fl in (real, ours):
        fl.wait(lambda fl=fl: (fl.task(late.id) or {}).get("client") == f"late-client@{iso.tag}", 5,
                "the late task-sent")

    client_app.conf.task_send_sent_event = True  # task-sent for the rest: sent, client, exchange, routing_key
    adds = [client_app.send_task("bench.add", (i, i * 10)) for i in range(1, 4)]
    named = client_app.send_task("bench.add", kwargs={"x": 5, "y": 6})
    bad = client_app.send_task("bench.fail", ("boom",))
    later = client_app.send_task("bench.add", (2, 3), countdown=2)
    # Sent to a queue nobody consumes: known only from its task-sent event (no worker, never received).
    parked = client_app.send_task("bench.add", (9, 9), queue=f"{iso.queue}.nobody")
    assert [r.get(timeout=GET_TIMEOUT) for r in adds] == [11, 22, 33]
    assert named.get(timeout=GET_TIMEOUT) == 11
    with pytest.raises(ValueError):
        bad.get(timeout=GET_TIMEOUT)
    for fl in (real, ours):
        wait_states(fl, {later.id: "RECEIVED"}, 5)
    revoke = ask_both(ours, real, "POST", f"/api/task/revoke/{later.id}")
    assert view(revoke[1]) == (200, "application/json; charset=UTF-8", {"message": f"Revoked '{later.id}'"})
    assert view(revoke[0]) == view(revoke[1])
    expected = {**{r.id: "SUCCESS" for r in adds}, named.id: "SUCCESS", bad.id: "FAILURE",
                later.id: "REVOKED", parked.id: "PENDING", late.id: "SUCCESS"}
    for fl in (real, ours):
        wait_states(fl, expected, 10)
    ids = set(expected)
    diffs = Differences()

    # The whole list: same ids in the same order, each task with the same keys in the same order and the
    # same values.
    listed = ask_both(ours, real, "GET", "/api/tasks")
    ours_tasks, real_tasks = listed[0].body, listed[1].body
    assert set(real_tasks) == ids
    diffs.same("GET /api/tasks: status, content type", (listed[0].status, listed[0].content_type),
               (listed[1].status, listed[1].content_type))
    diffs.same("GET /api/tasks: task ids in order", list(ours_tasks), list(real_tasks))
    for task_id, task in real_tasks.items():
        diffs.same_dict(f"GET /api/tasks [{task['name']} {task['state']} {task_id[:8]}]",
                        ours_tasks.get(task_id), task)
    # The per-task key order Flower 2.2 writes (worker last, only when there is one).
    order = list(capture("tasks-search")["response"].values())[0]
    assert list(real_tasks[bad.id]) == list(order)
    assert "worker" not in real_tasks[parked.id]

    # Filters, sorting, paging and search: the same tasks in the same order.
    queries = [
        {"limit": 2}, {"limit": 2, "offset": 1}, {"offset": 5},
        {"sort_by": "-received"}, {"sort_by": "received"}, {"sort_by": "name"}, {"sort_by": "-name"},
        {"sort_by": "state"}, {"sort_by": "started"}, {"sort_by": "-started"},
        {"sort_by": "-received", "limit": 3, "state": "SUCCESS", "taskname": "bench.add"},
        {"state": "SUCCESS"}, {"state": "FAILURE"}, {"state": "REVOKED"}, {"state": "PENDING"}, {"state": "All"},
        {"taskname": "bench.add"}, {"taskname": "bench.fail"}, {"taskname": "All"},
        {"workername": node}, {"workername": node, "limit": 2}, {"workername": "All"},
        {"received_start": "2020-01-01 00:00", "limit": 2, "offset": 1},
        {"received_start": local_minute(t0 - 120, "UTC")}, {"received_end": local_minute(t0 + 3600, "UTC")},
        {"search": "state:FAILURE"}, {"search": "state:failure"}, {"search": "bench.fail"}, {"search": "boom"},
        {"search": "BENCH.FAIL"}, {"search": f"worker:{node}"}, {"search": "SUCCESS"}, {"search": node},
        {"search": 'args:"(1, 10)"'}, {"search": "kwargs:x=5"}, {"search": "bench.fail OR state:REVOKED"},
    ]
    for query in queries:
        answer = ask_both(ours, real, "GET", "/api/tasks", query)
        diffs.same(f"GET /api/tasks?{query}: status", answer[0].status, answer[1].status)
        if answer[0].status == 200 and answer[1].status == 200:
            diffs.same(f"GET /api/tasks?{query}: ids in order", list(answer[0].body), list(answer[1].body))
    # Parameters Flower refuses.
    for query in ({"sort_by": "bogus"}, {"limit": "x"}, {"search": "ab"}, {"received_start": "yesterday"}):
        answer = ask_both(ours, real, "GET", "/api/tasks", query)
        diffs.same_answer(f"GET /api/tasks?{query}", answer[0], answer[1])

    types = ask_both(ours, real, "GET", "/api/task/types")
    diffs.same_answer("GET /api/task/types", types[0], types[1])
    diffs.same("GET /api/task/types: keys (capture)", list(types[0].body), list(capture("task-types")["response"]))
    assert types[1].body == {"task-types": ["bench.add", "bench.fail"]}

    for task_id in ids:
        info = ask_both(ours, real, "GET", f"/api/task/info/{task_id}")
        diffs.same("GET /api/task/info: status, content type", (info[0].status, info[0].content_type),
                   (info[1].status, info[1].content_type))
        diffs.same_dict(f"GET /api/task/info [{real_tasks[task_id]['state']} {task_id[:8]}]",
                        info[0].body, info[1].body)
    diffs.same("GET /api/task/info: key order (capture)", list(ours.get(f"/api/task/info/{adds[0].id}")),
               list(capture("task-info-success")["response"]))
    nobody = "00000000-0000-0000-0000-000000000000"
    unknown = ask_both(ours, real, "GET", f"/api/task/info/{nobody}")
    diffs.same_answer("GET /api/task/info/<unknown>", unknown[0], unknown[1])
    diffs.same("GET /api/task/info/<unknown> (capture)", view(unknown[0]), captured_view("task-info-unknown"))

    # Results come from the result backend: success, failure (with the worker's traceback), revoked, pending.
    pending = str(uuid.uuid4())
    for task_id, what in ((adds[0].id, "success"), (bad.id, "failure"), (later.id, "revoked"),
                          (pending, "pending")):
        answer = ask_both(ours, real, "GET", f"/api/task/result/{task_id}")
        diffs.same_answer(f"GET /api/task/result/<{what}>", answer[0], answer[1])
    assert view(real.call("GET", f"/api/task/result/{adds[0].id}")) == \
        (200, "application/json; charset=UTF-8", {"task-id": adds[0].id, "state": "SUCCESS", "result": 11})
    diffs.same("GET /api/task/result/<success> (capture)", view(ours.call("GET", f"/api/task/result/{adds[0].id}")),
               captured_view("task-result-success", **{"d5a0979d-1867-4f70-a75e-15887edcbd7d": adds[0].id,
                                                       '"result": 5': '"result": 11'}))
    diffs.same("GET /api/task/result/<pending> (capture)", view(ours.call("GET", f"/api/task/result/{pending}")),
               captured_view("task-result-pending", **{"0735841b-f54f-4223-a6f7-334d631a3274": pending}))
    failed = real.get(f"/api/task/result/{bad.id}")
    assert list(failed) == list(capture("task-result-failure")["response"])
    assert failed["result"] == "ValueError('boom')" and "ValueError: boom" in failed["traceback"]

    # The task metrics both derive from the same events.
    samples = [parse_metrics(fl.call("GET", "/metrics").text) for fl in (ours, real)]
    for name in ("flower_events_total", "flower_worker_prefetched_tasks", "flower_task_prefetch_time_seconds",
                 "flower_task_runtime_seconds_count", "flower_worker_online",
                 "flower_worker_number_of_currently_executing_tasks"):
        mine, theirs = ({series_name(name, labels): v for (n, labels), v in s.items() if n == name}
                        for s in samples)
        for series in sorted(set(mine) | set(theirs)):
            diffs.same(f"GET /metrics: {series}", mine.get(series), theirs.get(series))
    diffs.check()


def test_server_time_zone_like_flower(workers, client_app, flower, celeriac_flower):
    """Flower running in a time zone other than its workers': Celery's event receiver moves each event's
    timestamp by the difference of the two UTC offsets (``utcoffset`` in the event vs the server's), and
    received_start/received_end are read in the server's local time."""
    worker = watched_worker(workers)  # runs in UTC, its events say utcoffset 0
    real, ours = flower(env={"TZ": FLOWER_TZ}), celeriac_flower(env={"TZ": FLOWER_TZ})
    for fl in (real, ours):
        online(fl, worker.name)
    t0 = time.time()
    done = client_app.send_task("bench.add", (1, 2))
    assert done.get(timeout=GET_TIMEOUT) == 3
    for fl in (real, ours):
        wait_states(fl, {done.id: "SUCCESS"})
    diffs = Differences()
    info = ask_both(ours, real, "GET", f"/api/task/info/{done.id}")
    for key in ("received", "started", "succeeded", "timestamp"):
        diffs.same(f"TZ={FLOWER_TZ}: GET /api/task/info [{key}]", info[0].body[key], info[1].body[key])
    for query in ({"received_start": local_minute(t0 - 120)}, {"received_end": local_minute(t0 - 120)},
                  {"received_start": local_minute(t0 - 120, "UTC")}):
        answer = ask_both(ours, real, "GET", "/api/tasks", query)
        diffs.same(f"TZ={FLOWER_TZ}: GET /api/tasks?{query}", list(answer[0].body), list(answer[1].body))
    diffs.check()


def test_task_api_and_control_like_flower(workers, iso, client_app, redis_client, flower, celeriac_flower):
    worker = watched_worker(workers, concurrency=2)
    node = worker.name
    real, ours = flower(), celeriac_flower()
    for fl in (real, ours):
        online(fl, node)
        fl.wait(lambda fl=fl: "registered" in fl.get("/api/workers").get(node, {}), 10, "the start-up inspection")
    diffs = Differences()
    json_type = "application/json; charset=UTF-8"

    # async-apply: {"task-id", "state"} at once; the task runs.
    for fl in (ours, real):
        answer = fl.call("POST", "/api/task/async-apply/bench.add", json_body={"args": [1, 2]})
        assert answer.status == 200 and answer.content_type == json_type, (fl.kind, answer)
        diffs.same(f"{fl.kind}: POST /api/task/async-apply keys", list(answer.body),
                   list(capture("task-async-apply")["response"]))
        assert client_app.AsyncResult(answer.body["task-id"]).get(timeout=GET_TIMEOUT) == 3
    unknown = ask_both(ours, real, "POST", "/api/task/async-apply/bench.nope", json_body={"args": [1]})
    diffs.same_answer("POST /api/task/async-apply/bench.nope", unknown[0], unknown[1])
    diffs.same("POST /api/task/async-apply/<unknown> (capture)", view(unknown[0]),
               captured_view("task-async-apply-unknown", **{"tasks.nope": "bench.nope"}))

    # send-task: no registry check, {"task-id", "state"}.
    for fl in (ours, real):
        answer = fl.call("POST", "/api/task/send-task/bench.add", json_body={"args": [7, 8], "kwargs": {}})
        assert answer.status == 200 and answer.content_type == json_type, (fl.kind, answer)
        diffs.same(f"{fl.kind}: POST /api/task/send-task keys", list(answer.body),
                   list(capture("task-send-task")["response"]))
        assert client_app.AsyncResult(answer.body["task-id"]).get(timeout=GET_TIMEOUT) == 15

    # apply: waits for the result.
    applied = ask_both(ours, real, "POST", "/api/task/apply/bench.add", json_body={"args": [3, 4]})
    ok = [(a.status, a.content_type, list(a.body), {k: v for k, v in a.body.items() if k != "task-id"})
          for a in applied]
    diffs.same("POST /api/task/apply/bench.add", ok[0], ok[1])
    assert ok[1] == (200, json_type, list(capture("task-apply")["response"]), {"result": 7, "state": "SUCCESS"})
    fails = ask_both(ours, real, "POST", "/api/task/apply/bench.fail", json_body={"args": ["bad"]})
    shapes = [(a.status, a.content_type, list(a.body), a.body.get("result"), a.body.get("state")) for a in fails]
    diffs.same("POST /api/task/apply/bench.fail", shapes[0], shapes[1])
    assert shapes[1] == (200, json_type, list(capture("task-apply-failure")["response"]), "ValueError('bad')",
                         "FAILURE")
    diffs.same("POST /api/task/apply/bench.fail: traceback", fails[0].body.get("traceback"),
               fails[1].body["traceback"])
    # apply's "timeout": give up waiting, answer {"task-id", "state"}.
    started = time.monotonic()
    waited = ours.call("POST", "/api/task/apply/bench.sleep", json_body={"args": [2], "timeout": 0.5})
    ours_elapsed = time.monotonic() - started
    theirs = real.call("POST", "/api/task/apply/bench.sleep", json_body={"args": [2], "timeout": 0.5})
    diffs.same("POST /api/task/apply/bench.sleep {timeout: 0.5}: keys, state",
               (waited.status, list(waited.body), waited.body.get("state"), ours_elapsed < 1.5),
               (theirs.status, list(theirs.body), theirs.body.get("state"), True))

    # revoke: no reply awaited, Flower's message.
    some_id = str(uuid.uuid4())
    revoked = ask_both(ours, real, "POST", f"/api/task/revoke/{some_id}")
    diffs.same_answer("POST /api/task/revoke/<id>", revoked[0], revoked[1])
    diffs.same("POST /api/task/revoke (capture)", view(revoked[0]),
               captured_view("task-revoke", **{"b76a1983-3adf-4ec1-8405-64a33623dc3b": some_id}))
    # revoke with terminate=true stops a running task.
    running = client_app.send_task("bench.sleep", (30,))
    ours.wait(lambda: ours.task_in(running.id, "STARTED"), 10, "bench.sleep started")
    answer = ours.call("POST", f"/api/task/revoke/{running.id}", {"terminate": "true", "signal": "SIGKILL"})
    assert view(answer) == captured_view("task-revoke-terminate",
                                         **{"b685376c-f1ec-47bf-8038-03d0f3d257db": running.id})
    wait_for(lambda: client_app.AsyncResult(running.id).state == "REVOKED", 10, message="terminated task REVOKED")
    for fl in (ours, real):
        info = fl.wait(lambda fl=fl: fl.task_in(running.id, "REVOKED"), 5, "the terminated task REVOKED")
        assert info["revoked"] >= info["started"] > 0

    # rate-limit and timeout take form fields; Flower checks the task name against its app, then the worker.
    form_cases = [
        ("/api/task/rate-limit/bench.add", {"ratelimit": "100/s", "workername": node}),
        ("/api/task/rate-limit/bench.add", {"ratelimit": "100/s"}),
        ("/api/task/rate-limit/bench.nope", {"ratelimit": "100/s", "workername": node}),
        ("/api/task/rate-limit/bench.add", {"ratelimit": "100/s", "workername": "nobody@x"}),
        ("/api/task/timeout/bench.slow", {"hard": "5", "soft": "4", "workername": node}),
        ("/api/task/timeout/bench.nope", {"hard": "5", "soft": "4", "workername": node}),
    ]
    for path, form in form_cases:
        answer = ask_both(ours, real, "POST", path, form=form)
        diffs.same_answer(f"POST {path} {form}", answer[0], answer[1])
    diffs.same("POST /api/task/rate-limit (capture)",
               view(ours.call("POST", "/api/task/rate-limit/bench.add", form={"ratelimit": "10/s",
                                                                               "workername": node})),
               captured_view("task-rate-limit"))
    diffs.same("POST /api/task/timeout (capture)",
               view(ours.call("POST", "/api/task/timeout/bench.slow", form={"hard": "5", "workername": node})),
               captured_view("task-timeout"))

    # Addressed to one worker, a command returns as soon as that worker replied (kombu stops waiting after
    # len(destination) replies), not after the inspect timeout (1 s).
    for fl in (ours, real):
        started = time.monotonic()
        fl.post("/api/task/rate-limit/bench.add", ratelimit="100/s", workername=node)
        fl.get("/api/workers", refresh=1, workername=node)
        diffs.same(f"{fl.kind}: rate-limit + refresh of one worker answered in < 0.8 s",
                   round(time.monotonic() - started, 2) < 0.8, True)

    # The pool: grown by each, then shrunk by each.
    def pool():
        return ours.get("/api/workers", refresh=1, workername=node)[node]["stats"]["pool"]["max-concurrency"]
    for verb, size in (("grow", 4), ("shrink", 2)):
        answer = ask_both(ours, real, "POST", f"/api/worker/pool/{verb}/{node}", {"n": 1})
        diffs.same_answer(f"POST /api/worker/pool/{verb}/<node>?n=1", answer[0], answer[1])
        message = f"{'Growing' if verb == 'grow' else 'Shrinking'} '{node}' worker's pool by 1"
        assert view(answer[1]) == (200, json_type, {"message": message})
        if verb == "grow":
            diffs.same("POST /api/worker/pool/grow (capture)", view(answer[0]),
                       captured_view("worker-pool-grow", **{"w1@vm": node}))
        wait_for(lambda size=size: pool() == size, 5, message=f"pool size {size}")
    nobody = ask_both(ours, real, "POST", "/api/worker/pool/grow/nobody@x")
    diffs.same_answer("POST /api/worker/pool/grow/nobody@x", nobody[0], nobody[1])
    diffs.same("POST /api/worker/pool/grow/nobody@x (capture)", view(nobody[0]), captured_view("worker-unknown-grow"))

    # Consumers: each server adds and cancels once, so each answer has its twin.
    extra = f"{iso.queue}.extra"
    add_ours = ours.call("POST", f"/api/worker/queue/add-consumer/{node}", {"queue": extra})
    cancel_real = real.call("POST", f"/api/worker/queue/cancel-consumer/{node}", {"queue": extra})
    add_real = real.call("POST", f"/api/worker/queue/add-consumer/{node}", {"queue": extra})
    cancel_ours = ours.call("POST", f"/api/worker/queue/cancel-consumer/{node}", {"queue": extra})
    diffs.same_answer("POST /api/worker/queue/add-consumer", add_ours, add_real)
    diffs.same_answer("POST /api/worker/queue/cancel-consumer", cancel_ours, cancel_real)
    assert view(add_real) == captured_view("worker-queue-add-consumer", extra=extra)
    assert view(cancel_real) == captured_view("worker-queue-cancel-consumer", extra=extra)

    # Queue lengths of the queues the last inspection found active: consume `extra`, let both see it in a
    # refresh, stop consuming (no refresh), and park three messages there.
    assert ours.post(f"/api/worker/queue/add-consumer/{node}", queue=extra) == {"message": f"add consumer {extra}"}
    for fl in (ours, real):
        assert extra in [q["name"] for q in fl.get("/api/workers", refresh=1, workername=node)[node]["active_queues"]]
    ours.post(f"/api/worker/queue/cancel-consumer/{node}", queue=extra)
    for i in range(3):
        client_app.send_task("bench.add", (i, i), queue=extra)
    assert queue_depth(redis_client, iso.prefix, extra) == 3
    lengths = ask_both(ours, real, "GET", "/api/queues/length")
    diffs.same_answer("GET /api/queues/length", lengths[0], lengths[1])
    shape = captured_view("queues-length")
    diffs.same("GET /api/queues/length: shape (capture)",
               (lengths[0].status, lengths[0].content_type, list(lengths[0].body),
                {tuple(q) for q in lengths[0].body["active_queues"]}),
               (shape[0], shape[1], list(shape[2]), {tuple(q) for q in shape[2]["active_queues"]}))
    assert view(lengths[1]) == (200, json_type, {"active_queues": [
        {"name": iso.queue, "messages": 0}, {"name": extra, "messages": 3},
        {"name": f"{iso.queue}.ready.1", "messages": 0}]})
    diffs.check()


def test_auth_and_read_only_like_flower(workers, flower, celeriac_flower):
    cases = capture("auth-behaviour")
    secured = ("--basic-auth", "admin:secret", "--read-only")
    real = flower("--basic_auth=admin:secret", "--read_only", unauthenticated=False)
    ours = celeriac_flower(*secured, unauthenticated=False)
    diffs = Differences()

    def answer(fl, path, auth, method="GET"):
        got = fl.call(method, path, auth=auth or "")
        return got.status, got.content_type, got.text, got.headers.get("WWW-Authenticate")

    for case in ("basic_auth_no_creds_api", "basic_auth_wrong_creds_api", "basic_auth_ok_api",
                 "basic_auth_no_creds_healthcheck"):
        cap = cases[case]
        path = cap["url"].split("5592", 1)[1]
        mine, theirs = answer(ours, path, cap["auth"]), answer(real, path, cap["auth"])
        diffs.same(f"{case}: GET {path}", mine, theirs)
        expected_body = "{}" if case == "basic_auth_ok_api" else cap["body_head"]  # no worker in this test
        diffs.same(f"{case} (capture)", mine[:3], (cap["status"], cap["headers"]["Content-Type"], expected_body))
    for path in ("/metrics", "/healthcheck"):
        diffs.same(f"GET {path} without credentials: status", ours.call("GET", path).status, 200)

    # Read-only: every change is refused (after authentication), reads still work.
    for method, path in (("POST", "/api/task/async-apply/bench.add"), ("POST", f"/api/task/revoke/{uuid.uuid4()}"),
                         ("POST", "/api/worker/pool/grow/nobody@x"), ("POST", "/api/task/rate-limit/bench.add"),
                         ("GET", "/api/tasks")):
        mine, theirs = answer(ours, path, "admin:secret", method), answer(real, path, "admin:secret", method)
        diffs.same(f"--read-only: {method} {path}", mine, theirs)
        if method == "POST":
            diffs.same(f"--read-only: {method} {path} (Flower's message)", mine[:3],
                       (403, "text/plain; charset=UTF-8", "Read only mode is enabled"))
        nocreds = answer(ours, path, None, method)
        diffs.same(f"--read-only: {method} {path} without credentials", nocreds[:3], answer(real, path, None, method)[:3])

    # No basic auth and no FLOWER_UNAUTHENTICATED_API: the API is closed, the rest open.
    closed = celeriac_flower(unauthenticated=False)
    for case in ("no_auth_no_env_api", "no_auth_no_env_metrics"):
        cap = cases[case]
        path = cap["url"].split("5593", 1)[1]
        got = closed.call("GET", path)
        mine = (got.status, got.content_type, got.text[:len(cap["body_head"])])
        if case.endswith("metrics"):
            diffs.same(f"{case}: status", got.status, cap["status"])
        else:
            diffs.same(f"{case} (capture)", mine, (cap["status"], cap["headers"]["Content-Type"], cap["body_head"]))
    diffs.same("no auth, no env: GET /healthcheck", view(closed.call("GET", "/healthcheck")),
               captured_view("healthcheck"))
    # FLOWER_UNAUTHENTICATED_API opens it.
    opened = celeriac_flower()
    diffs.same("FLOWER_UNAUTHENTICATED_API=1: GET /api/workers?status=1",
               view(opened.call("GET", "/api/workers", {"status": 1})), (200, "application/json; charset=UTF-8", {}))
    diffs.check()


def _tasks_survive_a_restart(workers, client_app, celeriac_flower, **options):
    """Tasks seen by one celeriac flower are listed, unchanged, by the next one on the same database."""
    worker = watched_worker(workers)
    first = celeriac_flower(**options)
    online(first, worker.name)
    ok = [client_app.send_task("bench.add", (i, 1)) for i in range(3)]
    bad = client_app.send_task("bench.fail", ("kept",))
    client_app.conf.task_send_sent_event = True
    parked = client_app.send_task("bench.add", (0, 0), queue=f"{workers.iso.queue}.nobody")  # never received
    assert [r.get(timeout=GET_TIMEOUT) for r in ok] == [1, 2, 3]
    with pytest.raises(ValueError):
        bad.get(timeout=GET_TIMEOUT)
    wait_states(first, {**{r.id: "SUCCESS" for r in ok}, bad.id: "FAILURE", parked.id: "PENDING"})
    before = first.get("/api/tasks")
    infos = {task_id: first.get(f"/api/task/info/{task_id}") for task_id in before}
    types = first.get("/api/task/types")
    assert set(before) == {r.id for r in ok} | {bad.id, parked.id}
    assert first.stop() == 0, first.log_tail()

    second = celeriac_flower(**{**options, "db": first.db})
    assert second.get("/api/tasks") == before
    assert list(second.get("/api/tasks")) == list(before)
    assert {task_id: second.get(f"/api/task/info/{task_id}") for task_id in before} == infos
    assert second.get("/api/task/types") == types == {"task-types": ["bench.add", "bench.fail"]}
    assert list(second.get("/api/tasks", state="FAILURE")) == [bad.id]
    failed = second.get(f"/api/task/info/{bad.id}")
    assert failed["exception"] == "ValueError('kept')" and "ValueError: kept" in failed["traceback"]
    # Flower's ordering and search hold whatever the database: a task never received sorts first by received
    # ascending, last descending; search is case-insensitive (Flower casefolds both sides).
    diffs = Differences()
    ascending, descending = (list(second.get("/api/tasks", sort_by=s)) for s in ("received", "-received"))
    diffs.same("GET /api/tasks?sort_by=received: the never received task", ascending.index(parked.id), 0)
    diffs.same("GET /api/tasks?sort_by=-received: the never received task", descending.index(parked.id), 4)
    for text in ("KEPT", "Bench.Fail"):
        diffs.same(f"GET /api/tasks?search={text}", list(second.get("/api/tasks", search=text)), [bad.id])
    diffs.check()
    return second


def test_task_history_survives_a_restart_sqlite(workers, client_app, celeriac_flower):
    db = f"sqlite://{workers.log_dir / 'history.db'}?mode=rwc"
    _tasks_survive_a_restart(workers, client_app, celeriac_flower, db=db)
    assert (workers.log_dir / "history.db").stat().st_size > 0


def test_task_history_survives_a_restart_postgres(workers, iso, client_app, celeriac_flower):
    if shutil.which("psql") is None:
        pytest.skip("psql is not installed on this machine")
    try:
        psql("SELECT 1")
    except AssertionError as exc:
        pytest.skip(f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}")
    schema = f"flower_{iso.tag}"
    psql(f'CREATE SCHEMA "{schema}"')
    try:
        def in_schema(*args, db=None, **options):  # every start on the same schema
            start = celeriac_flower("--db-schema", schema, *args, db=POSTGRES_URL, **options)
            start.db = POSTGRES_URL
            return start
        second = _tasks_survive_a_restart(workers, client_app, in_schema)
        # The history lives in the test's schema, nowhere else.
        assert int(psql(f'SELECT count(*) FROM "{schema}".celeriac_flower_task')) == 5
        second.stop()
    finally:
        psql(f'DROP SCHEMA "{schema}" CASCADE')


def test_retention_keeps_the_newest_tasks(workers, client_app, flower, celeriac_flower):
    if not flower_has_option("--prune-interval"):
        pytest.xfail("celeriac flower has no --prune-interval yet: retention runs every 60 s, too slow to test")
    worker = watched_worker(workers)
    real = flower("--max_tasks=3")
    ours = celeriac_flower("--max-tasks", "3", "--prune-interval", "1")
    aged = celeriac_flower("--max-age", "2", "--prune-interval", "0.5")
    for fl in (real, ours, aged):
        online(fl, worker.name)
    sent = []
    for i in range(6):
        result = client_app.send_task("bench.add", (i, 0))
        assert result.get(timeout=GET_TIMEOUT) == i
        for fl in (real, ours, aged):
            fl.wait(lambda fl=fl: fl.task_in(result.id, "SUCCESS"), 5, f"task {i} SUCCESS")
        sent.append(result.id)
    # Flower keeps the newest --max_tasks in memory; celeriac flower prunes its database down to them.
    assert set(real.get("/api/tasks")) == set(sent[3:])
    ours.wait(lambda: len(ours.get("/api/tasks")) == 3, 5, "the history pruned to 3 tasks")
    assert set(ours.get("/api/tasks")) == set(sent[3:])
    assert ours.call("GET", f"/api/task/info/{sent[0]}").status == 404
    assert ours.get("/api/task/info/" + sent[5])["state"] == "SUCCESS"
    # --max-age: tasks whose last event is older go.
    aged.wait(lambda: aged.get("/api/tasks") == {}, 6, "every task older than 2 s pruned")
    assert aged.call("GET", f"/api/task/info/{sent[5]}").status == 404


def test_metrics(workers, iso, client_app, flower, celeriac_flower):
    backlog = f"{iso.queue}.backlog"
    worker = watched_worker(workers, queues=[iso.queue, backlog])
    node = worker.name
    real, ours = flower(), celeriac_flower()
    bare = celeriac_flower("--metrics-without-worker-label")
    for fl in (real, ours, bare):
        online(fl, node)
    n = 4
    results = [client_app.send_task("bench.add", (i, i)) for i in range(n)]
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == [2 * i for i in range(n)]
    for fl in (real, ours, bare):
        wait_states(fl, {r.id: "SUCCESS" for r in results})
    # A backlog: `backlog` was active when celeriac flower inspected the worker; it is no longer consumed.
    assert ours.post(f"/api/worker/queue/cancel-consumer/{node}", queue=backlog) == \
        {"message": f"no longer consuming from {backlog}"}
    for i in range(3):
        client_app.send_task("bench.add", (i, i), queue=backlog)

    answers = {fl.kind: fl.call("GET", "/metrics") for fl in (real, ours)}
    flowers, mine = parse_metrics(answers["flower"].text), parse_metrics(answers["celeriac"].text)
    for samples in (flowers, mine):
        assert metric(samples, "flower_events_total", task="bench.add", type="task-succeeded", worker=node) == n
        assert metric(samples, "flower_events_total", task="bench.add", type="task-received", worker=node) == n
        assert metric(samples, "flower_task_runtime_seconds_count", task="bench.add", worker=node) == n
        assert metric(samples, "flower_worker_online", worker=node) == 1
        assert metric(samples, "flower_worker_number_of_currently_executing_tasks", worker=node) == 0
    assert metric(mine, "celeriac_flower_queue_length", queue=iso.queue) == 0
    assert metric(mine, "celeriac_flower_queue_length", queue=backlog) == 3
    assert metric(mine, "celeriac_flower_worker_concurrency", worker=node) == 2
    assert 'flower_events_total{task="bench.add",type="task-succeeded",worker="' + node + '"}' in answers["celeriac"].text

    # Without the worker label: one series per task (and type), worker series keep theirs.
    plain = parse_metrics(bare.call("GET", "/metrics").text)
    assert metric(plain, "flower_events_total", task="bench.add", type="task-succeeded") == n
    assert metric(plain, "flower_task_runtime_seconds_count", task="bench.add") == n
    task_series = ("flower_events_total", "flower_task_runtime_seconds", "flower_task_prefetch_time_seconds",
                   "flower_worker_prefetched_tasks")
    labelled = [(name, dict(labels)) for name, labels in plain if name.startswith(task_series)
                and "worker" in dict(labels)]
    assert labelled == []
    assert metric(plain, "flower_worker_online", worker=node) == 1
    # Last: the exposition format Flower serves (Prometheus text 0.0.4).
    assert answers["flower"].content_type == capture("metrics")["content_type"]
    assert answers["celeriac"].content_type == answers["flower"].content_type


def test_celeriac_flower_over_rabbitmq(amqp, workers, iso, celeriac_flower):
    worker = watched_worker(workers)
    node = worker.name
    ours = celeriac_flower()
    online(ours, node)
    results = [amqp.app.send_task("bench.add", (i, 100)) for i in range(3)]
    assert [r.get(timeout=GET_TIMEOUT) for r in results] == [100, 101, 102]
    wait_states(ours, {r.id: "SUCCESS" for r in results})
    tasks = ours.get("/api/tasks")
    assert set(tasks) == {r.id for r in results}
    assert {(t["name"], t["state"], t["worker"]) for t in tasks.values()} == {("bench.add", "SUCCESS", node)}
    assert sorted(t["result"] for t in tasks.values()) == ["100", "101", "102"]
    # RabbitMQ's celeryev exchange is shared by every client of the broker: count this test's workers only.
    mine = {name: up for name, up in ours.get("/api/workers", status=1).items() if iso.tag in name}
    assert mine == {node: True}
    listing = ours.get("/api/workers", refresh=1, workername=node)[node]
    assert [q["name"] for q in listing["active_queues"]] == [iso.queue, f"{iso.queue}.ready.1"]
    assert "bench.add" in listing["registered"]
    # The same for queues: another suite's workers on this RabbitMQ show theirs too.
    lengths = ours.get("/api/queues/length")
    assert list(lengths) == ["active_queues"]
    assert [q for q in lengths["active_queues"] if iso.tag in q["name"]] == [
        {"name": iso.queue, "messages": 0}, {"name": f"{iso.queue}.ready.1", "messages": 0}]
