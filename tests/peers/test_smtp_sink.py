"""Tests of the SMTP sink test peer itself (tests/peers/smtp_sink.py).

Run: ~/.cache/celeriac/venv/bin/python -m pytest -q tests/peers/test_smtp_sink.py
Every test starts its own sink subprocess on a free port with a temp Maildir.
"""
import json
import os
import signal
import smtplib
import subprocess
import sys
import threading
import urllib.request

import pytest

import smtp_sink
from smtp_sink import SmtpSink, tempfails

SINK = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smtp_sink.py")


def make_msg(mid: str, to: str = "bob@example.test", subject: str = "hello") -> bytes:
    return (f"From: Alice <alice@example.test>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: {mid}\r\nDate: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            "\r\nfirst line\r\n.a line starting with a dot\r\n\u00e9 8bit\r\n").encode()


@pytest.fixture
def sink_factory(tmp_path):
    sinks = []

    def start(**options):
        sink = SmtpSink(str(tmp_path / f"maildir{len(sinks)}"), **options).start()
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        assert sink.stop() == 0, "sink did not exit cleanly on SIGTERM"


def test_plain_delivery_is_byte_identical_and_logged(sink_factory):
    sink = sink_factory()
    raw = make_msg("<plain-1@celeriac.test>")
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
        code, caps = s.ehlo("client.test")
        assert code == 250
        assert "8bitmime" in s.esmtp_features and "size" in s.esmtp_features
        assert "starttls" not in s.esmtp_features and "auth" not in s.esmtp_features
        assert s.sendmail("alice@example.test", ["bob@example.test", "carol@example.test"], raw) == {}
    keys = smtp_sink.mail_keys(sink.maildir)
    assert len(keys) == 1 and os.listdir(os.path.join(sink.maildir, "new")) == keys
    assert smtp_sink.read_raw(sink.maildir, keys[0]) == raw
    assert sink.message_ids() == {"<plain-1@celeriac.test>": 1}
    (mail,) = sink.mails()
    assert mail["Subject"] == "hello"
    (d,) = sink.deliveries()
    assert d["key"] == keys[0] and d["message_id"] == "<plain-1@celeriac.test>"
    assert d["mail_from"] == "alice@example.test"
    assert d["rcpt_tos"] == ["bob@example.test", "carol@example.test"]
    assert d["size"] == len(raw) and d["auth_user"] is None


def test_tempfail_ratio_is_predictable(sink_factory):
    sink = sink_factory(tempfail_first_ratio=0.5)
    ids = [f"<tf-{i}@celeriac.test>" for i in range(200)]
    expected = {mid for mid in ids if tempfails(mid, 0.5)}
    assert 60 < len(expected) < 140  # the hash really splits the set
    failed = set()
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
        for mid in ids:
            try:
                s.sendmail("a@example.test", ["b@example.test"], make_msg(mid))
            except smtplib.SMTPDataError as e:
                assert (e.smtp_code, e.smtp_error) == (451, b"4.3.0 Try again later")
                failed.add(mid)
        assert failed == expected
        assert sink.message_ids() == {mid: 1 for mid in ids if mid not in expected}
        for mid in ids:  # second attempt: everything accepted (already stored ones again)
            assert s.sendmail("a@example.test", ["b@example.test"], make_msg(mid)) == {}
    counts = sink.message_ids()
    assert set(counts) == set(ids)
    assert all(counts[mid] == (1 if mid in expected else 2) for mid in ids)


def test_reject_rcpt_regex_gives_550_and_stores_nothing(sink_factory):
    sink = sink_factory(reject_rcpt_regex=r"^nobody@")
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            s.sendmail("a@example.test", ["nobody@example.test"], make_msg("<rej@x>"))
        code, msg = exc.value.recipients["nobody@example.test"]
        assert code == 550
        assert msg == b"5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
        # a mixed envelope keeps only the accepted recipient
        refused = s.sendmail("a@example.test", ["nobody@example.test", "ok@example.test"], make_msg("<mix@x>"))
        assert refused["nobody@example.test"][0] == 550
    assert sink.message_ids() == {"<mix@x>": 1}
    assert [d["rcpt_tos"] for d in sink.deliveries()] == [["ok@example.test"]]


def test_pause_hook_holds_250_until_release(sink_factory, tmp_path):
    sink = sink_factory(pause_before_reply_file=str(tmp_path / "pause"))
    result, done = {}, threading.Event()

    def send():
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=30) as s:
            result["refused"] = s.sendmail("a@example.test", ["b@example.test"], make_msg("<pause@x>"))
        done.set()

    t = threading.Thread(target=send)
    t.start()
    assert sink.wait_paused(1) == "<pause@x>"
    assert sink.message_ids() == {"<pause@x>": 1}, "message must be stored before the 250"
    assert not done.wait(0.3), "the 250 arrived before the release file existed"
    sink.release()
    t.join(10)
    assert done.is_set() and result["refused"] == {}


