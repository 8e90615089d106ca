#!/usr/bin/env python3
"""drain.py - celeriac's drain benchmark: celeriac vs Python Celery on the same prefilled queue.

For each broker (Redis, then RabbitMQ; ``--broker``) and each worker
implementation (celeriac, then Python Celery 5.7 prefork), in the same run and
under the same conditions (same concurrency and prefetch multiplier, results
in the same dedicated Redis db):

1. purge: FLUSHDB the dedicated result db (and, on Redis, the broker db) after
   checking they hold nothing but Celery/kombu keys; on RabbitMQ, delete the
   dedicated bench queue (refused if something else consumes from it);
2. fill the queue with N ``bench.noop`` tasks through the real Python Celery
   client (one producer connection; kombu ``Producer.batch`` pipelining on
   Redis, plain pyamqp publishes without confirms on RabbitMQ, the clock
   stopping once the queue holds all N) and report the enqueue rate;
3. start the worker in its own process group and time the drain until every
   result is stored (DBSIZE of the dedicated result db == N, polled);
4. sample the worker's CPU (all processes of its group, from /proc, incl.
   reaped children) and the broker's CPU at that moment (Redis: ``INFO cpu``
   delta; RabbitMQ: the server's beam.smp utime+stime delta from /proc), then
   stop the worker (SIGTERM, SIGKILL after a grace period);
5. read every result back (all must be SUCCESS) and check that the queue is
   empty: Redis, the list and the ``unacked`` hash; RabbitMQ, messages ready
   and unacknowledged (rabbitmqctl, else a passive declare) and no dead letters.

The same drain runs a second time over Redis with ``task_ignore_result`` on
both workers (``redis-ignore-result``): no result is stored, and the drain ends
when the queue and ``unacked`` are empty (both workers acknowledge before
running, Celery's default).

Latency mode (``latency``): each worker in turn is started on an empty Redis
queue, and the Python client sends ``bench.noop`` at a fixed rate (200/s for
15 s by default; one producer held, no SUBSCRIBE per task, as the shared
yardstick sends). Three latencies per task (bench/fixed_rate.py), the first
second not counted: from ``send_task`` to the result's PUBLISH heard by a
listener; from ``send_task`` to the ``date_done`` the worker wrote (the shared
yardstick's definition); and from ``send_task``'s return (the message is in
Redis) to ``date_done``: the worker alone, without the client's ~0.6 ms of
``send_task``. It also reports start to first result (one task queued before
the worker is launched; launch to its result read by the client) and the idle
RSS (every process of the worker's group, one second after that first task).

It prints one table per scenario with the celeriac/python ratios, and appends
one JSON line per scenario (``"broker": "redis"`` / ``"redis-ignore-result"`` /
``"amqp"`` / ``"redis-latency"``) to ``bench-results/drain.jsonl``.
``make bench`` runs it with defaults (every scenario).

Figures:
  drain_rate   N / (worker launch -> last result stored, as observed): includes
               worker startup
  steady_rate  (N-1) / (first -> last ``date_done``): the worker's own pace
  worker_cpu_us_per_task
  Redis broker:    redis_cpu_us_per_task, redis_cmds_per_task (broker and results:
                   one Redis server)
  RabbitMQ broker: rabbitmq_cpu_us_per_task (beam.smp), and the result store's
                   results_redis_cpu_us_per_task, results_redis_cmds_per_task

The machine is small and shared: compare ratios from the same run, and quote
medians of several runs. Redis and RabbitMQ CPU count every client of those
servers.

Usage:
  bench/drain.py                         # every scenario, both workers, 50,000 tasks each
  bench/drain.py --broker redis          # the Redis drain with results only
  bench/drain.py --broker latency --latency-rate 200   # the latency mode only
  bench/drain.py --broker amqp -n 2000   # RabbitMQ only, 2,000 tasks
  bench/drain.py --only python -n 5000   # just the Python baseline
  CELERIAC_BIN=target/release/celeriac bench/drain.py --only celeriac
"""
import argparse
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import redis
from celery import Celery

REPO = Path(__file__).resolve().parent.parent
PYAPP_DIR = REPO / "tests" / "interop"  # pyapp.py: the Python side of the bench.* contract
sys.path.insert(0, str(PYAPP_DIR))
sys.path.insert(0, str(REPO / "bench"))

from interop_helpers import fetch_metas, publish_many, queue_depth, unacked_counts  # noqa: E402
from pyapp import celery_settings  # noqa: E402
from fixed_rate import fixed_rate_detail, percentile  # noqa: E402

