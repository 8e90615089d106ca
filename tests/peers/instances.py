"""Private instances of the real servers for tests that stop, kill and restart them (chaos, HA): Redis (an
append-only file so data survives a restart, optional password), a Redis Sentinel group (a master, a replica
and three sentinels), PostgreSQL (its own cluster from initdb) and RabbitMQ (its own node), each on free
loopback ports in a temporary directory, never the machine's own.
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _port_open(port):
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


class RedisInstance:
    """``redis-server`` with ``appendonly yes`` (``appendfsync always`` by default) on its own port."""

    def __init__(self, password: str | None = None, fsync: str = "always"):
        self.port = free_port()
        self.password = password
        self.dir = tempfile.mkdtemp(prefix="redis-instance-")
        self.fsync = fsync
        self.proc = None
        self.start()

    @property
    def url(self):
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--appendonly", "yes", "--appendfsync", self.fsync, "--save", "", "--logfile", "redis.log"]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _port_open(self.port), 15, f"redis on {self.port}")

    def shutdown(self):
        """A clean shutdown (the append-only file is complete)."""
        cli = ["redis-cli", "-p", str(self.port)] + (["-a", self.password, "--no-auth-warning"] if self.password else [])
        subprocess.run(cli + ["shutdown"], capture_output=True, timeout=15)
        self.proc.wait(15)

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)



class SentinelGroup:
    """A Redis master and one replica (password ``password``) watched by three sentinels (their own password
    ``sentinel_password``) under the name ``name``, quorum 2, 1 s to declare the master down."""

    def __init__(self, name="ha", password="ha-pw", sentinel_password="sentinel-pw"):
        import redis as redis_py
        self._redis = redis_py
        self.name, self.password, self.sentinel_password = name, password, sentinel_password
        self.dir = tempfile.mkdtemp(prefix="redis-sentinel-")
        self.servers = {}  # port -> Popen
        self.sentinels = {}
        master = free_port()
        self._server(master)
        self._server(free_port(), replica_of=master)
        for _ in range(3):
            self._sentinel(free_port(), master)
        _wait(lambda: self.replicas_online() >= 1, 30, "the replica to sync")
        _wait(lambda: all(self._sentinel_knows_replica(p) for p in self.sentinels), 30, "the sentinels to see the replica")

    def _server(self, port, replica_of=None):
        d = os.path.join(self.dir, str(port))
        os.makedirs(d)
        args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
                "--appendonly", "no", "--requirepass", self.password, "--masterauth", self.password,
                "--logfile", "redis.log"]
        if replica_of:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.servers[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _port_open(port), 15, f"redis on {port}")

    def _sentinel(self, port, master):
        conf = os.path.join(self.dir, f"sentinel-{port}.conf")
        with open(conf, "w") as f:
            f.write(f"port {port}\nbind 127.0.0.1\ndir {self.dir}\nlogfile sentinel-{port}.log\n"
                    f"requirepass {self.sentinel_password}\n"
                    f"sentinel monitor {self.name} 127.0.0.1 {master} 2\n"
                    f"sentinel auth-pass {self.name} {self.password}\n"
                    f"sentinel down-after-milliseconds {self.name} 1000\n"
                    f"sentinel failover-timeout {self.name} 10000\n"
                    f"sentinel parallel-syncs {self.name} 1\n")
        self.sentinels[port] = subprocess.Popen(["redis-server", conf, "--sentinel"],
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(lambda: _port_open(port), 15, f"sentinel on {port}")

    def sentinel(self, port=None):
        port = port or next(iter(self.sentinels))
        return self._redis.Redis(port=port, password=self.sentinel_password, socket_timeout=2, decode_responses=True)

    def _sentinel_knows_replica(self, port):
        try:
            return any(r.get("flags") == "slave" for r in self.sentinel(port).sentinel_slaves(self.name))
        except self._redis.RedisError:
            return False

    def master_port(self):
        """The master as the sentinels name it now (the newest configuration epoch among them)."""
        best = None
        for port in self.sentinels:
            try:
                m = self.sentinel(port).sentinel_master(self.name)
            except self._redis.RedisError:
                continue
            if best is None or int(m["config-epoch"]) > best[0]:
                best = (int(m["config-epoch"]), int(m["port"]))
        return best[1]

    def master(self):
        return self._redis.Redis(port=self.master_port(), password=self.password, socket_timeout=5)

    def replicas_online(self):
        try:
            info = self._redis.Redis(port=self.master_port(), password=self.password, socket_timeout=2).info("replication")
        except (self._redis.RedisError, TypeError):
            return 0
        return sum(1 for k, v in info.items() if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online")

    def in_sync(self):
        """Whether every replica has the master's whole replication stream."""
        info = self.master().info("replication")
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        return bool(replicas) and all(int(r["offset"]) == int(info["master_repl_offset"]) for r in replicas)

    def url(self, db=0):
        """kombu's form: one ``sentinel://`` item per sentinel, the master's password in each."""
        return ";".join(f"sentinel://:{self.password}@127.0.0.1:{p}/{db}" for p in self.sentinels)

    def transport_options(self):
        return {"master_name": self.name, "sentinel_kwargs": {"password": self.sentinel_password}}

    def failover(self):
        """``SENTINEL FAILOVER``: the sentinels promote the replica and demote the master."""
        self.sentinel().execute_command("SENTINEL", "FAILOVER", self.name)

    def kill_master(self):
        port = self.master_port()
        self.servers[port].send_signal(signal.SIGKILL)
        self.servers[port].wait(10)
        return port

    def stop(self):
        for proc in list(self.sentinels.values()) + list(self.servers.values()):
            if proc.poll() is None:
                proc.terminate()
        for proc in list(self.sentinels.values()) + list(self.servers.values()):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

