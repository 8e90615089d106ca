"""SMTP sink test peer for celeriac's email tasks and the dev stack (aiosmtpd).

Accepts mail on a local port and stores every message byte-identical in a
Maildir (new/), plus one JSON line per delivery in ``<maildir>/deliveries.jsonl``.
The file and the log line are fsynced *before* the 250 reply is sent.

    python smtp_sink.py --maildir DIR [--host 127.0.0.1] [--port 0] [options]

prints ``READY <port>`` once listening and serves until SIGTERM/SIGINT (exit 0).
Fault injection (all deterministic):
  --tempfail-first-ratio R  first DATA of a share R of distinct Message-IDs gets
                            ``451 4.3.0 Try again later`` (see ``tempfails``)
  --reject-rcpt-regex RE    RCPT TO matching RE (re.search) gets 550 5.1.1
  --pause-before-reply-file P  after storing message n, write P.<n> (its
                            Message-ID) and hold the 250 until P.release exists
  SIGUSR1                   toggles refuse mode: new connections get
                            ``421 4.3.2 Service not available`` and are closed
  --refuse-connections-until EPOCH  refuse mode until that wall-clock time
``<maildir>/sink-state.json`` holds ports, pid and refuse-mode state.
Importable: ``SmtpSink`` (runs this file as a subprocess), ``tempfails``,
``read_mails``, ``message_ids``, ``deliveries``.
"""
from __future__ import annotations

import argparse, asyncio, collections, datetime, email, email.policy, hashlib, html, json
import logging, mailbox, os, re, select, signal, ssl, subprocess, sys, tempfile
import threading, time, urllib.parse, warnings
from email.parser import BytesHeaderParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE_FILE = "sink-state.json"
LOG_FILE = "deliveries.jsonl"


# ---------------------------------------------------------------- shared helpers
def normalize_message_id(value) -> str | None:
    """Message-ID header value with all whitespace (folding) removed; None if empty."""
    text = "".join(str(value).split()) if value is not None else ""
    return text or None


def extract_message_id(raw: bytes) -> str | None:
    """The normalized Message-ID of a raw message, e.g. ``<abc@host>`` (brackets kept)."""
    headers = BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
    return normalize_message_id(headers.get("Message-ID"))


def tempfails(message_id: str, ratio: float) -> bool:
    """Whether the first DATA attempt for ``message_id`` is answered 451.

    h = first 8 bytes of sha256(utf-8 of the normalized Message-ID, angle brackets
    included) as a big-endian u64; selected iff h / 2**64 < ratio.
    Rust: ``(u64::from_be_bytes(d[..8]) as f64) / 18446744073709551616.0 < ratio``.
    """
    digest = hashlib.sha256(message_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < ratio


def _maildir(path) -> mailbox.Maildir:
    if not os.path.isdir(os.path.join(path, "new")):
        raise FileNotFoundError(f"{path!r} is not a Maildir (no new/ subfolder)")
    return mailbox.Maildir(path, factory=None, create=False)


def mail_keys(maildir) -> list[str]:
    """Maildir keys in delivery order (names start with a zero-padded ns timestamp)."""
    return sorted(_maildir(maildir).keys())


def read_raw(maildir, key: str) -> bytes:
    return _maildir(maildir).get_bytes(key)


def read_mails(maildir) -> list[email.message.EmailMessage]:
    """All stored mails in delivery order, parsed with ``email.policy.default``."""
    md = _maildir(maildir)
    return [email.message_from_bytes(md.get_bytes(k), policy=email.policy.default)
            for k in sorted(md.keys())]


def message_ids(maildir) -> collections.Counter:
    """Counter of normalized Message-IDs over all stored mails (duplicates show as >1)."""
    md = _maildir(maildir)
    ids = (extract_message_id(md.get_bytes(k)) for k in md.keys())
    return collections.Counter(i for i in ids if i is not None)


def deliveries(maildir) -> list[dict]:
    """The sidecar log ``deliveries.jsonl``: one dict per stored message, in order. A last line the sink is
    still writing (no newline yet) is not a delivery yet."""
    path = os.path.join(maildir, LOG_FILE)
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.endswith("\n") and line.strip()]


