"""pytest fixtures for the platform's task families (loaded by conftest.py as a plugin).

* ``domain``   a domain database of the test's own: a PostgreSQL schema
               (``INTEROP_POSTGRES``, default ``postgres://postgres@127.0.0.1:5432/test``,
               as the owner; workers connect as the application role
               ``celeriac_app``) migrated with ``celeriac migrate up``, tenants added
               with ``celeriac tenants add``; the schema is dropped afterwards.
* ``smtp_sink`` ``smtp_sink(**options)`` starts the aiosmtpd sink of
               ``tests/peers/smtp_sink.py`` (Maildir in the test's artifacts);
               every sink started is stopped afterwards.
* ``stripe``   ``stripe(**options)`` starts ``tests/peers/stripe_launcher.py``
               (localstripe with Stripe's idempotency keys, search, declines
               and fault injection) on a free port; stopped afterwards.
* ``webhooks`` ``webhooks(settings)`` starts ``celeriac webhooks`` on a free
               port with those settings; returns its base URL.
* ``shop``     ``shop(**options)`` starts a fake Shopify Admin REST API on WireMock
               (``tests/peers/shopfake.py``); stopped afterwards.
* ``secret_key`` sets ``CELERIAC_SECRET_KEY`` for the processes the test starts.

``domain.settings(**family_sections)`` gives the worker settings (``database_url``,
``database_admin_url``, ``database_schema`` and the family sections) that
``workers.start(settings=...)`` writes into the worker's TOML.
"""
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
PEERS = HERE.parent / "peers"
if str(PEERS) not in sys.path:
    sys.path.insert(0, str(PEERS))

import smtp_sink as smtp_sink_module  # noqa: E402
import stripe_launcher as stripe_launcher_module  # noqa: E402
import shopfake as shopfake_module  # noqa: E402

POSTGRES_URL = os.environ.get("INTEROP_POSTGRES", "postgres://postgres@127.0.0.1:5432/test")
APP_ROLE = os.environ.get("INTEROP_APP_ROLE", "celeriac_app")


def app_url():
    """The test database as the application role (no superuser, no BYPASSRLS)."""
    scheme, rest = POSTGRES_URL.split("://", 1)
    host = rest.split("@", 1)[1] if "@" in rest else rest
    return f"{scheme}://{APP_ROLE}@{host}"


class Domain:
    """One test's domain database: a schema of its own, migrated, with tenants."""

    def __init__(self, log_dir, binary):
        self.schema = f"it_{uuid.uuid4().hex[:12]}"
        self.admin_url = POSTGRES_URL
        self.url = app_url()
        self.log_dir = log_dir
        self.binary = binary
        self.tenants = {}
        self.config = log_dir / "domain.toml"
        self.config.write_text(
            f'database_url = "{self.url}"\n'
            f'database_admin_url = "{self.admin_url}"\n'
            f'database_schema = "{self.schema}"\n'
        )

    def cli(self, *args, check=True):
        """Runs ``celeriac --config <domain.toml> ARGS``; returns the completed process."""
        done = subprocess.run([self.binary, "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60)
        if check:
            assert done.returncode == 0, f"celeriac {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
        return done

    def add_tenant(self, slug, name=None):
        """``celeriac tenants add SLUG``; returns the id it printed."""
        out = self.cli("tenants", "add", slug, *(["--name", name] if name else [])).stdout.strip()
        uuid.UUID(out)
        self.tenants[slug] = out
        return out

    def settings(self, **sections):
        """Worker settings for this database, plus family sections (``email={...}``)."""
        return {"database_url": self.url, "database_admin_url": self.admin_url,
                "database_schema": self.schema, **sections}

    def sql(self, query, *params):
        """Runs ``query`` as the owner in this schema (psycopg-free: through psql); returns the rows as lists
        of strings."""
        cmd = ["psql", self.admin_url, "-X", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
               "-c", f"SET search_path = {self.schema}", "-c", query]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        return [line.split("\t") for line in done.stdout.splitlines() if line and line != "SET"]

    def drop(self):
        subprocess.run(["psql", self.admin_url, "-X", "-q", "-c", f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'],
                       capture_output=True, text=True, timeout=30)


@pytest.fixture
def domain(workers):
    from conftest import celeriac_bin
    if subprocess.run(["psql", POSTGRES_URL, "-X", "-q", "-c", "SELECT 1"], capture_output=True).returncode != 0:
        pytest.fail(f"PostgreSQL not reachable at {POSTGRES_URL} (make postgres)")
    d = Domain(workers.log_dir, celeriac_bin())
    d.cli("migrate", "up")
    yield d
    d.drop()


@pytest.fixture
def smtp_sink(workers):
    started = []

    def start(**options):
        n = len(started) + 1
        sink = smtp_sink_module.SmtpSink(str(workers.log_dir / f"maildir-{n}"), **options).start()
        started.append(sink)
        return sink

    yield start
    for sink in started:
        sink.stop()


@pytest.fixture
def stripe(workers):
    started = []

    def start(**options):
        n = len(started) + 1
        launcher = stripe_launcher_module.StripeLauncher(
            log_path=str(workers.log_dir / f"stripe-launcher-{n}.log"), **options).start()
        started.append(launcher)
        return launcher

    yield start
    for launcher in started:
        launcher.stop()


@pytest.fixture
def webhooks(workers):
    """``webhooks(settings)`` runs ``celeriac webhooks --addr 127.0.0.1:0`` with a TOML of ``settings`` (the
    test's prefix and queue included); returns ``http://host:port``."""
    import json
    import time
    from conftest import WorkerProcess, celeriac_bin, write_celeriac_config, stop_service
    started = []

    def start(settings):
        n = len(started) + 1
        config = write_celeriac_config(workers.log_dir / f"webhooks-{n}.toml", workers.iso.prefix,
                                       settings={"task_default_queue": workers.iso.queue, **settings})
        log = workers.log_dir / f"webhooks-{n}.log"
        argv = [celeriac_bin(), "--broker", workers.broker_url, "--result-backend", workers.result_backend,
                "--config", str(config), "-l", "info", "--log-format", "json", "webhooks", "--addr", "127.0.0.1:0"]
        proc = WorkerProcess("webhooks", f"webhooks-{n}", [], argv, dict(os.environ), workers.log_dir, log)
        started.append(proc)
        workers.services.append(proc)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not proc.alive:
                pytest.fail(f"celeriac webhooks exited {proc.proc.returncode}:\n{proc.log_tail()}")
            for line in log.read_text(errors="replace").splitlines():
                try:
                    fields = json.loads(line).get("fields", {})
                except ValueError:
                    continue
                if fields.get("message") == "celeriac webhooks listening":
                    return f"http://{fields['address']}"
            time.sleep(0.05)
        pytest.fail(f"celeriac webhooks did not listen:\n{proc.log_tail()}")

    yield start
    for proc in started:
        stop_service(proc)


@pytest.fixture
def shop():
    started = []

    def start(**options):
        fake = shopfake_module.ShopFake(**options).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def secret_key(monkeypatch):
    key = "interop-secret-key-" + uuid.uuid4().hex
    monkeypatch.setenv("CELERIAC_SECRET_KEY", key)
    return key
