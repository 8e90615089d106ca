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

Flower: ``flower`` starts the real, unmodified Flower (PyPI ``flower``) and
``celeriac_flower`` starts ``celeriac flower``, both for the test's isolation,
each on a port it picks itself, logs next to the worker logs; both answer
through an ``interop_helpers.FlowerClient``.

RabbitMQ (``INTEROP_AMQP_URL``, default ``amqp://guest:guest@127.0.0.1:5672//``):
a test that takes the ``amqp`` fixture runs its fleet, its CLI calls and its
client over that broker (results still go to the isolated Redis unless the test
asks for another backend), and every queue and exchange whose name carries the
test's tag is deleted afterwards. Such tests skip when RabbitMQ is unreachable.
"""
import contextlib
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

from interop_helpers import FlowerClient, priority_key
from pyapp import celery_settings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
#: where worker logs, configs and (for failing tests) the broker state are kept; ``INTEROP_ARTIFACTS``
#: moves them (``make test-repeat`` gives each round its own folder)
ARTIFACTS = Path(os.environ.get("INTEROP_ARTIFACTS") or REPO / "test-artifacts" / "interop")
#: the log level of the workers the suite starts (``debug`` when hunting a failure)
WORKER_LOGLEVEL = os.environ.get("INTEROP_LOGLEVEL", "info")

REDIS_URL = os.environ.get("INTEROP_REDIS_URL", "redis://127.0.0.1:6379/0")
WORKER_KIND = os.environ.get("INTEROP_WORKER", "celeriac")
AMQP_URL = os.environ.get("INTEROP_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
KINDS = ("celeriac", "python")

# The task families' fixtures (domain database, SMTP sink, ...).
pytest_plugins = ["fixtures_platform"]


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
    # Seen by fixtures at teardown (``iso`` keeps the broker state of a failing test).
    setattr(item, f"_interop_rep_{report.when}", report)
    fleet = getattr(item, "_interop_workers", None)
    if report.failed and fleet is not None:
        for worker in fleet.started + fleet.services:
            report.sections.append((f"{worker.kind} log {worker.name} ({worker.log_path})", worker.log_tail()))


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


def artifact_dir(node):
    """The folder of a test's artifacts (worker logs, configs, broker state)."""
    return ARTIFACTS / re.sub(r"[^A-Za-z0-9_.-]+", "_", node.name)


def _failed(node):
    return any(getattr(getattr(node, f"_interop_rep_{when}", None), "failed", False)
               for when in ("setup", "call"))


def dump_redis_state(client, pattern, path):
    """Write every key matching ``pattern`` (type, TTL, value) as JSON to ``path``: the broker and result
    state of a failing test, kept beside its worker logs."""
    def text(b):
        return b.decode(errors="replace") if isinstance(b, bytes) else b
    state = {}
    for key in sorted(client.scan_iter(match=pattern, count=1000)):
        kind = text(client.type(key))
        value = {
            "string": lambda: text(client.get(key)),
            "list": lambda: [text(v) for v in client.lrange(key, 0, -1)],
            "set": lambda: sorted(text(v) for v in client.smembers(key)),
            "zset": lambda: [[text(m), s] for m, s in client.zrange(key, 0, -1, withscores=True)],
            "hash": lambda: {text(k): text(v) for k, v in client.hgetall(key).items()},
        }.get(kind, lambda: None)()
        state[text(key)] = {"type": kind, "ttl": client.pttl(key), "value": value}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=1, sort_keys=True))