def test_sigusr1_refuse_mode_gives_421(sink_factory):
    sink = sink_factory()
    sink.set_refusing(True)
    with pytest.raises(smtplib.SMTPConnectError) as exc:
        smtplib.SMTP("127.0.0.1", sink.port, timeout=10)
    assert exc.value.smtp_code == 421 and exc.value.smtp_error == b"4.3.2 Service not available"
    sink.set_refusing(False)
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
        s.sendmail("a@example.test", ["b@example.test"], make_msg("<after-refuse@x>"))
    assert sink.message_ids() == {"<after-refuse@x>": 1}


def test_auth_plain_and_login(sink_factory):
    sink = sink_factory(auth_user="celeriac", auth_password="s3cret")
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
        s.ehlo("client.test")
        assert set(s.esmtp_features["auth"].split()) == {"LOGIN", "PLAIN"}
        with pytest.raises(smtplib.SMTPSenderRefused) as exc:
            s.sendmail("a@example.test", ["b@example.test"], make_msg("<noauth@x>"))
        assert exc.value.smtp_code == 530
        with pytest.raises(smtplib.SMTPAuthenticationError) as exc:
            s.login("celeriac", "wrong")
        assert exc.value.smtp_code == 535
    for mech in ("PLAIN", "LOGIN"):
        with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
            s.ehlo("client.test")
            s.user, s.password = "celeriac", "s3cret"
            code, _ = s.auth(mech, getattr(s, f"auth_{mech.lower()}"), initial_response_ok=(mech == "PLAIN"))
            assert code == 235
            s.sendmail("a@example.test", ["b@example.test"], make_msg(f"<auth-{mech}@x>"))
    assert sink.message_ids() == {"<auth-PLAIN@x>": 1, "<auth-LOGIN@x>": 1}
    assert {d["auth_user"] for d in sink.deliveries()} == {"celeriac"}


def test_http_read_ui(sink_factory):
    sink = sink_factory(http=True)
    raw = make_msg("<ui@x>", subject="<b>ui</b>")
    with smtplib.SMTP("127.0.0.1", sink.port, timeout=10) as s:
        s.sendmail("a@example.test", ["b@example.test"], raw)
    base = f"http://127.0.0.1:{sink.http_port}"
    with urllib.request.urlopen(base + "/api/mails", timeout=10) as r:
        (m,) = json.load(r)
    assert m["message_id"] == "<ui@x>" and m["subject"] == "<b>ui</b>" and m["size"] == len(raw)
    with urllib.request.urlopen(base + "/", timeout=10) as r:
        page = r.read().decode()
    assert "&lt;b&gt;ui&lt;/b&gt;" in page and m["url"] in page
    with urllib.request.urlopen(base + m["url"], timeout=10) as r:
        assert r.read() == raw
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(base + "/mail/nope", timeout=10)
    assert exc.value.code == 404


def test_cli_ready_line_sigint_and_errors(tmp_path):
    proc = subprocess.Popen([sys.executable, SINK, "--maildir", str(tmp_path / "md")],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("READY ") and int(line.split()[1]) > 0
    proc.send_signal(signal.SIGINT)
    assert proc.wait(10) == 0
    assert proc.stdout.read() == "", "stdout must carry only the READY line"
    proc.stdout.close()
    bad = subprocess.run([sys.executable, SINK, "--maildir", str(tmp_path / "md"),
                          "--tempfail-first-ratio", "1.5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--tempfail-first-ratio must be within 0..1" in bad.stderr
