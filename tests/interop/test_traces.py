"""One trace across Python and celeriac, both ways, as ``opentelemetry-instrumentation-celery`` writes it.

A Python client instrumented with the real instrumentation sends the chain ``bench.add(2, 2) | bench.mul(10)``:
the first step runs on a celeriac worker, the second on a Python worker (instrumented in each pool process).
All three export OTLP/HTTP to a receiver inside this test. The client's PRODUCER span
``apply_async/bench.add`` is the parent of celeriac's CONSUMER span ``run/bench.add`` (read from the message's
``traceparent``), which is the parent of the Python worker's ``run/bench.mul`` (celeriac wrote the chain step's
``traceparent``): one trace id, with Celery's attributes on celeriac's span.
"""
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from celery import chain
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.celery import CeleryInstrumentor
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

from interop_helpers import wait_for

pytestmark = pytest.mark.celeriac_only(reason="celeriac's spans between two Python peers")

KINDS = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


def value(v):
    for field in ("string_value", "int_value", "bool_value", "double_value"):
        if v.HasField(field):
            return getattr(v, field)
    return None


class Receiver:
    """An OTLP/HTTP trace receiver: every span exported to it, decoded."""

    def __init__(self):
        self.spans = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                found = []
                for rs in request.resource_spans:
                    service = {a.key: value(a.value) for a in rs.resource.attributes}.get("service.name")
                    for ss in rs.scope_spans:
                        for s in ss.spans:
                            found.append({
                                "service": service, "name": s.name, "kind": KINDS.get(s.kind, s.kind),
                                "trace_id": s.trace_id.hex(), "span_id": s.span_id.hex(),
                                "parent_span_id": s.parent_span_id.hex(),
                                "attributes": {a.key: value(a.value) for a in s.attributes},
                            })
                with receiver.lock:
                    receiver.spans.extend(found)
                out = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def named(self, name):
        with self.lock:
            return [s for s in self.spans if s["name"] == name]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def run_chain(client_app, receiver, first, second):
    """Sends ``first | second`` from a client instrumented by opentelemetry-instrumentation-celery (service
    ``python-client``, exporting to ``receiver``) and returns the chain's AsyncResult once it has a result."""
    provider = TracerProvider(resource=Resource.create({"service.name": "python-client"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=receiver.url + "/v1/traces")))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        result = chain(client_app.signature(*first[:2], queue=first[2]),
                       client_app.signature(*second[:2], queue=second[2])).apply_async()
        result.get(timeout=30)
        return result
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


def start_fleet(workers, iso, receiver, monkeypatch, celeriac_exports):
    """A celeriac worker on the test queue (exporting to ``receiver`` or not) and an instrumented Python
    worker on ``<queue>.py``; returns the Python worker's queue."""
    if celeriac_exports:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    else:
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.setenv("INTEROP_OTLP_ENDPOINT", receiver.url)
    py_queue = f"{iso.queue}.py"
    workers.start("celeriac")
    workers.start("python", queues=[py_queue])
    return py_queue


def test_one_trace_from_a_python_client_through_celeriac_to_a_python_worker(workers, client_app, iso, receiver,
                                                                           monkeypatch):
    py_queue = start_fleet(workers, iso, receiver, monkeypatch, celeriac_exports=True)
    result = run_chain(client_app, receiver, ("bench.add", (2, 2), iso.queue), ("bench.mul", (10,), py_queue))
    assert result.get(timeout=1) == 40

    (produced,) = wait_for(lambda: receiver.named("apply_async/bench.add"), 10, message="the client's span")
    (ran,) = wait_for(lambda: receiver.named("run/bench.add"), 20, message="celeriac's run/bench.add span")
    (ran_py,) = wait_for(lambda: receiver.named("run/bench.mul"), 20, message="the Python worker's span")

    assert (produced["service"], produced["kind"]) == ("python-client", "PRODUCER")
    assert (ran["service"], ran["kind"]) == ("celeriac", "CONSUMER")
    assert (ran_py["service"], ran_py["kind"]) == ("python-worker", "CONSUMER")
    # One trace: client -> celeriac -> Python worker.
    assert produced["trace_id"] == ran["trace_id"] == ran_py["trace_id"]
    assert ran["parent_span_id"] == produced["span_id"]
    assert ran_py["parent_span_id"] == ran["span_id"]
    first_id = result.parent.id
    assert ran["attributes"]["celery.action"] == "run"
    assert ran["attributes"]["celery.task_name"] == "bench.add"
    assert ran["attributes"]["celery.state"] == "SUCCESS"
    assert ran["attributes"]["messaging.message.id"] == first_id
    assert ran["attributes"]["messaging.destination.name"] == iso.queue
    # The Python worker read celeriac's trace context like its own client's.
    assert ran_py["attributes"]["celery.task_name"] == "bench.mul"
    assert ran_py["attributes"]["celery.state"] == "SUCCESS"


def test_without_an_exporter_the_trace_context_passes_through(workers, client_app, iso, receiver, monkeypatch):
    """A celeriac worker with no OTLP endpoint writes no span but keeps the trace whole: the Python worker's
    span is a child of the client's."""
    py_queue = start_fleet(workers, iso, receiver, monkeypatch, celeriac_exports=False)
    result = run_chain(client_app, receiver, ("bench.add", (1, 2), iso.queue), ("bench.mul", (3,), py_queue))
    assert result.get(timeout=1) == 9
    (produced,) = wait_for(lambda: receiver.named("apply_async/bench.add"), 10, message="the client's span")
    (ran_py,) = wait_for(lambda: receiver.named("run/bench.mul"), 20, message="the Python worker's span")
    assert receiver.named("run/bench.add") == []
    assert ran_py["trace_id"] == produced["trace_id"]
    assert ran_py["parent_span_id"] == produced["span_id"]