def _write_json_atomic(path, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


# ---------------------------------------------------------------- SMTP server
def _import_aiosmtpd():
    try:
        from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword
    except ImportError as e:
        sys.exit(f"smtp_sink: error: aiosmtpd is missing ({e}); "
                 "pip install -r tests/peers/requirements.txt")
    return SMTP, AuthResult, LoginPassword


class SinkHandler:
    """aiosmtpd handler: RCPT rejection, tempfail, durable storage, pause hook."""

    def __init__(self, args):
        self.args = args
        self.root = os.path.abspath(args.maildir)
        mailbox.Maildir(self.root, create=True)  # creates cur/ new/ tmp/
        self.reject_re = re.compile(args.reject_rcpt_regex) if args.reject_rcpt_regex else None
        self.tempfail_seen: set[str] = set()
        self.stored = 0
        self.paused = 0
        self.refusing = False
        self.toggles = 0
        self.state: dict = {}
        self.log = open(os.path.join(self.root, LOG_FILE), "a", encoding="utf-8")

    def is_refusing(self) -> bool:
        until = self.args.refuse_connections_until
        return self.refusing or (until is not None and time.time() < until)

    def write_state(self, **extra) -> None:
        self.state.update(extra, refusing=self.refusing, toggles=self.toggles, pid=os.getpid())
        _write_json_atomic(os.path.join(self.root, STATE_FILE), self.state)

    def toggle_refusing(self) -> None:
        self.refusing = not self.refusing
        self.toggles += 1
        self.write_state()
        print(f"smtp_sink: refuse mode {'ON' if self.refusing else 'OFF'}", file=sys.stderr, flush=True)

    def authenticate(self, server, session, envelope, mechanism, auth_data):
        _, AuthResult, LoginPassword = _import_aiosmtpd()
        ok = (isinstance(auth_data, LoginPassword)
              and auth_data.login == self.args.auth_user.encode()
              and auth_data.password == self.args.auth_password.encode())
        return AuthResult(success=ok, handled=False,
                          auth_data=auth_data.login.decode(errors="replace") if ok else None)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if not self.args.auth_user:  # never advertise AUTH unless configured
            responses = [r for r in responses if not r[4:].startswith("AUTH")]
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.reject_re is not None and self.reject_re.search(address):
            code = self.args.reject_code
            return f"{code} {str(code)[0]}.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        raw = envelope.original_content
        mid = extract_message_id(raw)
        ratio = self.args.tempfail_first_ratio
        if mid and ratio > 0 and mid not in self.tempfail_seen and tempfails(mid, ratio):
            self.tempfail_seen.add(mid)
            code = self.args.tempfail_code
            return f"{code} {str(code)[0]}.3.0 Try again later"
        key = self._store(raw)
        now = time.time()
        record = {"key": key, "message_id": mid, "mail_from": envelope.mail_from,
                  "rcpt_tos": list(envelope.rcpt_tos), "time": now,
                  "time_iso": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
                  "size": len(raw), "sha256": hashlib.sha256(raw).hexdigest(),
                  "auth_user": session.auth_data if session.authenticated else None}
        self.log.write(json.dumps(record) + "\n")
        self.log.flush()
        os.fsync(self.log.fileno())
        if self.args.pause_before_reply_file:
            await self._pause(mid or "")
        return f"250 2.0.0 Ok: queued as {key}"

    def _store(self, raw: bytes) -> str:
        self.stored += 1
        key = f"{time.time_ns():020d}.P{os.getpid()}Q{self.stored:08d}.smtp-sink"
        tmp, new = os.path.join(self.root, "tmp", key), os.path.join(self.root, "new", key)
        with open(tmp, "xb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, new)
        dir_fd = os.open(os.path.join(self.root, "new"), os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return key

    async def _pause(self, mid: str) -> None:
        base = self.args.pause_before_reply_file
        self.paused += 1
        marker = f"{base}.{self.paused}"
        with open(marker + ".tmp", "w", encoding="utf-8") as f:
            f.write(mid)
        os.replace(marker + ".tmp", marker)
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{base}.release"):
            if time.monotonic() > deadline:
                print(f"smtp_sink: {base}.release not created within 60 s; replying 250 anyway",
                      file=sys.stderr, flush=True)
                return
            await asyncio.sleep(0.02)


def _smtp_class():
    SMTP, _, _ = _import_aiosmtpd()

    class SinkSMTP(SMTP):
        async def _handle_client(self):  # refuse mode: 421 instead of the 220 greeting
            if self.event_handler.is_refusing():
                await self.push("421 4.3.2 Service not available")
                self.transport.close()
                return
            await super()._handle_client()

    return SinkSMTP


# ---------------------------------------------------------------- read UI (HTTP)
def _summaries(root) -> list[dict]:
    md, out = _maildir(root), []
    for key in sorted(md.keys(), reverse=True):
        raw = md.get_bytes(key)
        msg = email.message_from_bytes(raw, policy=email.policy.default)
        def h(name, msg=msg):
            try:
                return str(msg.get(name, ""))
            except Exception:  # undecodable header: show it raw rather than fail
                return str(msg.get_all(name, [""])[0])
        out.append({"key": key, "message_id": extract_message_id(raw), "subject": h("Subject"),
                    "from": h("From"), "to": h("To"), "date": h("Date"), "size": len(raw),
                    "url": "/mail/" + urllib.parse.quote(key)})
    return out


def _http_handler(root):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code, ctype, body: bytes):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = urllib.parse.urlsplit(self.path).path
            if path == "/api/mails":
                return self._send(200, "application/json", json.dumps(_summaries(root)).encode())
            if path == "/":
                rows = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(m[c])}</td>" for c in ("date", "from", "to"))
                    + f'<td><a href="{html.escape(m["url"])}">{html.escape(m["subject"] or "(no subject)")}</a></td></tr>'
                    for m in _summaries(root))
                page = ("<!doctype html><meta charset=utf-8><title>smtp sink</title>"
                        f"<h1>smtp sink: {html.escape(root)}</h1><table border=1>"
                        f"<tr><th>Date</th><th>From</th><th>To</th><th>Subject</th></tr>{rows}</table>")
                return self._send(200, "text/html; charset=utf-8", page.encode())
            if path.startswith("/mail/"):
                try:
                    raw = _maildir(root).get_bytes(urllib.parse.unquote(path[len("/mail/"):]))
                except KeyError:
                    return self._send(404, "text/plain", b"no such mail\n")
                return self._send(200, "text/plain; charset=utf-8", raw)
            self._send(404, "text/plain", b"not found: try /, /api/mails or /mail/<key>\n")

        def log_message(self, *args):
            pass

    return Handler


