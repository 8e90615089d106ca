"""Interop tests for Celery events: a celeriac worker started with task events is seen by Celery's own
``EventReceiver`` and ``celery.events.state.State`` (what Flower and ``celery events`` are built on).
"""
import threading
import uuid

from celery.events.state import State

from interop_helpers import wait_for

GET_TIMEOUT = 10


def wait_until_receiving(client_app, captured, timeout=10):
    """Block until the receiver thread is consuming: send probe events until one comes back (a receiver
    subscribes asynchronously, and events published before that are gone)."""
    probe = f"interop-probe-{uuid.uuid4().hex}"
    with client_app.connection_for_write() as conn:
        dispatcher = client_app.events.Dispatcher(conn, enabled=True)
        seen = lambda: any(e.get("probe") == probe for e in captured)  # noqa: E731
        wait_for(lambda: seen() or dispatcher.send("interop-probe", probe=probe) and False or seen(),
                 timeout, interval=0.1, message="the event receiver to consume")
        dispatcher.close()


def test_worker_and_task_events_reach_celery_receivers(workers, client_app, iso):
    captured = []
    ready = threading.Event()
    conn = client_app.connection()
    receiver = client_app.events.Receiver(conn, handlers={"*": captured.append})

    def run():
        ready.set()
        receiver.capture(limit=None, timeout=None, wakeup=False)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(5)
    wait_until_receiving(client_app, captured)
    worker = workers.start(settings={"worker_send_task_events": True})
    ok = client_app.send_task("bench.add", (2, 3))
    assert ok.get(timeout=GET_TIMEOUT) == 5
    bad = client_app.send_task("bench.fail", ("boom",))
    try:
        bad.get(timeout=GET_TIMEOUT)
    except ValueError:
        pass
    mine = lambda: [e for e in captured if e.get("hostname") == worker.name]  # noqa: E731
    by = lambda kind, uuid=None: [e for e in mine() if e["type"] == kind and (uuid is None or e.get("uuid") == uuid)]  # noqa: E731
    # The fixture starts Python workers --without-heartbeat; celeriac always sends worker events.
    heartbeats = worker.kind == "celeriac"
    wait_for(lambda: by("task-succeeded", ok.id) and by("task-failed", bad.id)
             and (by("worker-heartbeat") or not heartbeats),
             GET_TIMEOUT, message="succeeded, failed (and heartbeat) events")
    receiver.should_stop = True

    received = by("task-received", ok.id)[0]
    assert (received["name"], received["args"], received["kwargs"], received["retries"]) == ("bench.add", "(2, 3)", "{}", 0)
    assert by("task-started", ok.id)
    succeeded = by("task-succeeded", ok.id)[0]
    assert succeeded["result"] == "5" and isinstance(succeeded["runtime"], float)
    failed = by("task-failed", bad.id)[0]
    assert failed["exception"] == "ValueError('boom')" and "ValueError: boom" in failed["traceback"]
    if heartbeats:
        online = by("worker-online")
        assert online and online[0]["freq"] == 2.0 and len(online[0]["loadavg"]) == 3
    clocks = [e["clock"] for e in mine()]
    assert clocks == sorted(clocks), "the Lamport clock only moves forward"

    # What Flower sees.
    state = State()
    for e in mine():
        state.event(dict(e))
    if heartbeats:
        assert state.workers[worker.name].alive
    assert state.tasks[ok.id].state == "SUCCESS" and state.tasks[ok.id].result == "5"
    assert state.tasks[bad.id].state == "FAILURE"
    conn.release()


def test_task_sent_events_from_the_publisher(workers, client_app, iso):
    """With task_send_sent_event the publisher announces each task as a Celery 5.7 client does."""
    captured = []
    conn = client_app.connection()
    probes = []
    receiver = client_app.events.Receiver(conn, handlers={"task-sent": captured.append, "*": probes.append})
    thread = threading.Thread(target=lambda: receiver.capture(limit=None, timeout=None, wakeup=False),
                              daemon=True)
    thread.start()
    wait_until_receiving(client_app, probes)
    try:
        task_id = workers.cli_call("bench.add", "[2, 3]", settings={"task_send_sent_event": True})
        wait_for(lambda: [e for e in captured if e.get("uuid") == task_id], 10, interval=0.1,
                 message="the task-sent event")
    finally:
        receiver.should_stop = True
        thread.join(timeout=5)
    event = next(e for e in captured if e.get("uuid") == task_id)
    # The fields of Celery 5.7's task-sent (spec captures, wire-events-samples.json), in its order.
    assert list(event)[:17] == ["hostname", "utcoffset", "pid", "clock", "uuid", "root_id", "parent_id", "name",
                                "args", "kwargs", "retries", "eta", "expires", "queue", "exchange",
                                "routing_key", "timestamp"]
    assert (event["name"], event["kwargs"], event["queue"], event["routing_key"]) == \
        ("bench.add", "{}", iso.queue, iso.queue)
    # `celery call` parses --args into a list, so its argsrepr is "[2, 3]"; celeriac call sends a tuple's.
    assert event["args"] in ("(2, 3)", "[2, 3]")
    assert event["root_id"] == task_id and event["parent_id"] is None and event["retries"] == 0
    assert event["hostname"].startswith("gen")
