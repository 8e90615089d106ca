"""What the drain benchmark's parts share: logging, the worker processes (CPU and memory from /proc), Redis
figures, the worker command lines and the report rows."""
import os
import re
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYAPP_DIR = REPO / "tests" / "interop"  # pyapp.py: the Python side of the bench.* contract
#: key shapes a dedicated bench db may hold; anything else means "not ours, do not flush"
OWN_KEY_PREFIXES = (b"celery-task-meta-", b"_kombu.", b"unacked")


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
