"""``celeriac up``: the platform's native stack (``compose/stack.toml``) as a newcomer's ``make up`` starts it,
on free ports, the test's own Redis key prefix and PostgreSQL schema. Every service becomes healthy in
dependency order; a Python Celery client gets answers from the general, email and payment workers; every
worker serves ``/metrics``; flower-compat lists the workers; ``celeriac ps`` shows the stack; one SIGINT stops
everything cleanly (warm shutdowns, exit 0, every port closed).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from celery import Celery

from conftest import celeriac_bin
from fixtures_platform import POSTGRES_URL
from interop_helpers import wait_for

pytestmark = pytest.mark.celeriac_only(reason="the native stack runs celeriac's own processes")

ROOT = Path(__file__).resolve().parents[2]
PORTS = ["smtp_port", "smtp_http_port", "stripe_port", "webhooks_port", "email_port", "payment_port", "sync_port",
         "general_port", "beat_port", "flower_port", "prometheus_port"]
WORKERS = {"email": "email_port", "payment": "payment_port", "sync": "sync_port", "general": "general_port"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
            "--var", f"database={database}", "--var", f"schema={schema}",
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
    app.conf.update(broker_transport_options={"global_keyprefix": iso.prefix},
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
        assert status == 200 and "celery_worker_up" in body, name
    flower = f"http://127.0.0.1:{ports['flower_port']}/api/workers"
    wait_for(lambda: {n.split("@")[0] for n in json.loads(get(flower)[1])} >= set(WORKERS), 30,
             message="flower-compat to list the four workers")
    app.close()

    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0
    log = stack["log"].read_text()
    for name in [*WORKERS, "beat", "flower", "webhooks", "smtp", "stripe"]:
        assert f"{name:<10} | stopped (exited with status 0)" in log, name
    assert not [n for n, p in ports.items() if n != "prometheus_port" and port_open(p)]
