"""``celeriac up``: the platform's native stack (``compose/stack.toml``) as a newcomer's ``make up`` starts it,
on free ports, the test's own Redis key prefix and PostgreSQL schema. Every service becomes healthy in
dependency order; a Python Celery client gets answers from the general, email and payment workers; every
worker serves ``/metrics``; flower-compat lists the workers; ``celeriac ps`` shows the stack; one SIGINT stops
everything cleanly (warm shutdowns, exit 0, every port closed).
"""
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from celery import Celery

import dashboards
from conftest import celeriac_bin
from fixtures_platform import POSTGRES_URL
from interop_helpers import free_port, wait_for

pytestmark = pytest.mark.celeriac_only(reason="the native stack runs celeriac's own processes")

ROOT = Path(__file__).resolve().parents[2]
PORTS = ["smtp_port", "smtp_http_port", "stripe_port", "webhooks_port", "email_port", "payment_port", "sync_port",
         "general_port", "beat_port", "flower_port", "prometheus_port"]
WORKERS = {"email": "email_port", "payment": "payment_port", "sync": "sync_port", "general": "general_port"}
# Our dashboard's panels for what this test does not cause: no unknown payment, no sync run, no beat entry due
# within the test (each of these families exists only once it has a first value).
QUIET_PANELS = {"Payment: unknown outcomes", "Sync: lag by stream", "Sync: records per second",
                "Beat: sends by entry"}


