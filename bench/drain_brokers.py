"""The drain benchmark's brokers: Redis (with results, and with ``task_ignore_result``) and RabbitMQ, each
filling, sampling and checking its own dedicated queue."""
import shutil
import subprocess
import sys
import time

import redis

from drainlib import (check_dedicated, log, process_cpu_seconds, rabbitmq_server_pid, redact, redis_commands,
                      redis_cpu_seconds)
from interop_helpers import queue_depth, unacked_counts


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