IMPLEMENTATIONS = ("celeriac", "python")
BROKERS = ("redis", "redis-ignore-result", "amqp")
#: what ``--broker`` runs: each drain, the latency mode, or groups of them
SCENARIOS = BROKERS + ("latency", "both", "all")
#: key shapes a dedicated bench db may hold; anything else means "not ours, do not flush"
OWN_KEY_PREFIXES = (b"celery-task-meta-", b"_kombu.", b"unacked")
#: queues celeriac declares with x-max-length (back-pressure): a drain of 50,000 would be refused
AMQP_RESERVED_QUEUES = ("realtime", "bulk")


def log(*parts):
    print("[drain]", *parts, file=sys.stderr, flush=True)


# ----------------------------------------------------------------- processes
def _stat_fields(pid):
    """Fields after the ")" of the command name in /proc/<pid>/stat (state ppid pgrp ...)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rfind(")") + 2:].split()


def group_members(pgid):
    """``(pid, stat fields)`` of every live process in group ``pgid``."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = _stat_fields(entry)
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:
            yield entry, fields


def group_cpu_seconds(pgid):
    """utime+stime of every live process in group ``pgid``, plus their reaped children's."""
    # utime stime cutime cstime are fields 14-17 of the full line.
    ticks = sum(sum(int(x) for x in fields[11:15]) for _, fields in group_members(pgid))
    return ticks / os.sysconf("SC_CLK_TCK")


def group_rss_kib(pgid):
    """Resident memory (VmRSS) of every live process in group ``pgid``, summed, in KiB."""
    total = 0
    for pid, _ in group_members(pgid):
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue  # exited meanwhile, or a zombie
    return total


def process_cpu_seconds(pid):
    """utime+stime of one process (its own threads; not its children)."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rabbitmq_server_pid():
    """The pid of the local RabbitMQ server's Erlang VM (beam.smp running ``-s rabbit boot``), or None.

    rabbitmqctl runs a beam.smp of its own for a moment; only the server boots the ``rabbit`` app.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().strip() != "beam.smp":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if any(argv[i:i + 3] == [b"-s", b"rabbit", b"boot"] for i in range(len(argv))):
            return int(entry)
    return None


class Worker:
    """A worker command running in its own process group."""

    def __init__(self, argv, env, cwd, log_path):
        self.argv = argv
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.pgid = self.proc.pid

    def cpu_seconds(self):
        return group_cpu_seconds(self.pgid)

    def stop(self, grace=20.0):
        """SIGTERM the worker, SIGKILL its whole group after ``grace`` seconds (and always at the end)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log("worker ignored SIGTERM; SIGKILL")
        try:
            os.killpg(self.pgid, signal.SIGKILL)  # stray pool children too
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait(timeout=10)
        self._log.close()


# ---------------------------------------------------------------------- redis
def redis_cpu_seconds(client):
    info = client.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


def redis_commands(client):
    return client.info("stats")["total_commands_processed"]


def check_dedicated(client, db, queue, force):
    """Exit unless ``db`` holds only keys a bench run could have made (it is about to be FLUSHed)."""
    if force:
        return
    if db == 0:
        sys.exit("drain.py: refusing to FLUSHDB db 0 (shared); pick dedicated dbs or pass --force")
    own = OWN_KEY_PREFIXES + (queue.encode(),)
    for key in client.scan_iter(count=1000):
        if not key.startswith(own):
            sys.exit(f"drain.py: db {db} holds {key!r}, which is not a bench key; pick unused dbs "
                     f"(--broker-db/--backend-db) or pass --force to flush it anyway")


def parse_date_done(value):
    return datetime.fromisoformat(value).timestamp() if value else None


def redact(url):
    """``url`` without its password."""
    return re.sub(r"(//[^:/@]*:)[^@/]*@", r"\1***@", url)


# -------------------------------------------------------------------- brokers
class RedisBroker:
    """The Redis broker side: a dedicated db, FLUSHed before each run."""

    name = "redis"
    # (json key, column title, format) of the broker-specific figures
    columns = [
        ("redis_cpu_us_per_task", "redis µs/task", "{:,.1f}"),
        ("redis_cmds_per_task", "redis cmds/task", "{:.2f}"),
    ]
    ratio_keys = [("redis_cpu_per_task", "redis_cpu_us_per_task", "redis CPU per task")]

    def __init__(self, args, backend):
        self.args = args
        self.backend = backend
        self.url = f"{args.redis_url}/{args.broker_db}"
        self.queue = args.queue
        self.n = args.n
        self.client = redis.Redis.from_url(self.url)
        self.log_prefix = "drain"  # worker logs: bench-results/drain-<impl>.log, as before

    def check(self):
        check_dedicated(self.client, self.args.broker_db, self.queue, self.args.force)

    def describe(self):
        return {"queue": self.queue, "broker_db": self.args.broker_db,
                "redis_server": self.client.info("server")["redis_version"]}

    def purge(self):
        self.client.flushdb()

    def publish_batch(self):
        return self.args.batch

    def prepare_client(self, app):
        pass  # Redis lists need no declaration

    def wait_filled(self, n):
        depth = queue_depth(self.client, "", self.queue)
        if depth != n:
            raise RuntimeError(f"queue holds {depth} messages after publishing {n}")

    def sample(self):
        return redis_cpu_seconds(self.client), redis_commands(self.client)

    def figures(self, before, after, n):
        return {
            "redis_cpu_s": round(after[0] - before[0], 3),
            "redis_cpu_us_per_task": round((after[0] - before[0]) * 1e6 / n, 1),
            "redis_cmds_per_task": round((after[1] - before[1]) / n, 2),
        }

    def checks(self):
        """Leftovers after the drain: (figures, error or None)."""
        queue_after = queue_depth(self.client, "", self.queue)
        unacked_after = unacked_counts(self.client, "")[0]
        error = None
        if queue_after or unacked_after:
            error = f"queue not empty after the drain: {queue_after} waiting, {unacked_after} unacked"
        return {"queue_after": queue_after, "unacked_after": unacked_after}, error

    def outstanding(self):
        """Messages not yet acknowledged: waiting in the queue's lists or held in ``unacked``."""
        return queue_depth(self.client, "", self.queue) + unacked_counts(self.client, "")[0]

    def cleanup(self):
        self.client.flushdb()


