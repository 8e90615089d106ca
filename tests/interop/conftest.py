"""pytest fixtures for the celeriac <-> Python Celery interop suite.

Every test gets its own isolation on the shared Redis (``INTEROP_REDIS_URL``,
default ``redis://127.0.0.1:6379/0``, broker and results on the same db):

* ``iso``        a unique ``global_keyprefix`` (broker *and* result keys) and a
                 unique queue name; all keys under the prefix are deleted
                 afterwards, and keys named after the queue but *outside* the
                 prefix are reported as an error (a worker ignored the prefix).
* ``client_app`` a Celery 5.7 client configured for that isolation.
* ``workers``    starts workers (celeriac binary or Python Celery running
                 ``pyapp.py``) and the publisher CLI, and always stops them:
                 SIGTERM to the worker, SIGKILL to its process group after a
                 grace period.

Which implementation is "the worker under test" is chosen by the environment:

    INTEROP_WORKER=celeriac (default)  $CELERIAC_BIN must point at the binary
    INTEROP_WORKER=python              Python Celery stands in, to validate the
                                       suite itself; celeriac-only tests skip

Worker logs go to ``test-artifacts/interop/<test>/<node>.log`` and their
tails are attached to the report of a failing test.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis
from celery import Celery

from interop_helpers import priority_key
from pyapp import celery_settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ARTIFACTS = REPO / "test-artifacts" / "interop"

REDIS_URL = os.environ.get("INTEROP_REDIS_URL", "redis://127.0.0.1:6379/0")
WORKER_KIND = os.environ.get("INTEROP_WORKER", "celeriac")
KINDS = ("celeriac", "python")


# --------------------------------------------------------------------- hooks
def pytest_configure(config):
    if WORKER_KIND not in KINDS:
        raise pytest.UsageError(f"INTEROP_WORKER must be one of {KINDS}, not {WORKER_KIND!r}")
    config.addinivalue_line(
        "markers",
        "celeriac_only(reason): checks celeriac-specific behaviour; skipped when INTEROP_WORKER=python",
    )


def pytest_sessionstart(session):
    """Stop at once, with the fix, when the celeriac binary under test is missing."""
    if WORKER_KIND == "celeriac" and not session.config.option.collectonly:
        problem = _celeriac_bin_problem()
        if problem:
            pytest.exit(problem, returncode=1)


def pytest_collection_modifyitems(config, items):
    if WORKER_KIND != "python":
        return
    for item in items:
        marker = item.get_closest_marker("celeriac_only")
        if marker is not None:
            reason = marker.kwargs.get("reason") or (marker.args[0] if marker.args else "celeriac-only")
            item.add_marker(pytest.mark.skip(reason=f"celeriac-only (INTEROP_WORKER=python): {reason}"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the tails of the test's worker logs to a failing report."""
    outcome = yield
    report = outcome.get_result()
    fleet = getattr(item, "_interop_workers", None)
    if report.failed and fleet is not None:
        for worker in fleet.started:
            report.sections.append((f"worker log {worker.name} ({worker.log_path})", worker.log_tail()))


# ----------------------------------------------------------------- isolation
class Isolation:
    """One test's private corner of Redis: a key prefix and queue names."""

    def __init__(self, redis_url):
        self.tag = uuid.uuid4().hex[:10]
        self.redis_url = redis_url
        # Ends in ':' so Celery's result backend uses it verbatim (it appends
        # '_' to prefixes that do not end in one of ':_-.').
        self.prefix = f"it-{self.tag}:"
        self.queue = f"iq-{self.tag}"

    def key(self, name):
        """A Redis key under this test's prefix."""
        return self.prefix + name

    def queue_key(self, queue=None, priority=0):
        """The (prefixed) Redis list holding ``queue``'s messages of ``priority``."""
        return priority_key(self.prefix, queue or self.queue, priority)

    def result_key(self, task_id):
        """Where the Redis result backend stores ``task_id``'s meta."""
        return f"{self.prefix}celery-task-meta-{task_id}"

    @property
    def mark_key(self):
        """Hash that ``bench.mark`` increments (HINCRBY key i 1)."""
        return self.key("marks")

    @property
    def deadletter_key(self):
        """celeriac's dead-letter list for the main queue (prefixed like every broker key)."""
        return self.key(f"celeriac.deadletter.{self.queue}")


