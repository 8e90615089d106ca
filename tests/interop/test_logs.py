"""JSON logs (``--log-format json``, what compose's Promtail ships to Loki): every line a task writes while it
runs carries the task's id and name, when the task takes a ``tenant_id`` argument the tenant, and when its
message carries a W3C ``traceparent`` the trace id, as fields of the line's ``span``; lines outside any task
carry none.
"""
import json

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from interop_helpers import wait_for

pytestmark = pytest.mark.celeriac_only(reason="celeriac's own log format")


def json_lines(path):
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def task_lines(worker, task_id):
    return [line for line in json_lines(worker.log_path) if line.get("span", {}).get("task_id") == task_id]


def test_task_lines_carry_task_id_name_and_tenant(workers, client_app):
    worker = workers.start(extra_args=["--log-format", "json"])
    plain = client_app.send_task("bench.fail", ("boom",))
    # bench.fail takes no tenant_id: the call fails with TypeError, logged inside the task's span.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    tenanted = client_app.send_task("bench.fail", kwargs={"message": "boom", "tenant_id": "acme"},
                                    headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    for r in (plain, tenanted):
        with pytest.raises((ValueError, TypeError)):
            try:
                r.get(timeout=30)
            except CeleryTimeout:
                pytest.fail(f"no result for {r.id}")
    lines = wait_for(lambda: task_lines(worker, tenanted.id), 10, message="the tenanted task's log lines")
    raised = [line for line in lines if line["fields"].get("message") == "Task raised"]
    assert len(raised) == 1, lines
    assert raised[0]["span"] == {"name": "task", "task_id": tenanted.id, "task_name": "bench.fail",
                                 "tenant_id": "acme", "trace_id": trace_id}
    assert "TypeError" in raised[0]["fields"]["exception"]
    plain_lines = wait_for(lambda: task_lines(worker, plain.id), 10, message="the plain task's log lines")
    assert plain_lines[0]["span"] == {"name": "task", "task_id": plain.id, "task_name": "bench.fail"}
    # The worker's own lines (start-up, readiness) are outside any task.
    assert any("span" not in line for line in json_lines(worker.log_path))