class RedisIgnoreResultBroker(RedisBroker):
    """The Redis broker with ``task_ignore_result`` on both workers: no result is stored, so the drain ends
    when the queue and ``unacked`` are empty (both workers acknowledge a task before running it)."""

    name = "redis-ignore-result"
    ignore_result = True

    def __init__(self, args, backend):
        super().__init__(args, backend)
        self.log_prefix = "drain-ignore-result"


class AmqpBroker:
    """The RabbitMQ broker side: one dedicated queue, deleted before each run and at the end.

    The Celery client declares the queue (durable, classic, no arguments) and a direct exchange of
    the same name on its first publish; both are deleted at the end. No other queue is touched.
    """

    name = "amqp"
    columns = [
        ("rabbitmq_cpu_us_per_task", "rabbitmq µs/task", "{:,.1f}"),
        ("results_redis_cpu_us_per_task", "results redis µs/task", "{:,.1f}"),
        ("results_redis_cmds_per_task", "results redis cmds/task", "{:.2f}"),
    ]
    ratio_keys = [("rabbitmq_cpu_per_task", "rabbitmq_cpu_us_per_task", "rabbitmq CPU per task")]

    def __init__(self, args, backend):
        self.args = args
        self.backend = backend
        self.url = args.amqp_url
        self.queue = args.amqp_queue
        self.n = args.amqp_n
        self.log_prefix = "drain-amqp"
        self._conn = None
        self._channel = None
        self.server_pid = rabbitmq_server_pid()
        if self.server_pid is None:
            log("amqp: no local RabbitMQ server process (beam.smp) found: its CPU is not reported")

    # -- connection for checks and purges (not the publisher's, not the worker's)
    def _connect(self):
        import amqp
        from kombu.utils.url import url_to_parts

        _, host, port, user, password, vhost, _ = url_to_parts(self.url)
        conn = amqp.Connection(f"{host or '127.0.0.1'}:{port or 5672}", userid=user or "guest",
                               password=password or "guest", virtual_host=vhost or "/",
                               connect_timeout=5)
        conn.connect()
        return conn

    def channel(self):
        if self._conn is None or not self._conn.connected:
            self._conn = self._connect()
            self._channel = None
        if self._channel is None or not self._channel.is_open:
            self._channel = self._conn.channel()
        return self._channel

    def close(self):
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001 - already gone
                pass
            self._conn = self._channel = None

    def declared(self, queue):
        """(ready messages, consumers) of ``queue`` via a passive declare, or None when it does not exist."""
        import amqp
        try:
            _, ready, consumers = self.channel().queue_declare(queue, passive=True)
        except amqp.exceptions.NotFound:
            self.close()  # the broker closed the channel; py-amqp would not reuse its id: start afresh
            return None
        return ready, consumers

    def queue_stats(self):
        """{"ready", "unacked", "consumers"} of the bench queue (None if absent).

        rabbitmqctl counts unacknowledged messages too; without it, a passive declare (ready only).
        """
        exe = shutil.which("rabbitmqctl")
        if exe:
            done = subprocess.run([exe, "-q", "list_queues", "--no-table-headers", "name", "messages_ready",
                                   "messages_unacknowledged", "consumers"],
                                  capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                for line in done.stdout.splitlines():
                    fields = line.split("\t")
                    if fields[0] == self.queue and len(fields) == 4:
                        return {"ready": int(fields[1]), "unacked": int(fields[2]), "consumers": int(fields[3])}
                return None
            log(f"amqp: rabbitmqctl list_queues failed ({done.returncode}): {done.stderr.strip()}")
        declared = self.declared(self.queue)
        if declared is None:
            return None
        return {"ready": declared[0], "unacked": None, "consumers": declared[1]}

    # -- the broker interface used by run_one()
    def check(self):
        declared = self.declared(self.queue)
        if declared is not None and declared[1] and not self.args.force:
            sys.exit(f"drain.py: queue {self.queue!r} on {redact(self.url)} has {declared[1]} consumer(s); "
                     f"stop them or pick another --amqp-queue (or pass --force)")

    def describe(self):
        props = self.channel().connection.server_properties
        version = props.get("version")
        return {"queue": self.queue, "amqp_url": redact(self.url),
                "rabbitmq_server": version.decode() if isinstance(version, bytes) else version}

    def purge(self):
        self.check()
        self.channel().queue_delete(self.queue)

    def prepare_client(self, app):
        """Declare the queue as the Celery client would, through its own connection.

        kombu's connection pools are global and remember what their connections declared, so a later
        run's client would not declare the queue deleted by ``purge`` again, and RabbitMQ would drop
        every message published to it.
        """
        with app.connection_for_write() as conn:
            app.amqp.queues[self.queue].bind(conn.default_channel).declare()

    def publish_batch(self):
        return self.args.batch  # Producer.batch is a no-op on pyamqp: publishes go out one by one

    def wait_filled(self, n, timeout=10.0):
        """Wait until the queue holds all ``n`` messages (publishes without confirms are still in flight
        when send_task returns); fail after ``timeout`` seconds without growth."""
        last, last_change = -1, time.monotonic()
        while True:
            declared = self.declared(self.queue)
            if declared is None:
                raise RuntimeError(f"queue {self.queue!r} does not exist after publishing {n} messages")
            ready = declared[0]
            if ready >= n:
                if ready != n:
                    raise RuntimeError(f"queue holds {ready} messages after publishing {n}")
                return
            now = time.monotonic()
            if ready != last:
                last, last_change = ready, now
            elif now - last_change > timeout:
                raise RuntimeError(f"queue holds {ready} messages {timeout:.0f}s after publishing {n}")
            time.sleep(0.01)

    def sample(self):
        rabbit = None
        if self.server_pid is not None:
            try:
                rabbit = process_cpu_seconds(self.server_pid)
            except OSError:
                rabbit = None
        return rabbit, redis_cpu_seconds(self.backend), redis_commands(self.backend)

    def figures(self, before, after, n):
        rabbit = after[0] - before[0] if before[0] is not None and after[0] is not None else None
        return {
            "rabbitmq_cpu_s": round(rabbit, 3) if rabbit is not None else None,
            "rabbitmq_cpu_us_per_task": round(rabbit * 1e6 / n, 1) if rabbit is not None else None,
            "results_redis_cpu_s": round(after[1] - before[1], 3),
            "results_redis_cpu_us_per_task": round((after[1] - before[1]) * 1e6 / n, 1),
            "results_redis_cmds_per_task": round((after[2] - before[2]) / n, 2),
        }

    def checks(self):
        stats = self.queue_stats()
        if stats and (stats["ready"] or stats["unacked"] or stats["consumers"]):
            time.sleep(2)  # a connection closed a moment ago: let RabbitMQ settle, then look again
            stats = self.queue_stats()
        dead = self.declared(f"celeriac.deadletter.{self.queue}")
        figures = {
            "queue_after": stats["ready"] if stats else None,
            "unacked_after": stats["unacked"] if stats else None,
            "consumers_after": stats["consumers"] if stats else None,
            "deadletters_after": dead[0] if dead else 0,
        }
        error = None
        if stats is None:
            error = f"queue {self.queue!r} vanished during the run"
        elif stats["ready"] or stats["unacked"]:
            error = f"queue not empty after the drain: {stats['ready']} ready, {stats['unacked']} unacked"
        elif figures["deadletters_after"]:
            error = f"{figures['deadletters_after']} message(s) dead-lettered to celeriac.deadletter.{self.queue}"
        return figures, error

    def cleanup(self):
        try:
            ch = self.channel()
            ch.queue_delete(self.queue)
            ch.exchange_delete(self.queue)  # declared by the Celery client, named after the queue
        finally:
            self.close()


# ------------------------------------------------------------------- one run
def worker_command(impl, args, broker_url, backend_url, queue, node, ignore_result=False):
    """argv, env and cwd that start implementation ``impl`` on the bench queue."""
    env = dict(os.environ)
    if impl == "celeriac":
        if not args.celeriac_bin:
            sys.exit("drain.py: set CELERIAC_BIN (or --celeriac-bin), or use --only python; `make bench` does this")
        config = []
        if ignore_result:
            path = args.out.parent / "drain-ignore-result.toml"
            path.write_text("task_ignore_result = true\n")
            config = ["--config", str(path)]
        argv = [args.celeriac_bin, *config, "worker", "--broker", broker_url, "--result-backend", backend_url,
                "-Q", queue, "-c", str(args.concurrency), "--prefetch-multiplier", str(args.prefetch_multiplier),
                "-n", node, "--loglevel", args.celeriac_loglevel, *args.celeriac_args.split()]
        return argv, env, REPO
    env.update(INTEROP_BROKER=broker_url, INTEROP_BACKEND=backend_url, INTEROP_KEYPREFIX="",
               INTEROP_ACKS_LATE="0", INTEROP_QUEUE=queue, INTEROP_IGNORE_RESULT="1" if ignore_result else "0")
    env.pop("INTEROP_VISIBILITY_TIMEOUT", None)
    argv = [sys.executable, "-m", "celery", "-A", "pyapp", "worker", "--pool", "prefork",
            "-c", str(args.concurrency), "--prefetch-multiplier", str(args.prefetch_multiplier),
            "-Q", queue, "-n", node, "--loglevel", "WARNING",
            "--without-mingle", "--without-gossip"]
    return argv, env, PYAPP_DIR


def run_one(impl, args, broker, backend):
    """Purge, fill, drain with ``impl`` over ``broker``; return the figures as a dict."""
    backend_url = f"{args.redis_url}/{args.backend_db}"
    n = broker.n
    tag = f"{broker.name}/{impl}"

    # 1. purge (the dbs and the queue are dedicated to the benchmark; checked in main())
    broker.purge()
    backend.flushdb()

    # 2. fill through the real Celery client
    app = Celery("drain-client", set_as_current=False)
    app.conf.update(celery_settings(broker=broker.url, backend=backend_url, default_queue=broker.queue))
    with app.connection_for_write() as conn:
        conn.ensure_connection()  # connect before the clock starts
    broker.prepare_client(app)
    t0 = time.perf_counter()
    ids = publish_many(app, "bench.noop", (() for _ in range(n)), batch=broker.publish_batch())
    broker.wait_filled(n)
    enqueue_s = time.perf_counter() - t0
    app.close()
    log(f"{tag}: enqueued {n} in {enqueue_s:.2f}s ({n / enqueue_s:,.0f}/s)")

    # 3. drain
    node = f"drain-{impl}@{socket.gethostname()}"
    ignore = getattr(broker, "ignore_result", False)
    argv, env, cwd = worker_command(impl, args, broker.url, backend_url, broker.queue, node, ignore)
    log_path = args.out.parent / f"{broker.log_prefix}-{impl}.log"
    log(f"{tag}: starting {' '.join(redact(a) for a in argv)} (log: {log_path})")
    sample0 = broker.sample()
    launched_wall = time.time()
    launched = time.perf_counter()
    worker = Worker(argv, env, cwd, log_path)
    stored, error = 0, None
    last_progress, last_count = launched, 0
    try:
        while True:
            stored = n - broker.outstanding() if ignore else backend.dbsize()
            now = time.perf_counter()
            if stored >= n:
                break
            if worker.proc.poll() is not None:
                error = f"worker exited with status {worker.proc.returncode} after {stored}/{n} results"
                break
            if stored != last_count:
                last_progress, last_count = now, stored
            elif now - last_progress > args.stall_timeout:
                error = f"no progress for {args.stall_timeout}s at {stored}/{n} results"
                break
            time.sleep(args.poll)
        drained = time.perf_counter()
        worker_cpu = worker.cpu_seconds()  # before stopping: shutdown costs excluded
        sample1 = broker.sample()
    finally:
        worker.stop()

    # 4. figures and checks
    drain_s = drained - launched
    if ignore:
        metas = []
        stray = backend.dbsize()
        statuses = {"IGNORED": n - stray, "STORED": stray} if stray else {"IGNORED": n}
    else:
        metas = fetch_metas(backend, "", ids)
        statuses = {}
        for meta in metas:
            status = meta["status"] if meta else "MISSING"
            statuses[status] = statuses.get(status, 0) + 1
    done = sorted(t for t in (parse_date_done(m.get("date_done")) for m in metas if m) if t)
    result = {
        "impl": impl,
        "broker": broker.name,
        "cmd": [redact(a) for a in argv],
        "n": n,
        "enqueue_s": round(enqueue_s, 3),
        "enqueue_rate": round(n / enqueue_s, 1),
        "drain_s": round(drain_s, 3),
        "drain_rate": round(stored / drain_s, 1) if drain_s > 0 else None,
        "steady_rate": round((len(done) - 1) / (done[-1] - done[0]), 1) if len(done) > 1 and done[-1] > done[0] else None,
        "startup_s": round(done[0] - launched_wall, 3) if done else None,
        "worker_cpu_s": round(worker_cpu, 3),
        "worker_cpu_us_per_task": round(worker_cpu * 1e6 / n, 1),
        **broker.figures(sample0, sample1, n),
        "statuses": statuses,
    }
    leftovers, leftover_error = broker.checks()
    result.update(leftovers)
    if ignore and statuses.get("IGNORED") != n:
        error = error or f"results were stored despite task_ignore_result: {statuses}"
    elif not ignore and statuses.get("SUCCESS") != n:
        error = error or f"not every result is SUCCESS: {statuses}"
    error = error or leftover_error
    if error:
        result["error"] = error
        log(f"{tag}: ERROR {error}")
    log(f"{tag}: drained in {drain_s:.2f}s")
    return result


# ------------------------------------------------------------------- latency
LATENCY_COLUMNS = [
    ("impl", "worker", "{}"),
    ("rate", "tasks/s sent", "{:,}"),
    ("n", "tasks", "{:,}"),
    ("p50_ms", "p50 ms", "{:.2f}"),
    ("p90_ms", "p90 ms", "{:.2f}"),
    ("p99_ms", "p99 ms", "{:.2f}"),
    ("max_ms", "max ms", "{:.2f}"),
    ("done_p50_ms", "date_done p50", "{:.2f}"),
    ("done_p99_ms", "date_done p99", "{:.2f}"),
    ("queued_p50_ms", "queued p50", "{:.2f}"),
    ("queued_p99_ms", "queued p99", "{:.2f}"),
    ("first_task_ms", "start->1st result ms", "{:,.0f}"),
    ("idle_rss_mib", "idle RSS MiB", "{:.1f}"),
]


def run_latency(impl, args, backend):
    """Starts ``impl`` on the Redis broker (results on), sends ``bench.noop`` at ``--latency-rate`` for
    ``--latency-seconds`` through the Python client, and returns the latency figures (send → result PUBLISHed;
    the first second is warm-up and not counted)."""
    broker_url = f"{args.redis_url}/{args.broker_db}"
    backend_url = f"{args.redis_url}/{args.backend_db}"
    broker = redis.Redis.from_url(broker_url)
    broker.flushdb()
    backend.flushdb()
    node = f"latency-{impl}@{socket.gethostname()}"
    argv, env, cwd = worker_command(impl, args, broker_url, backend_url, args.queue, node)
    log_path = args.out.parent / f"latency-{impl}.log"
    log(f"latency/{impl}: starting {' '.join(redact(a) for a in argv)} (log: {log_path})")
    app = Celery("latency-client", set_as_current=False)
    app.conf.update(celery_settings(broker=broker_url, backend=backend_url, default_queue=args.queue))
    first = app.send_task("bench.noop", queue=args.queue)  # waiting in the queue before the worker starts
    launched = time.perf_counter()
    worker = Worker(argv, env, cwd, log_path)
    result = {"impl": impl, "rate": args.latency_rate, "seconds": args.latency_seconds}
    try:
        first.get(timeout=60)  # the worker is up and serving
        result["first_task_ms"] = round(1000 * (time.perf_counter() - launched), 1)
        time.sleep(1.0)
        result["idle_rss_mib"] = round(group_rss_kib(worker.pgid) / 1024, 1)
        lat = fixed_rate_detail(app, args.queue, backend, "bench.noop", lambda i: {},
                                args.latency_rate, args.latency_seconds)
        pub, done, queued = lat["published"], lat["date_done"], lat["queued"]
        result.update(n=len(pub), p50_ms=round(percentile(pub, 0.50), 3), p90_ms=round(percentile(pub, 0.90), 3),
                      p99_ms=round(percentile(pub, 0.99), 3), max_ms=round(max(pub), 3))
        if done:
            result.update(done_p50_ms=round(percentile(done, 0.50), 3), done_p99_ms=round(percentile(done, 0.99), 3),
                          queued_p50_ms=round(percentile(queued, 0.50), 3),
                          queued_p99_ms=round(percentile(queued, 0.99), 3))
    except Exception as e:  # noqa: BLE001 - reported in the table and the exit status
        result["error"] = f"{type(e).__name__}: {e}"
        log(f"latency/{impl}: ERROR {result['error']}")
    finally:
        worker.stop()
        app.close()
        broker.flushdb()
        backend.flushdb()
    return result


def run_latency_mode(impls, args, backend, common):
    """The latency mode for every implementation; appends its JSON line and prints its table."""
    results = [run_latency(impl, args, backend) for impl in impls]
    by_impl = {r["impl"]: r for r in results}
    c, p = by_impl.get("celeriac"), by_impl.get("python")
    ratios = None
    if c and p and "error" not in c and "error" not in p:
        ratios = {k: round(c[k] / p[k], 3) for k in ("p50_ms", "p99_ms", "done_p50_ms", "done_p99_ms",
                                                      "queued_p50_ms", "queued_p99_ms")
                  if (c.get(k) or 0) > 0 and (p.get(k) or 0) > 0}
    record = {"bench": "drain", "broker": "redis-latency",
              "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **common,
              "concurrency": args.concurrency, "prefetch_multiplier": args.prefetch_multiplier,
              "results": by_impl, "ratios": ratios}
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"== latency: bench.noop at a fixed {args.latency_rate}/s for {args.latency_seconds}s over Redis "
          f"{args.redis_url}/{args.broker_db}, results in db {args.backend_db}; send -> result PUBLISHed, "
          f"first second not counted; -c {args.concurrency}")
    print_rows(LATENCY_COLUMNS, results)
    if ratios:
        print("celeriac / python (lower is better): published " +
              ", ".join(f"{k.removesuffix('_ms').replace('done_', 'date_done ').replace('queued_', 'queued ')} x{v:.2f}" for k, v in ratios.items()))
    return results