@pytest.fixture
def iso(request, redis_client):
    """Unique prefix + queue for this test; wipes them afterwards and checks nothing leaked. A failing test's
    keys are first written to ``redis-state.json`` in its artifacts."""
    isolation = Isolation(REDIS_URL)
    yield isolation
    if _failed(request.node):
        with contextlib.suppress(Exception):
            dump_redis_state(redis_client, isolation.prefix + "*", artifact_dir(request.node) / "redis-state.json")
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
        #: its private readiness queue (set by ``Fleet.start``)
        self.ready_queue = None

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
        #: other processes of the test (Flowers) whose logs a failing report shows
        self.services = []
        #: which implementation the suite is testing ("celeriac" or "python")
        self.kind_under_test = WORKER_KIND
        self._client_config = None
        #: broker and result backend of the workers and CLI calls (the ``amqp``
        #: fixture points the broker at RabbitMQ); ``start`` / ``cli_run`` can
        #: override either per call
        self.broker_url = iso.redis_url
        self.result_backend = iso.redis_url

    # -- workers --------------------------------------------------------
    def start(self, kind=None, *, concurrency=2, prefetch=4, acks_late=False,
              visibility_timeout=None, queues=None, wait_ready=True, settings=None, annotations=None,
              broker=None, result_backend=None, extra_args=None, heartbeat=None):
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

        ``heartbeat``: worker-online/heartbeat/offline events. ``None`` keeps
        each kind's default (celeriac sends them; Python workers run
        ``--without-heartbeat``); ``True`` turns them on for Python workers too
        (what Flower needs to show a worker online), ``False`` off for both.

        ``kind`` defaults to the worker under test (``INTEROP_WORKER``). Each
        worker also consumes a private ``<queue>.ready.<n>`` queue: readiness
        is proven end to end by a ``bench.noop`` sentinel sent there and its
        stored result, which no other worker of the fleet can steal.

        ``broker`` / ``result_backend`` default to the fleet's (``self.broker_url``,
        ``self.result_backend``); with a backend other than Redis the sentinel's
        result is awaited through ``self.client_app`` (which must then use the
        same backend, e.g. ``rpc://``).
        """
        kind = kind or WORKER_KIND
        broker = broker or self.broker_url
        result_backend = result_backend or self.result_backend
        index = len(self.started) + 1
        name = f"{'py' if kind == 'python' else 'celeriac'}{index}-{self.iso.tag}@{socket.gethostname()}"
        queues = list(queues or [self.iso.queue])
        ready_queue = f"{self.iso.queue}.ready.{index}"
        all_queues = ",".join(queues + [ready_queue])
        log_path = self.log_dir / f"{name.split('@')[0]}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", RUST_BACKTRACE="1")

        common = ["-Q", all_queues, "-c", str(concurrency), "-n", name,
                  "--prefetch-multiplier", str(prefetch), "--loglevel", WORKER_LOGLEVEL]
        if kind == "celeriac":
            # Same default queue as the Python worker (INTEROP_QUEUE): where the
            # tasks a worker publishes itself (chain steps, link callbacks,
            # chord bodies without a queue option) are routed.
            toml_settings = {"task_default_queue": self.iso.queue, **(settings or {})}
            config = write_celeriac_config(self.log_dir / f"{name.split('@')[0]}.toml", self.iso.prefix,
                                           acks_late=acks_late, visibility_timeout=visibility_timeout,
                                           settings=toml_settings, annotations=annotations)
            argv = [celeriac_bin(), "worker", "--broker", broker,
                    "--result-backend", result_backend, *common, "--config", str(config),
                    *(["--without-heartbeat"] if heartbeat is False else []), *(extra_args or [])]
            cwd = self.log_dir
        else:
            env.update(self._pyapp_env(acks_late=acks_late, visibility_timeout=visibility_timeout,
                                       settings=settings, annotations=annotations,
                                       broker=broker, backend=result_backend))
            argv = [sys.executable, "-m", "celery", "-A", "pyapp", "worker", *common,
                    "--pool", "prefork", "--without-mingle", "--without-gossip",
                    *([] if heartbeat else ["--without-heartbeat"])]
            cwd = HERE
        worker = WorkerProcess(kind, name, queues, argv, env, cwd, log_path)
        self.started.append(worker)
        worker.ready_queue = ready_queue
        if wait_ready:
            self.wait_ready(worker, ready_queue, result_backend=result_backend)
        return worker

    def wait_ready(self, worker, ready_queue, result_backend=None):
        """Block until ``worker`` ran a sentinel from its private queue."""
        sentinel = self.client_app.send_task("bench.noop", args=("ready",), queue=ready_queue)
        backend = result_backend or self.iso.redis_url
        if backend.startswith("redis"):
            key = self.iso.result_key(sentinel.id)
            # Results may live on another Redis than the suite's (a chaos test's own instance).
            client = self.redis if backend == self.iso.redis_url else redis.Redis.from_url(backend)
            done = lambda: client.exists(key)  # noqa: E731
        else:
            done = sentinel.ready  # e.g. rpc://: only the sending client can read it
        deadline = time.monotonic() + self.READY_TIMEOUT
        while not done():
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
    def cli_run(self, task, args="[]", kwargs="{}", queue=None, kind=None, *,
                broker=None, result_backend=None, settings=None):
        """Publish ``task`` with the CLI of ``kind``; returns the finished ``subprocess.CompletedProcess``.

        celeriac: ``celeriac call TASK --args .. --kwargs .. -Q q ...``;
        python:   ``celery -A pyapp call TASK --args .. --kwargs .. --queue q``
        (the Python stand-in, so the test can validate itself).
        ``broker`` / ``result_backend`` default to the fleet's; ``settings`` are
        extra Celery settings (celeriac: in a client TOML of their own; python:
        ``INTEROP_CONF_JSON``).
        """
        kind = kind or WORKER_KIND
        queue = queue or self.iso.queue
        broker = broker or self.broker_url
        result_backend = result_backend or self.result_backend
        if kind == "celeriac":
            argv = [celeriac_bin(), "call", task, "--args", args, "--kwargs", kwargs, "-Q", queue,
                    "--broker", broker, "--result-backend", result_backend,
                    "--config", str(self._celeriac_client_config(settings))]
            env, cwd = dict(os.environ), self.log_dir
        else:
            argv = [sys.executable, "-m", "celery", "-A", "pyapp", "call", task,
                    "--args", args, "--kwargs", kwargs, "--queue", queue]
            env = dict(os.environ, **self._pyapp_env(settings=settings, broker=broker, backend=result_backend))
            cwd = HERE
        done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
        done.argv = argv
        return done

    def cli_call(self, task, args="[]", kwargs="{}", queue=None, kind=None, **options):
        """Publish ``task`` with the CLI of ``kind`` and return the task id it printed.

        Same arguments as ``cli_run``; the CLI must succeed and print only the id.
        """
        done = self.cli_run(task, args, kwargs, queue, kind, **options)
        argv = done.argv
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
                    "--broker", self.broker_url, "--result-backend", self.result_backend,
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

    def _celeriac_client_config(self, settings=None):
        if settings:
            # Its own file per call: the settings differ from the shared client config.
            path = self.log_dir / f"celeriac-client-{uuid.uuid4().hex[:8]}.toml"
            return write_celeriac_config(path, self.iso.prefix,
                                         settings={"task_default_queue": self.iso.queue, **settings})
        if self._client_config is None:
            self._client_config = write_celeriac_config(self.log_dir / "celeriac-client.toml", self.iso.prefix,
                                                        settings={"task_default_queue": self.iso.queue})
        return self._client_config

    def _pyapp_env(self, acks_late=False, visibility_timeout=None, settings=None, annotations=None,
                   broker=None, backend=None):
        env = {
            "INTEROP_BROKER": broker or self.broker_url,
            "INTEROP_BACKEND": backend or self.result_backend,
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
    log_dir = artifact_dir(request.node)
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True)
    fleet = Fleet(iso, client_app, redis_client, log_dir)
    request.node._interop_workers = fleet
    yield fleet
    fleet.stop_all()


# -------------------------------------------------------------------- Flower
def stop_service(proc, timeout=5.0):
    """SIGTERM ``proc`` (a ``WorkerProcess``), wait up to ``timeout`` s, then SIGKILL what is left of its group."""
    if proc.alive:
        proc.proc.send_signal(signal.SIGTERM)
        try:
            proc.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    proc._reap_group()
    return proc.proc.returncode


def _service_log(fleet, stem):
    """A log path in the test's artifacts that no earlier process of this test used."""
    path, n = fleet.log_dir / f"{stem}.log", 1
    while path.exists():
        n += 1
        path = fleet.log_dir / f"{stem}-{n}.log"
    return path


@pytest.fixture
def flower(workers):
    """``flower(*extra_args, env=None, unauthenticated=True)`` starts the real Flower for this test's isolation
    (``celery -A pyapp --broker URL flower --port=0 ...``, pyapp's environment: the same ``global_keyprefix``
    and default queue as the test's workers); returns a ``FlowerClient`` once ``/healthcheck`` answers.
    ``unauthenticated``: ``FLOWER_UNAUTHENTICATED_API=true``. Every Flower started is stopped afterwards."""
    started = []

    def start(*extra_args, env=None, unauthenticated=True):
        argv = [sys.executable, "-m", "celery", "-A", "pyapp", "--broker", workers.broker_url, "flower",
                "--port=0", "--address=127.0.0.1", "--unix_socket=", "--logging=debug", *extra_args]
        penv = dict(os.environ, **workers._pyapp_env(), PYTHONUNBUFFERED="1")
        penv.pop("FLOWER_UNAUTHENTICATED_API", None)
        if unauthenticated:
            penv["FLOWER_UNAUTHENTICATED_API"] = "true"
        penv.update(env or {})
        proc = WorkerProcess("flower", "flower", [], argv, penv, HERE, _service_log(workers, "flower"))
        started.append(proc)
        workers.services.append(proc)
        client = FlowerClient(proc, "flower")

        def port():
            if not proc.alive:
                pytest.fail(f"flower exited with status {proc.proc.returncode}:\n{proc.log_tail()}")
            found = re.search(r"Visit me at http://127\.0\.0\.1:(\d+)", proc.log_path.read_text(errors="replace"))
            return found and int(found.group(1))

        client.base = f"http://127.0.0.1:{client.wait(port, 20, 'flower to listen')}"
        client.wait(lambda: client.call("GET", "/healthcheck").status == 200, 10, "flower's /healthcheck")
        client.stop = lambda: stop_service(proc)
        return client

    yield start
    for proc in started:
        stop_service(proc)


@pytest.fixture
def celeriac_flower(workers):
    """``celeriac_flower(*extra_args, db=None, env=None, unauthenticated=True, settings=None, broker=None,
    result_backend=None)`` starts ``celeriac --broker .. --result-backend .. --config FILE flower --port 0
    --address 127.0.0.1 --db DB *extra_args`` for this test's isolation (its TOML has the test's
    ``global_keyprefix`` for broker and results, ``task_default_queue`` = the test queue, plus ``settings``);
    returns a ``FlowerClient`` (with ``.stop()`` and ``.db``) once ``/healthcheck`` answers.

    ``db`` defaults to a fresh SQLite file in the test's artifacts (pass the same URL again to restart on
    the same history); ``unauthenticated``: ``FLOWER_UNAUTHENTICATED_API=1``. Broker and backend default to
    the fleet's. Every one started is stopped afterwards (SIGTERM, then SIGKILL)."""
    started = []

    def start(*extra_args, db=None, env=None, unauthenticated=True, settings=None, broker=None,
              result_backend=None):
        log_path = _service_log(workers, "celeriac-flower")
        stem = log_path.stem
        config = write_celeriac_config(workers.log_dir / f"{stem}.toml", workers.iso.prefix,
                                       settings={"task_default_queue": workers.iso.queue, **(settings or {})})
        db = db or f"sqlite://{workers.log_dir / (stem + '.db')}?mode=rwc"
        argv = [celeriac_bin(), "--broker", broker or workers.broker_url,
                "--result-backend", result_backend or workers.result_backend, "--config", str(config),
                "-l", "info", "--log-format", "json",
                "flower", "--port", "0", "--address", "127.0.0.1", "--db", db, *extra_args]
        penv = dict(os.environ, RUST_BACKTRACE="1")
        for name in ("FLOWER_UNAUTHENTICATED_API", "FLOWER_BASIC_AUTH", "CELERIAC_FLOWER_DB", "CELERIAC_CONFIG",
                     "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
            penv.pop(name, None)
        if unauthenticated:
            penv["FLOWER_UNAUTHENTICATED_API"] = "1"
        penv.update(env or {})
        proc = WorkerProcess("celeriac-flower", stem, [], argv, penv, workers.log_dir, log_path)
        started.append(proc)
        workers.services.append(proc)
        client = FlowerClient(proc, "celeriac")
        client.db = db

        def address():
            if not proc.alive:
                pytest.fail(f"celeriac flower exited with status {proc.proc.returncode}:\n{proc.log_tail()}")
            for line in proc.log_path.read_text(errors="replace").splitlines():
                try:
                    fields = json.loads(line).get("fields", {})
                except ValueError:
                    continue
                if fields.get("message") == "celeriac flower listening":
                    return fields["address"]
            return None

        client.base = f"http://{client.wait(address, 20, 'celeriac flower to listen')}"
        client.wait(lambda: client.call("GET", "/healthcheck").status == 200, 10, "celeriac flower's /healthcheck")
        client.stop = lambda: stop_service(proc)
        return client

    yield start
    for proc in started:
        stop_service(proc)



# ------------------------------------------------------------------ RabbitMQ
def rabbitmqctl(*args, timeout=30):
    """Run ``rabbitmqctl ARGS`` (quiet, no table headers); returns its stdout lines."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        pytest.skip("rabbitmqctl is not installed on this machine")
    done = subprocess.run([exe, "-q", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"rabbitmqctl {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    return [line for line in done.stdout.splitlines() if line.strip()]


def amqp_connection(url=AMQP_URL):
    """A connected py-amqp connection to ``url`` (the client library kombu's ``pyamqp://`` uses)."""
    import amqp
    from kombu.utils.url import url_to_parts

    _, host, port, user, password, vhost, _ = url_to_parts(url)
    conn = amqp.Connection(f"{host or '127.0.0.1'}:{port or 5672}", userid=user or "guest",
                           password=password or "guest", virtual_host=vhost or "/", connect_timeout=5)
    conn.connect()
    return conn


class AmqpEnv:
    """One test's use of RabbitMQ: clients, raw channels, and the cleanup of its queues.

    ``app`` is the default client: broker RabbitMQ, results in the test's Redis
    prefix (the fleet's readiness sentinels go through it). ``client(...)`` makes
    more (e.g. ``backend="rpc://"``). Everything named after the test's tag is
    deleted afterwards, plus whatever ``track_queue`` was told about.
    """

    url = AMQP_URL

    def __init__(self, iso, fleet):
        self.iso = iso
        self.fleet = fleet
        self._apps = []
        self._queues = set()
        self.app = self.client()

    def client(self, backend=None, **conf):
        """A Celery 5.7 client on RabbitMQ; results in the test's Redis unless ``backend`` says otherwise."""
        app = Celery(f"interop-amqp-{self.iso.tag}-{len(self._apps)}", set_as_current=False)
        app.conf.update(celery_settings(
            broker=self.url, backend=backend or self.iso.redis_url, keyprefix=self.iso.prefix,
            default_queue=self.iso.queue,
        ))
        # kombu's pyamqp transport has no global_keyprefix: that option is Redis-only.
        app.conf.broker_transport_options = {}
        app.conf.update(conf)
        self._apps.append(app)
        if backend and backend.startswith("rpc"):
            # The reply queue is durable with a one-day x-expires: delete it afterwards.
            self._queues.add(app.backend.oid)
        return app

    @contextlib.contextmanager
    def channel(self):
        """``with amqp.channel() as ch:`` a raw py-amqp channel on a connection of its own.

        A fresh connection each time: a test may close every connection (``rabbitmqctl
        close_all_connections``) and the helpers must keep working afterwards. Bodies stay bytes
        (no auto-decoding).
        """
        conn = amqp_connection(self.url)
        try:
            ch = conn.channel()
            ch.auto_decode = False
            yield ch
        finally:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already closed by the broker
                pass

    def track_queue(self, name):
        """Delete queue ``name`` after the test (names carrying the test's tag are deleted anyway)."""
        self._queues.add(name)
        return name

    def queue_counts(self, name):
        """(ready messages, consumers) of an existing queue, via a passive declare."""
        with self.channel() as ch:
            _, messages, consumers = ch.queue_declare(name, passive=True)
        return messages, consumers

    def queue_exists(self, name):
        import amqp
        try:
            self.queue_counts(name)
        except amqp.exceptions.NotFound:
            return False
        return True

    def queue_stats(self, name):
        """{"messages_ready", "messages_unacknowledged", "consumers", "arguments"} from rabbitmqctl,
        or None when there is no such queue."""
        for line in rabbitmqctl("list_queues", "--no-table-headers", "name", "messages_ready",
                                "messages_unacknowledged", "consumers", "arguments"):
            fields = line.split("\t")
            if fields[0] == name:
                return {"messages_ready": int(fields[1]), "messages_unacknowledged": int(fields[2]),
                        "consumers": int(fields[3]), "arguments": fields[4]}
        return None

    def publish_raw(self, queue, body, **properties):
        """``basic.publish`` ``body`` to the default exchange with routing key ``queue`` (persistent)."""
        import amqp
        properties.setdefault("delivery_mode", 2)
        with self.channel() as ch:
            ch.basic_publish(amqp.Message(body, **properties), exchange="", routing_key=queue)

    def get_all(self, queue, limit=1000):
        """Take every message waiting in ``queue`` (basic.get, no_ack); returns the amqp.Message objects."""
        out = []
        with self.channel() as ch:
            while len(out) < limit:
                msg = ch.basic_get(queue, no_ack=True)
                if msg is None:
                    break
                out.append(msg)
        return out

    def cleanup(self):
        for app in self._apps:
            try:
                app.close()
            except Exception:  # noqa: BLE001 - a client broken by the test must not stop the cleanup
                pass
        names_q = set(self._queues)
        names_x = set()
        if shutil.which("rabbitmqctl"):
            names_q.update(n for n in rabbitmqctl("list_queues", "--no-table-headers", "name") if self.iso.tag in n)
            names_x.update(n for n in rabbitmqctl("list_exchanges", "--no-table-headers", "name")
                           if self.iso.tag in n)
        else:
            base = [self.iso.queue] + [w.ready_queue for w in self.fleet.started if w.ready_queue]
            names_q.update(base + [f"celeriac.deadletter.{q}" for q in base])
            names_x.update(base)  # kombu's client declares an exchange named after each queue it sends to
        with self.channel() as ch:
            for name in sorted(names_q):
                ch.queue_delete(name)
            for name in sorted(names_x):
                ch.exchange_delete(name)


@pytest.fixture
def amqp(iso, workers):
    """Run this test's fleet, CLI calls and client (``amqp.app``) over RabbitMQ; results in Redis.

    Sets ``workers.broker_url`` to RabbitMQ and ``workers.client_app`` to
    ``amqp.app``. Afterwards: stops the workers, then deletes every queue and
    exchange named after the test's tag, and the queues ``track_queue`` named.
    """
    try:
        amqp_connection().close()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no RabbitMQ here"
        pytest.skip(f"RabbitMQ not reachable at {AMQP_URL}: {exc}")
    env = AmqpEnv(iso, workers)
    workers.broker_url = AMQP_URL
    workers.client_app = env.app
    yield env
    workers.stop_all()
    env.cleanup()