def port_open(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.read().decode()


@pytest.fixture
def stack(iso, tmp_path):
    schema = f"up_{iso.tag}"
    ports = {name: free_port() for name in PORTS}
    config = tmp_path / "celeriac.toml"
    config.write_text((ROOT / "compose" / "celeriac.toml").read_text()
                      + f'\n[broker_transport_options]\nglobal_keyprefix = "{iso.prefix}"\n'
                      + f'\n[result_backend_transport_options]\nglobal_keyprefix = "{iso.prefix}"\n')
    state = tmp_path / "state.json"
    data = tmp_path / "data"
    database = POSTGRES_URL.rsplit("/", 1)[1]
    argv = [celeriac_bin(), "up", "-f", "compose/stack.toml", "--state-file", str(state), "--stop-timeout", "60",
            "--var", f"config={config}", "--var", f"python={sys.executable}", "--var", f"data={data}",
            "--var", f"database={database}", "--var", f"schema={schema}", "--var", "scrape_interval=1s",
            *[a for name, port in ports.items() for a in ("--var", f"{name}={port}")]]
    log = open(tmp_path / "up.log", "w")
    env = dict(os.environ, CELERY_BROKER_URL=iso.redis_url, CELERY_RESULT_BACKEND=iso.redis_url)
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    info = {"proc": proc, "ports": ports, "state": state, "data": data, "log": tmp_path / "up.log"}
    yield info
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    log.close()
    subprocess.run(["psql", POSTGRES_URL, "-X", "-q", "-c", f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'],
                   capture_output=True, timeout=30)


def phases(state):
    try:
        return dict(json.loads(state.read_text())["services"])
    except (OSError, ValueError, KeyError):
        return {}


def dashboards_have_data(app, ports):
    """celery-exporter's dashboards (unchanged, grafana.com 17508/17509 and the older one) and ours: after a
    failure, a retry, a rejection and an expired task, every panel query returns data from the stack's
    Prometheus, variables filled as Grafana fills them."""
    base = f"http://127.0.0.1:{ports['prometheus_port']}"

    def every_kind_of_event():
        with pytest.raises(ValueError):
            app.send_task("bench.fail", ("boom",), queue="realtime").get(timeout=30)
        assert app.send_task("bench.flaky", (1, 0.1), queue="realtime").get(timeout=30) == 1
        rejected = app.send_task("bench.reject", ("not today",), queue="realtime")
        wait_for(lambda: rejected.state == "FAILURE", 30, message="bench.reject stored as FAILURE")
        expired = app.send_task("bench.add", (1, 1), queue="realtime",
                                expires=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=1))
        wait_for(lambda: expired.state == "REVOKED", 30, message="the expired task revoked")

    # Twice, a scrape apart: series born at the first event (a new exception class, a first task-sent) show
    # an increase from the second on, as in any deployment older than a minute.
    every_kind_of_event()
    wait_for(lambda: all(dashboards.prom(base, "/api/v1/query", query=q)["result"] for q in (
        'celery_task_failed_total{name="bench.fail", exception="ValueError"}',
        'celery_task_sent_total{name="bench.fail"}')), 30, interval=0.5,
        message="Prometheus to scrape the first failure and the first task-sent")
    every_kind_of_event()

    def targets_up():
        active = dashboards.prom(base, "/api/v1/targets")["activeTargets"]
        return len(active) == 6 and all(t["health"] == "up" for t in active)

    wait_for(targets_up, 60, interval=0.5, message="Prometheus scraping the six celeriac targets")
    # Our alert rules are loaded and none fires on a healthy stack.
    rules = [r for g in dashboards.prom(base, "/api/v1/rules")["groups"] for r in g["rules"]]
    assert sorted(r["name"] for r in rules) == ["CeleriacDeadLettersGrowing", "CeleriacPaymentUnknown",
                                                "CeleriacPeerDown", "CeleriacSyncLagging", "CeleriacWorkerDown"]
    assert [r["name"] for r in rules if r["state"] != "inactive"] == []
    boards = [dashboards.load(dashboards.MIXIN / name) for name in dashboards.MIXIN_DASHBOARDS]
    boards += [dashboards.load(path) for path in dashboards.OUR_DASHBOARDS]
    assert len(boards) == 4
    # Rate windows need two scrapes after the last event (1 s apart here): poll until every query answers.
    last = {}

    def all_answer():
        last["missing"] = [m for b in boards for m in dashboards.empty_queries(base, b, expect_empty=QUIET_PANELS)]
        return not last["missing"]

    try:
        wait_for(all_answer, 60, interval=1, message="every dashboard query to return data")
    except AssertionError:
        raise AssertionError("queries without data:\n" + "\n".join(last["missing"])) from None


def test_up_runs_the_platform_and_stops_it_cleanly(stack, iso):
    proc, ports = stack["proc"], stack["ports"]

    def all_up():
        assert proc.poll() is None, "celeriac up exited:\n" + stack["log"].read_text()[-3000:]
        p = phases(stack["state"])
        return bool(p) and all(v in ("ready", "done", "skipped") for v in p.values())

    wait_for(all_up, 180, interval=0.5, message="every service of the stack ready")
    p = phases(stack["state"])
    assert {k for k, v in p.items() if v == "done"} == {"data", "database", "migrate", "tenant"}
    assert all(p[w] == "ready" for w in [*WORKERS, "smtp", "stripe", "webhooks", "beat", "flower"]), p
    ps = subprocess.run([celeriac_bin(), "ps", "--state-file", str(stack["state"])], capture_output=True, text=True)
    assert ps.returncode == 0 and "email" in ps.stdout and "ready" in ps.stdout, ps.stdout

    app = Celery(f"up-{iso.tag}", broker=iso.redis_url, backend=iso.redis_url, set_as_current=False)
    app.conf.update(broker_transport_options={"global_keyprefix": iso.prefix}, task_send_sent_event=True,
                    result_backend_transport_options={"global_keyprefix": iso.prefix},
                    task_routes={"email.*": {"queue": "email"}, "payment.*": {"queue": "payment"},
                                 "sync.*": {"queue": "sync"}, "catalog.*": {"queue": "sync"}})
    assert app.send_task("bench.add", (2, 3), queue="realtime").get(timeout=30) == 5
    mail = app.send_task("email.send", kwargs=dict(tenant_id="demo", idempotency_key="welcome-1",
                                                   to=["ann@example.com"], subject="Welcome", text="Hello Ann"))
    assert mail.get(timeout=60)["status"] == "sent"
    charge = app.send_task("payment.charge", kwargs=dict(tenant_id="demo", order_id="o-1", amount=1999,
                                                         currency="usd", payment_method="pm_card_visa"))
    assert charge.get(timeout=60)["status"] == "succeeded"
    assert app.send_task("sync.status", kwargs=dict(tenant_id="demo")).get(timeout=30)["tenant"] == "demo"
    assert len(list((stack["data"] / "maildir" / "new").iterdir())) == 1
    for name, port in WORKERS.items():
        status, body = get(f"http://127.0.0.1:{ports[port]}/metrics")
        assert status == 200 and "celeriac_worker_up" in body, name
    flower = f"http://127.0.0.1:{ports['flower_port']}/api/workers"
    wait_for(lambda: {n.split("@")[0] for n in json.loads(get(flower)[1])} >= set(WORKERS), 30,
             message="flower-compat to list the four workers")
    # flower-compat is the cluster's celery-exporter: one celery_worker_up per worker, from heartbeats.
    exported = get(f"http://127.0.0.1:{ports['flower_port']}/metrics")[1]
    up = {m.group(1).split("@")[0] for m in re.finditer(r'celery_worker_up\{hostname="([^"]+)"\} 1', exported)}
    assert up >= set(WORKERS), exported
    if shutil.which("prometheus"):  # `make test` installs it (make prometheus); the stack runs without
        assert p["prometheus"] == "ready", p
        dashboards_have_data(app, ports)
    app.close()

    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0
    log = stack["log"].read_text()
    for name in [*WORKERS, "beat", "flower", "webhooks", "smtp", "stripe"]:
        assert f"{name:<10} | stopped (exited with status 0)" in log, name
    assert not [n for n, p in ports.items() if n != "prometheus_port" and port_open(p)]