# ------------------------------------------------------------------- report
COLUMNS = [
    ("impl", "worker", "{}"),
    ("n", "tasks", "{:,}"),
    ("enqueue_rate", "enqueue/s", "{:,.0f}"),
    ("drain_s", "drain s", "{:.2f}"),
    ("drain_rate", "tasks/s", "{:,.0f}"),
    ("steady_rate", "steady/s", "{:,.0f}"),
    ("startup_s", "startup s", "{:.2f}"),
    ("worker_cpu_us_per_task", "worker µs/task", "{:,.1f}"),
]


def fmt(value, spec):
    return "-" if value is None else spec.format(value)


def print_rows(columns, results):
    """One aligned row per result under the columns' titles, then each result's error."""
    rows = [[title for _, title, _ in columns]]
    for r in results:
        rows.append([fmt(r.get(key), spec) for key, _, spec in columns])
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    for r in results:
        if "error" in r:
            print(f"!! {r['impl']}: {r['error']}")


def print_table(broker, results, ratios):
    print_rows(COLUMNS + broker.columns, results)
    if ratios:
        parts = [f"drain rate x{fmt(ratios['drain_rate'], '{:.2f}')}",
                 f"steady rate x{fmt(ratios['steady_rate'], '{:.2f}')}",
                 f"worker CPU per task x{fmt(ratios['worker_cpu_per_task'], '{:.2f}')}"]
        parts += [f"{title} x{fmt(ratios[key], '{:.2f}')}" for key, _, title in broker.ratio_keys]
        print("celeriac / python: " + ", ".join(parts))