# ---------------------------------------------------------------- CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--maildir", required=True, help="Maildir to deliver into (created if missing)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--hostname", default="smtp-sink", help="name in the 220 greeting and EHLO")
    p.add_argument("--tempfail-first-ratio", type=float, default=0.0, metavar="R")
    p.add_argument("--tempfail-code", type=int, default=451)
    p.add_argument("--reject-rcpt-regex", metavar="REGEX")
    p.add_argument("--reject-code", type=int, default=550)
    p.add_argument("--pause-before-reply-file", metavar="PATH")
    p.add_argument("--refuse-connections-until", type=float, metavar="EPOCH_SECONDS")
    p.add_argument("--auth-user")
    p.add_argument("--auth-password")
    p.add_argument("--tls-cert", help="offer STARTTLS with this PEM cert (needs --tls-key)")
    p.add_argument("--tls-key")
    p.add_argument("--http-port", type=int, help="serve the read UI on this port (0 = free port)")
    p.add_argument("--verbose", action="store_true", help="aiosmtpd logging to stderr")
    a = p.parse_args(argv)
    if not 0.0 <= a.tempfail_first_ratio <= 1.0:
        p.error(f"--tempfail-first-ratio must be within 0..1, got {a.tempfail_first_ratio}")
    for name, lo in (("tempfail_code", 400), ("reject_code", 400)):
        if not lo <= getattr(a, name) <= 599:
            p.error(f"--{name.replace('_', '-')} must be a 4xx or 5xx code, got {getattr(a, name)}")
    if bool(a.auth_user) != (a.auth_password is not None):
        p.error("--auth-user and --auth-password must be given together")
    if bool(a.tls_cert) != bool(a.tls_key):
        p.error("--tls-cert and --tls-key must be given together")
    if a.reject_rcpt_regex:
        try:
            re.compile(a.reject_rcpt_regex)
        except re.error as e:
            p.error(f"--reject-rcpt-regex is not a valid regex: {e}")
    return a


