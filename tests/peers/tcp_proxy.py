"""A TCP proxy for chaos tests: forwards a loopback port to a peer (the Stripe launcher, the fake shop), and can
refuse connections for a while (its listening socket closed: clients get ECONNREFUSED) while cutting the
connections already open, as a peer that restarts or a network that drops does. Its state file counts the
connections cut while a request was in flight (sent, not yet answered): the only cuts after which a retry can
duplicate what the peer already did.

    python tcp_proxy.py --target 127.0.0.1:PORT [--port 0]   # prints READY <port>
    SIGUSR1 toggles refusing; ``TcpProxy`` (importable) runs it as a subprocess with ``.refuse(True/False)``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time


async def _pipe(reader, writer, on_data):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
            on_data()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


class _Proxy:
    def __init__(self, host, port, target, state_file):
        self.host, self.port, self.target, self.state_file = host, port, target, state_file
        self.server = None
        self.conns: set = set()
        self.refusing = False
        # Per open connection: has the client sent something the peer has not answered yet?
        self.awaiting: dict = {}
        # Connections cut while a request was in flight: the peer may have acted on it without the client
        # hearing back (an SMTP DATA accepted, its 250 lost), so the client's retry can be a duplicate.
        self.cut_in_flight = 0

    async def _handle(self, reader, writer):
        th, tp = self.target.rsplit(":", 1)
        try:
            ur, uw = await asyncio.open_connection(th, int(tp))
        except OSError:
            writer.close()
            return
        key = object()
        self.awaiting[key] = False

        def sent():
            self.awaiting[key] = True

        def answered():
            self.awaiting[key] = False

        tasks = {asyncio.ensure_future(_pipe(reader, uw, sent)), asyncio.ensure_future(_pipe(ur, writer, answered))}
        self.conns.update(tasks)
        try:
            await asyncio.wait(tasks)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
        finally:
            self.conns.difference_update(tasks)
            self.awaiting.pop(key, None)

    async def listen(self):
        self.server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def toggle(self):
        self.refusing = not self.refusing
        if self.refusing:
            self.server.close()
            await self.server.wait_closed()
            self.cut_in_flight += sum(1 for waiting in self.awaiting.values() if waiting)
            for t in list(self.conns):
                t.cancel()
        else:
            await self.listen()
        self._write_state()

    def _write_state(self):
        tmp = self.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": self.port, "refusing": self.refusing, "pid": os.getpid(),
                       "cut_in_flight": self.cut_in_flight}, f)
        os.replace(tmp, self.state_file)


async def _main(args):
    p = _Proxy(args.host, args.port, args.target, args.state_file)
    await p.listen()
    p._write_state()
    print(f"READY {p.port}", flush=True)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: asyncio.ensure_future(p.toggle()))
    await stop.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--state-file", default=None)
    args = ap.parse_args()
    args.state_file = args.state_file or os.path.join(tempfile.gettempdir(), f"tcp-proxy-{os.getpid()}.json")
    asyncio.run(_main(args))


class TcpProxy:
    """Runs the proxy as a subprocess; ``.port``, ``.refuse(on)``, ``.stop()``."""

    def __init__(self, target: str):
        self.target = target
        fd, self.state_file = tempfile.mkstemp(prefix="tcp-proxy-", suffix=".json")
        os.close(fd)
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--target", target,
                                      "--state-file", self.state_file], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY "):
            raise RuntimeError(f"tcp_proxy did not start: {line!r}")
        self.port = int(line.split()[1])

    def state(self):
        with open(self.state_file) as f:
            return json.load(f)

    def refuse(self, on: bool, timeout: float = 5.0):
        """Start or stop refusing connections; returns once the proxy says so."""
        if self.state()["refusing"] == on:
            return
        os.kill(self.proc.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while self.state()["refusing"] != on:
            if time.monotonic() > deadline:
                raise TimeoutError("tcp_proxy did not switch")
            time.sleep(0.01)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc.stdout.close()


if __name__ == "__main__":
    main()