def _delete_matching(client, pattern):
    """DEL every key matching ``pattern`` (SCAN, batched); returns the deleted names."""
    deleted = []
    batch = []
    for key in client.scan_iter(match=pattern, count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            client.delete(*batch)
            deleted.extend(batch)
            batch = []
    if batch:
        client.delete(*batch)
        deleted.extend(batch)
    return deleted


@pytest.fixture(scope="session")
def redis_client():
    """A plain redis-py client on the interop db (raw bytes, no prefix)."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError as exc:
        pytest.exit(f"interop suite: Redis not reachable at {REDIS_URL}: {exc}", returncode=2)
    yield client
    client.close()


@pytest.fixture
def iso(redis_client):
    """Unique prefix + queue for this test; wipes them afterwards and checks nothing leaked."""
    isolation = Isolation(REDIS_URL)
    yield isolation
    _delete_matching(redis_client, isolation.prefix + "*")
    # Anything still named after our queue lives outside the prefix: some
    # component ignored global_keyprefix. Clean it up, then fail loudly.
    leaked = _delete_matching(redis_client, f"*{isolation.queue}*")
    if leaked:
        pytest.fail(f"keys created outside global_keyprefix {isolation.prefix!r}: "
                    f"{sorted(k.decode(errors='replace') for k in leaked)}")


@pytest.fixture
def client_app(iso):
    """A Python Celery client for this test's isolation (default queue = ``iso.queue``)."""
    app = Celery(f"interop-client-{iso.tag}", set_as_current=False)
    app.conf.update(celery_settings(
        broker=iso.redis_url, backend=iso.redis_url, keyprefix=iso.prefix, default_queue=iso.queue,
    ))
    yield app
    app.close()


# ------------------------------------------------------------------- workers
def _celeriac_bin_problem():
    """Why $CELERIAC_BIN cannot be run, or None when it can."""
    path = os.environ.get("CELERIAC_BIN")
    if not path:
        return ("CELERIAC_BIN is not set: run `make test` (it builds celeriac and exports CELERIAC_BIN), "
                "or set INTEROP_WORKER=python to run the suite against Python Celery")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return f"CELERIAC_BIN={path!r} is not an executable file: run `make test`"
    return None


def celeriac_bin():
    """Path of the celeriac binary under test, or fail the test with what to do."""
    problem = _celeriac_bin_problem()
    if problem:
        pytest.fail(problem)
    return os.environ["CELERIAC_BIN"]


def _toml_str(value):
    # A JSON string literal of ASCII text is also a valid TOML basic string.
    return json.dumps(value, ensure_ascii=True)


def _toml_key(key):
    """A bare TOML key when it can be one (``rate_limit``), else quoted (``"bench.add"``)."""
    key = str(key)
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_str(key)


def _toml_value(value):
    """A TOML literal for a scalar, a list, or a dict (as an inline table)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"no TOML literal for {value!r} in the interop config")
        return repr(value)  # '0.2', '1e-05': both valid TOML floats
    if isinstance(value, str):
        return _toml_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to the celeriac TOML config")


def write_celeriac_config(path, prefix, acks_late=None, visibility_timeout=None,
                          settings=None, annotations=None):
    """Write the TOML config celeriac reads (Celery's own key names).

    ``settings``: extra top-level keys (``task_time_limit = 2``, ...); a
    ``broker_transport_options`` dict in it is merged into that table.
    ``annotations``: ``{task name: {option: value}}``, written as Celery's
    ``task_annotations = { "bench.add" = { rate_limit = "4/s" } }``.
    """
    settings = dict(settings or {})
    broker_opts = dict(settings.pop("broker_transport_options", None) or {})
    backend_opts = dict(settings.pop("result_backend_transport_options", None) or {})
    if visibility_timeout is not None:
        broker_opts["visibility_timeout"] = visibility_timeout
    broker_opts["global_keyprefix"] = prefix
    backend_opts["global_keyprefix"] = prefix

    lines = ["# written by tests/interop/conftest.py"]
    if acks_late is not None and "task_acks_late" not in settings:  # settings win
        lines.append(f"task_acks_late = {'true' if acks_late else 'false'}")
    for key, value in settings.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    if annotations:
        lines.append(f"task_annotations = {_toml_value(annotations)}")
    lines.append("")
    lines.append("[broker_transport_options]")
    for key, value in broker_opts.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    lines.append("")
    lines.append("[result_backend_transport_options]")
    for key, value in backend_opts.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path


class WorkerProcess:
    """One running worker (either kind) in its own process group."""

    def __init__(self, kind, name, queues, argv, env, cwd, log_path):
        self.kind = kind
        self.name = name
        self.queues = queues
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pgid = self.proc.pid  # new session => process group id == pid

    @property
    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, lines=60):
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"
        return "\n".join(text.splitlines()[-lines:])

    def _killpg(self, sig):
        try:
            os.killpg(self.pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate(self, timeout=15.0):
        """Warm shutdown: SIGTERM to the worker; SIGKILL the group if it overstays.

        Returns the exit status (negative = killed by that signal).
        """
        if self.alive:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._killpg(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._reap_group()
        return self.proc.returncode

    def kill(self):
        """Crash: SIGKILL the whole process group at once (no cleanup possible)."""
        self._killpg(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._log.flush()

    def _reap_group(self):
        # Prefork children may outlive the main process briefly; never leave
        # any of the group behind to steal messages from the next test.
        self._killpg(signal.SIGKILL)
        self._log.close()


class Fleet:
    """Starts and owns the workers of one test (and runs the publisher CLI)."""

    READY_TIMEOUT = 30.0

    def __init__(self, iso, client_app, redis_client, log_dir):
        self.iso = iso
        self.client_app = client_app
        self.redis = redis_client
        self.log_dir = log_dir
        self.started = []
        #: which implementation the suite is testing ("celeriac" or "python")
        self.kind_under_test = WORKER_KIND
        self._client_config = None

    # -- workers --------------------------------------------------------
    def start(self, kind=None, *, concurrency=2, prefetch=4, acks_late=False,
              visibility_timeout=None, queues=None, wait_ready=True, settings=None, annotations=None):
        """Start a worker consuming ``queues`` (default: the test's queue).

        ``settings`` (Celery setting name -> value) and ``annotations`` (task
        name -> per-task options, i.e. ``task_annotations``) configure either
        kind the same way: celeriac gets them in its TOML file, the Python
        worker through ``INTEROP_CONF_JSON`` / ``INTEROP_TASK_ANNOTATIONS_JSON``
        (pyapp.py drops the celeriac-only ones and turns ``autoretry_for``
        names into exception classes).

        Both kinds get the test queue as ``task_default_queue``: where a worker
        routes the tasks it publishes itself (chain steps, link callbacks, chord
        bodies) when their signature names no queue.

        ``kind`` defaults to the worker under test (``INTEROP_WORKER``). Each
        worker also consumes a private ``<queue>.ready.<n>`` queue: readiness
        is proven end to end by a ``bench.noop`` sentinel sent there and its
        stored result, which no other worker of the fleet can steal.
        """
        kind = kind or WORKER_KIND
        index = len(self.started) + 1
        name = f"{'py' if kind == 'python' else 'celeriac'}{index}-{self.iso.tag}@{socket.gethostname()}"
        queues = list(queues or [self.iso.queue])
        ready_queue = f"{self.iso.queue}.ready.{index}"
        all_queues = ",".join(queues + [ready_queue])
        log_path = self.log_dir / f"{name.split('@')[0]}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", RUST_BACKTRACE="1")

        common = ["-Q", all_queues, "-c", str(concurrency), "-n", name,
                  "--prefetch-multiplier", str(prefetch), "--loglevel", "info"]
        if kind == "celeriac":
            # Same default queue as the Python worker (INTEROP_QUEUE): where the
            # tasks a worker publishes itself (chain steps, link callbacks,
            # chord bodies without a queue option) are routed.
            toml_settings = {"task_default_queue": self.iso.queue, **(settings or {})}
            config = write_celeriac_config(self.log_dir / f"{name.split('@')[0]}.toml", self.iso.prefix,
                                           acks_late=acks_late, visibility_timeout=visibility_timeout,
                                           settings=toml_settings, annotations=annotations)
            argv = [celeriac_bin(), "worker", "--broker", self.iso.redis_url,
                    "--result-backend", self.iso.redis_url, *common, "--config", str(config)]
            cwd = self.log_dir
        else:
            env.update(self._pyapp_env(acks_late=acks_late, visibility_timeout=visibility_timeout,
                                       settings=settings, annotations=annotations))
            argv = [sys.executable, "-m", "celery", "-A", "pyapp", "worker", *common,
                    "--pool", "prefork", "--without-mingle", "--without-gossip", "--without-heartbeat"]
            cwd = HERE
        worker = WorkerProcess(kind, name, queues, argv, env, cwd, log_path)
        self.started.append(worker)
        if wait_ready:
            self.wait_ready(worker, ready_queue)
        return worker

    def wait_ready(self, worker, ready_queue):
        """Block until ``worker`` ran a sentinel from its private queue."""
        sentinel = self.client_app.send_task("bench.noop", args=("ready",), queue=ready_queue)
        key = self.iso.result_key(sentinel.id)
        deadline = time.monotonic() + self.READY_TIMEOUT
        while not self.redis.exists(key):
            if not worker.alive:
                pytest.fail(f"{worker.kind} worker {worker.name} exited with status "
                            f"{worker.proc.returncode} before it was ready:\n{worker.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{worker.kind} worker {worker.name} not ready after "
                            f"{self.READY_TIMEOUT}s:\n{worker.log_tail()}")
            time.sleep(0.05)

    def stop_all(self):
        for worker in self.started:
            if worker.alive:
                worker.terminate(timeout=10)
            else:
                worker._reap_group()

    # -- publisher CLI -------------------------------------------------
    def cli_call(self, task, args="[]", kwargs="{}", queue=None, kind=None):
        """Publish ``task`` with the CLI of ``kind`` and return the task id it printed.

        celeriac: ``celeriac call TASK --args .. --kwargs .. -Q q ...``;
        python:   ``celery -A pyapp call TASK --args .. --kwargs .. --queue q``
        (the Python stand-in, so the test can validate itself).
        """
        kind = kind or WORKER_KIND
        queue = queue or self.iso.queue
        if kind == "celeriac":
            argv = [celeriac_bin(), "call", task, "--args", args, "--kwargs", kwargs, "-Q", queue,
                    "--broker", self.iso.redis_url, "--result-backend", self.iso.redis_url,
                    "--config", str(self._celeriac_client_config())]
            env, cwd = dict(os.environ), self.log_dir
        else:
            argv = [sys.executable, "-m", "celery", "-A", "pyapp", "call", task,
                    "--args", args, "--kwargs", kwargs, "--queue", queue]
            env, cwd = dict(os.environ, **self._pyapp_env()), HERE
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        lines = done.stdout.splitlines()
        assert len(lines) == 1, f"expected exactly one line (the task id) on stdout, got {done.stdout!r}"
        return lines[0].strip()

    def apply_canvas(self, canvas, kind=None):
        """Apply a canvas with the publisher of ``kind``; returns the lines it printed.

        ``canvas`` is a Celery signature (a dict: ``chain(...)``, ``chord(...)``,
        ``group(...)``, ``add.s(...)``) or its JSON text. The first line is the
        id of the task holding the canvas's final result (chain: the last task;
        chord: the body; group: the group id, then one line per member id;
        plain task: its id).

        celeriac: ``celeriac apply --canvas JSON --broker .. --result-backend ..
        --config ..`` (client config: ``task_default_queue`` = the test queue);
        python:   ``canvas_apply.py --canvas JSON`` (the Python stand-in: Celery's
        own ``signature(dict).apply_async()`` with pyapp's configuration).
        """
        kind = kind or WORKER_KIND
        text = canvas if isinstance(canvas, str) else json.dumps(canvas)
        if kind == "celeriac":
            argv = [celeriac_bin(), "apply", "--canvas", text,
                    "--broker", self.iso.redis_url, "--result-backend", self.iso.redis_url,
                    "--config", str(self._celeriac_client_config())]
            env, cwd = dict(os.environ), self.log_dir
        else:
            argv = [sys.executable, str(HERE / "canvas_apply.py"), "--canvas", text]
            env, cwd = dict(os.environ, **self._pyapp_env()), HERE
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
        lines = [line.strip() for line in done.stdout.splitlines()]
        assert lines and all(lines), f"expected task ids, one per line, on stdout, got {done.stdout!r}"
        return lines

    def _celeriac_client_config(self):
        if self._client_config is None:
            self._client_config = write_celeriac_config(self.log_dir / "celeriac-client.toml", self.iso.prefix,
                                                        settings={"task_default_queue": self.iso.queue})
        return self._client_config

    def _pyapp_env(self, acks_late=False, visibility_timeout=None, settings=None, annotations=None):
        env = {
            "INTEROP_BROKER": self.iso.redis_url,
            "INTEROP_BACKEND": self.iso.redis_url,
            "INTEROP_KEYPREFIX": self.iso.prefix,
            "INTEROP_ACKS_LATE": "1" if acks_late else "0",
            "INTEROP_QUEUE": self.iso.queue,
        }
        if visibility_timeout is not None:
            env["INTEROP_VISIBILITY_TIMEOUT"] = str(visibility_timeout)
        if settings:
            env["INTEROP_CONF_JSON"] = json.dumps(settings)
        if annotations:
            env["INTEROP_TASK_ANNOTATIONS_JSON"] = json.dumps(annotations)
        return env


@pytest.fixture
def workers(request, iso, client_app, redis_client):
    """Start workers with ``workers.start(...)``; all are stopped after the test."""
    log_dir = ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    fleet = Fleet(iso, client_app, redis_client, log_dir)
    request.node._interop_workers = fleet
    yield fleet
    fleet.stop_all()