async def serve(args) -> None:
    loop = asyncio.get_running_loop()
    handler = SinkHandler(args)
    kw = dict(hostname=args.hostname, ident="ESMTP celeriac smtp_sink", enable_SMTPUTF8=True, loop=loop)
    if args.tls_cert:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(args.tls_cert, args.tls_key)
        kw["tls_context"] = ctx
    if args.auth_user:
        kw.update(auth_required=True, auth_require_tls=False, authenticator=handler.authenticate)
    smtp_cls = _smtp_class()
    try:
        server = await loop.create_server(lambda: smtp_cls(handler, **kw), args.host, args.port)
    except OSError as e:
        raise SystemExit(f"smtp_sink: error: cannot listen on {args.host}:{args.port}: {e}")
    port = server.sockets[0].getsockname()[1]
    httpd = None
    if args.http_port is not None:
        try:
            httpd = ThreadingHTTPServer((args.host, args.http_port), _http_handler(handler.root))
        except OSError as e:
            raise SystemExit(f"smtp_sink: error: cannot listen (HTTP) on {args.host}:{args.http_port}: {e}")
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        print(f"smtp_sink: read UI on http://{args.host}:{httpd.server_address[1]}/", file=sys.stderr)
    handler.write_state(smtp_port=port, http_port=httpd.server_address[1] if httpd else None)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, handler.toggle_refusing)
    print(f"READY {port}", flush=True)
    await stop.wait()
    server.close()
    if httpd:
        httpd.shutdown()
    handler.log.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        logging.getLogger("mail.log").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
    asyncio.run(serve(args))
    return 0


# ---------------------------------------------------------------- pytest wrapper
class SmtpSink:
    """Runs the sink as a subprocess. ``SmtpSink(tempfail_first_ratio=0.5)`` passes
    ``--tempfail-first-ratio 0.5``; ``True`` values pass a bare flag."""

    def __init__(self, maildir=None, *, host="127.0.0.1", http=False, startup_timeout=15.0, **options):
        self.maildir = os.path.abspath(maildir or tempfile.mkdtemp(prefix="smtp-sink-"))
        self.host, self.http, self.options, self.startup_timeout = host, http, options, startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.http_port: int | None = None
        self.pause_file = options.get("pause_before_reply_file")

    def start(self) -> "SmtpSink":
        cmd = [sys.executable, os.path.abspath(__file__), "--maildir", self.maildir,
               "--host", self.host, "--port", "0"] + (["--http-port", "0"] if self.http else [])
        for k, v in self.options.items():
            if v is None or v is False:
                continue
            cmd += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.startup_timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("READY "):
            self.proc.kill()
            rc = self.proc.wait()
            raise RuntimeError(f"smtp_sink did not become ready (exit {rc}, first line {line!r}); "
                               f"command: {' '.join(cmd)}")
        self.port = int(line.split()[1])
        self.http_port = self.state()["http_port"]
        return self

    def state(self) -> dict:
        with open(os.path.join(self.maildir, STATE_FILE), encoding="utf-8") as f:
            return json.load(f)

    def stop(self, timeout=10.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def set_refusing(self, on: bool, timeout=5.0) -> None:
        """Switch refuse mode via SIGUSR1 and wait until the sink confirms it."""
        if self.state()["refusing"] == on:
            return
        os.kill(self.proc.pid, signal.SIGUSR1)
        _wait_for(lambda: self.state()["refusing"] == on, timeout, "refuse mode switch")

    def wait_paused(self, n: int, timeout=10.0) -> str:
        """Wait until message ``n`` (1-based) is stored and held; returns its Message-ID."""
        marker = f"{self.pause_file}.{n}"
        _wait_for(lambda: os.path.exists(marker), timeout, f"pause marker {marker}")
        with open(marker, encoding="utf-8") as f:
            return f.read()

    def release(self) -> None:
        open(f"{self.pause_file}.release", "a").close()

    def mails(self):
        return read_mails(self.maildir)

    def message_ids(self):
        return message_ids(self.maildir)

    def deliveries(self):
        return deliveries(self.maildir)


def _wait_for(cond, timeout, what) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"smtp_sink: timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


if __name__ == "__main__":
    sys.exit(main())