def _pg_bin(name):
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian: postgresql)")
    return found[-1]


class PostgresInstance:
    """A PostgreSQL cluster of its own (initdb, trust auth) on a free port; ``stop(mode)`` and ``start()``."""

    def __init__(self):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pg-instance-")
        self.data = os.path.join(self.dir, "data")
        user = ["-U", "postgres"]
        env = dict(os.environ)
        run_as = []
        if os.geteuid() == 0:
            # initdb refuses root: run the server as the postgres user.
            shutil.chown(self.dir, "postgres", "postgres")
            run_as = ["runuser", "-u", "postgres", "--"]
        self.run_as = run_as
        subprocess.run(run_as + [_pg_bin("initdb"), "-D", self.data, "--auth=trust", *user, "-E", "UTF8",
                                 "--no-sync"], check=True, capture_output=True, env=env)
        with open(os.path.join(self.data, "postgresql.auto.conf"), "a") as f:
            f.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{self.dir}'\n"
                    "fsync = off\nmax_connections = 200\n")
        self.start()
        subprocess.run(["psql", self.admin_url("postgres"), "-qc", "CREATE DATABASE test"], check=True, capture_output=True)

    def admin_url(self, db="test"):
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def start(self):
        subprocess.run(self.run_as + [_pg_bin("pg_ctl"), "-D", self.data, "-l", os.path.join(self.dir, "log"),
                                      "-w", "-t", "30", "start"], check=True, capture_output=True)

    def stop(self, mode="fast"):
        subprocess.run(self.run_as + [_pg_bin("pg_ctl"), "-D", self.data, "-m", mode, "-w", "-t", "30", "stop"],
                       capture_output=True)

    def destroy(self):
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitInstance:
    """A RabbitMQ node of its own (``RABBITMQ_NODENAME``, its own AMQP and distribution ports and data
    directory); ``kill()`` it (SIGKILL) and ``start()`` it again, or ``stop_app()``/``start_app()``."""

    def __init__(self, name=None, cookie=None):
        self.name = name or f"chaos{os.getpid()}x{free_port()}@localhost"
        self.port = free_port()
        self.dist_port = free_port()
        self.dir = tempfile.mkdtemp(prefix="rabbit-instance-")
        conf = os.path.join(self.dir, "rabbitmq.conf")
        with open(conf, "w") as f:
            f.write(f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n")
        self.env = dict(os.environ, RABBITMQ_NODENAME=self.name, RABBITMQ_NODE_PORT=str(self.port),
                        RABBITMQ_DIST_PORT=str(self.dist_port), RABBITMQ_MNESIA_BASE=os.path.join(self.dir, "mnesia"),
                        RABBITMQ_LOG_BASE=os.path.join(self.dir, "log"), RABBITMQ_CONFIG_FILE=conf[:-5],
                        RABBITMQ_PID_FILE=os.path.join(self.dir, "pid"), RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(self.dir, "plugins"),
                        RABBITMQ_SERVER_START_ARGS=f"-kernel inet_dist_listen_min {self.dist_port} inet_dist_listen_max {self.dist_port}")
        with open(os.path.join(self.dir, "plugins"), "w") as f:
            f.write("[].\n")
        if os.geteuid() == 0:
            # Debian's rabbitmq-server runs the node as the rabbitmq user.
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", self.dir], check=False)
        self.start()

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args, timeout=60):
        return subprocess.run(["rabbitmqctl", "-n", self.name, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def start(self):
        subprocess.run(["rabbitmq-server", "-detached"], env=self.env, capture_output=True)
        _wait(lambda: self.ctl("await_startup", timeout=90).returncode == 0 and _port_open(self.port), 120,
              f"rabbitmq node {self.name}")

    def pid(self):
        with open(os.path.join(self.dir, "pid")) as f:
            return int(f.read().strip())

    def kill(self):
        os.kill(self.pid(), signal.SIGKILL)
        _wait(lambda: not _port_open(self.port), 20, "the node to die")

    def stop_app(self):
        assert self.ctl("stop_app").returncode == 0

    def start_app(self):
        assert self.ctl("start_app").returncode == 0

    def destroy(self):
        self.ctl("stop", timeout=60)
        try:
            os.kill(self.pid(), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.dir, ignore_errors=True)


class RabbitCluster:
    """``size`` RabbitMQ nodes of their own (see ``RabbitInstance``), started side by side and joined into one
    cluster with ``rabbitmqctl join_cluster``."""

    def __init__(self, size=3):
        import threading
        self.nodes = [None] * size
        errors = []

        def make(i):
            try:
                self.nodes[i] = RabbitInstance(name=f"ha{os.getpid()}n{i}x{free_port()}@localhost")
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=make, args=(i,)) for i in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            self.destroy()
            raise errors[0]
        first = self.nodes[0]
        for node in self.nodes[1:]:
            for args in (["stop_app"], ["join_cluster", first.name], ["start_app"]):
                r = node.ctl(*args, timeout=120)
                if r.returncode != 0:
                    self.destroy()
                    raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {r.stdout}{r.stderr}")
        _wait(lambda: len(self.running()) == size, 60, "every node running in the cluster")

    def running(self):
        import json
        for node in self.nodes:
            r = node.ctl("cluster_status", "--formatter", "json", timeout=30)
            if r.returncode == 0:
                return json.loads(r.stdout).get("running_nodes", [])
        return []

    @property
    def url(self):
        """kombu's failover list: every node, ``;``-separated."""
        return ";".join(n.url for n in self.nodes)

    def destroy(self):
        for node in self.nodes:
            if node is not None:
                node.destroy()