def compute_ratios(broker, by_impl):
    """celeriac relative to Python: >1 is better for rates, <1 is better for CPU."""
    c, p = by_impl.get("celeriac"), by_impl.get("python")
    if not c or not p or "error" in c or "error" in p:
        return None

    def ratio(a, b):
        return round(a / b, 3) if a is not None and b else None

    ratios = {
        "drain_rate": ratio(c["drain_rate"], p["drain_rate"]),
        "steady_rate": ratio(c["steady_rate"], p["steady_rate"]),
        "worker_cpu_per_task": ratio(c["worker_cpu_us_per_task"], p["worker_cpu_us_per_task"]),
    }
    for key, figure, _ in broker.ratio_keys:
        ratios[key] = ratio(c.get(figure), p.get(figure))
    return ratios


def git_revision():
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def run_broker(broker, impls, args, backend, common):
    """Run every implementation over ``broker``; append its JSON line; print its table. Returns the results."""
    import celery
    import kombu
    record = {
        "bench": "drain",
        "broker": broker.name,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **common,
        "loadavg_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "celery": celery.__version__,
        "kombu": kombu.__version__,
        **broker.describe(),
        "n": broker.n,
        "concurrency": args.concurrency,
        "prefetch_multiplier": args.prefetch_multiplier,
        "backend_db": args.backend_db,
    }
    if broker.n != args.n:
        record["note"] = args.amqp_n_note
    results = []
    try:
        for impl in impls:
            results.append(run_one(impl, args, broker, backend))
    finally:
        # leave nothing behind: 50k results would otherwise sit in Redis for a day
        try:
            broker.cleanup()
        finally:
            backend.flushdb()

    by_impl = {r["impl"]: r for r in results}
    ratios = compute_ratios(broker, by_impl)
    record.update(results=by_impl, ratios=ratios, loadavg_end=os.getloadavg()[0])
    with open(args.out, "a") as f:
        f.write(json.dumps(record) + "\n")
    where = (f"Redis {args.redis_url}/{args.broker_db}, queue {broker.queue!r}" if broker.name.startswith("redis")
             else f"RabbitMQ {redact(broker.url)}, queue {broker.queue!r}")
    print(f"== broker {broker.name}: {where}; results in Redis db {args.backend_db}; "
          f"-c {args.concurrency}, prefetch multiplier {args.prefetch_multiplier}, N={broker.n:,}")
    if "note" in record:
        print(f"   note: {record['note']}")
    print_table(broker, results, ratios)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=50_000, help="tasks per worker run (default 50,000)")
    ap.add_argument("--broker", choices=SCENARIOS, default="all",
                    help="what to run: the drain over redis (results on), redis-ignore-result, amqp (RabbitMQ, "
                         "results in Redis), the latency mode (latency), both (redis and amqp) or all (default)")
    ap.add_argument("--latency-rate", type=int, default=200, help="latency mode: tasks sent per second (default 200)")
    ap.add_argument("--latency-seconds", type=int, default=15, help="latency mode: seconds of sending (default 15)")
    ap.add_argument("--only", choices=IMPLEMENTATIONS, help="run one implementation only")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379", help="Redis server, without db")
    ap.add_argument("--broker-db", type=int, default=12, help="dedicated broker db, FLUSHed (default 12)")
    ap.add_argument("--backend-db", type=int, default=13,
                    help="dedicated result db for both brokers, FLUSHed (default 13)")
    ap.add_argument("--queue", default="drain", help="Redis broker queue (default drain)")
    ap.add_argument("--amqp-url", default=os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//"),
                    help="RabbitMQ broker (default $AMQP_URL or amqp://guest:guest@127.0.0.1:5672//)")
    ap.add_argument("--amqp-queue", default="bench-drain-amqp",
                    help="dedicated RabbitMQ queue, deleted before each run and at the end (default bench-drain-amqp)")
    ap.add_argument("--amqp-n", type=int, default=None,
                    help="tasks per worker run over RabbitMQ (default: -n)")
    ap.add_argument("-c", "--concurrency", type=int, default=2)
    ap.add_argument("--prefetch-multiplier", type=int, default=4,
                    help="both workers' prefetch multiplier (default 4, Celery's and celeriac's default)")
    ap.add_argument("--celeriac-bin", default=os.environ.get("CELERIAC_BIN"), help="default: $CELERIAC_BIN")
    ap.add_argument("--celeriac-args", default="", help="extra arguments for `celeriac worker`")
    ap.add_argument("--celeriac-loglevel", default="warning")
    ap.add_argument("--batch", type=int, default=1000, help="LPUSHes per pipelined round trip when filling")
    ap.add_argument("--poll", type=float, default=0.02, help="result-count poll interval, s")
    ap.add_argument("--stall-timeout", type=float, default=60, help="give up after this long without progress")
    ap.add_argument("--out", type=Path, default=REPO / "bench-results" / "drain.jsonl")
    ap.add_argument("--label", default="")
    ap.add_argument("--force", action="store_true",
                    help="flush the dbs even if they hold foreign keys; use the AMQP queue even if it has consumers")
    args = ap.parse_args()
    if args.broker_db == args.backend_db:
        ap.error("--broker-db and --backend-db must differ (results are counted with DBSIZE)")
    if args.n < 2:
        ap.error("-n must be at least 2")
    if args.amqp_n is None:
        args.amqp_n = args.n
        args.amqp_n_note = None
    else:
        if args.amqp_n < 2:
            ap.error("--amqp-n must be at least 2")
        args.amqp_n_note = f"RabbitMQ runs use N={args.amqp_n:,} (--amqp-n), not {args.n:,}"
    if args.amqp_queue in AMQP_RESERVED_QUEUES:
        ap.error(f"--amqp-queue: celeriac declares {args.amqp_queue!r} with x-max-length; pick another name")
    if args.prefetch_multiplier < 1:
        ap.error("--prefetch-multiplier must be at least 1")
    args.out.parent.mkdir(parents=True, exist_ok=True)

    backend = redis.Redis.from_url(f"{args.redis_url}/{args.backend_db}")
    impls = [args.only] if args.only else list(IMPLEMENTATIONS)
    brokers = []
    if args.broker in ("redis", "both", "all"):
        brokers.append(RedisBroker(args, backend))
    if args.broker in ("redis-ignore-result", "all"):
        brokers.append(RedisIgnoreResultBroker(args, backend))
    if args.broker in ("amqp", "both", "all"):
        brokers.append(AmqpBroker(args, backend))
    latency = args.broker in ("latency", "all")

    common = {
        "label": args.label,
        "git": git_revision(),
        "host": socket.gethostname(),
        "cpus": os.cpu_count(),
    }
    # The dbs get FLUSHed and the AMQP queue deleted: make sure they are the benchmark's before touching anything.
    for broker in brokers:
        broker.check()
    if latency and not any(b.name.startswith("redis") for b in brokers):
        RedisBroker(args, backend).check()
    check_dedicated(backend, args.backend_db, args.queue, args.force)
    results = []
    for i, broker in enumerate(brokers):
        if i:
            print()
        results += run_broker(broker, impls, args, backend, common)
    if latency:
        if brokers:
            print()
        results += run_latency_mode(impls, args, backend, common)
    print(f"(appended to {args.out})")
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
