"""End-to-end browser test of ``celeriac flower``'s web UI (flower-compat/ui/) in headless Chromium.

A worker of the kind under test runs with task events on; ``celeriac flower`` runs for the test's isolation
(same ``global_keyprefix``, its task history in ``flower.db`` next to the worker logs) with
``FLOWER_UNAUTHENTICATED_API=1``. Debian's Chromium (``scripts/ensure-chromium.sh``; another binary with
``CELERIAC_CHROMIUM``) is driven through Playwright for Python, pinned in requirements.txt: the test never
downloads a browser. Each page is saved as a screenshot in ``test-artifacts/interop/<test>/``.

The pages are the binary's embedded copies of flower-compat/ui/; with ``CELERIAC_FLOWER_UI_DIR`` set (to
iterate on the UI without rebuilding) flower serves them from that folder instead. Without it the test first
checks that the binary embeds the files of this checkout, so a stale binary fails with that message.

The flower process is celeriac's, whatever the worker: with ``INTEROP_WORKER=python`` the test runs when
``CELERIAC_BIN`` is set and skips otherwise.
"""
import contextlib
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request

import pytest

from conftest import REPO, WORKER_KIND, WorkerProcess, celeriac_bin, write_celeriac_config
from interop_helpers import wait_for

CHROMIUM = os.environ.get("CELERIAC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
UI_DIR = REPO / "flower-compat" / "ui"
GET_TIMEOUT = 10
#: how long a UI assertion waits (Playwright's expect retries until then); pages refresh every 2 s
UI_TIMEOUT_MS = 10_000


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium (Debian's) under Playwright, shared by the module's tests."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -r tests/interop/requirements.txt "
                    "(make venv); it drives the system Chromium, `playwright install` is not needed")
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"no Chromium at {CHROMIUM}: run scripts/ensure-chromium.sh (as root it installs Debian's "
                    "chromium package), or set CELERIAC_CHROMIUM to a Chromium binary")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context and page; uncaught JavaScript errors fail the test."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(UI_TIMEOUT_MS)
    pg = context.new_page()
    pg.js_errors = []
    pg.on("pageerror", lambda exc: pg.js_errors.append(str(exc)))
    yield pg
    errors = list(pg.js_errors)
    context.close()
    assert not errors, f"uncaught JavaScript errors in the UI: {errors}"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url, method="GET", timeout=5):
    """(status, body text) of one request; 0 when nothing answers."""
    req = urllib.request.Request(url, data=b"" if method == "POST" else None, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class CeleriacFlower:
    """A running ``celeriac flower`` (its own process group) at ``base``."""

    def __init__(self, proc, base):
        self.proc = proc
        self.base = base

    def get_json(self, path):
        status, body = _http(self.base + path)
        assert status == 200, f"GET {path}: {status} {body!r}\nflower log:\n{self.proc.log_tail()}"
        return json.loads(body)


@pytest.fixture
def celeriac_flower(workers):
    """``celeriac_flower(api_open=True)`` starts ``celeriac flower`` for this test's isolation on a free port;
    it is stopped (SIGTERM, then SIGKILL to its group) afterwards."""
    if WORKER_KIND == "python" and not os.environ.get("CELERIAC_BIN"):
        pytest.skip("the flower UI is served by `celeriac flower`: set CELERIAC_BIN to run it with INTEROP_WORKER=python")
    started = []

    def start(api_open=True):
        config = write_celeriac_config(workers.log_dir / "celeriac-flower.toml", workers.iso.prefix)
        env = dict(os.environ, RUST_BACKTRACE="1")
        for key in ("FLOWER_UNAUTHENTICATED_API", "FLOWER_BASIC_AUTH", "CELERIAC_CONFIG", "CELERIAC_FLOWER_DB"):
            env.pop(key, None)
        if api_open:
            env["FLOWER_UNAUTHENTICATED_API"] = "1"
        db = workers.log_dir / "flower.db"
        for _ in range(3):  # the free port may be taken between probing and binding
            port = _free_port()
            argv = [celeriac_bin(), "--broker", workers.broker_url, "--result-backend", workers.result_backend,
                    "--config", str(config), "flower", "--port", str(port), "--address", "127.0.0.1",
                    "--db", f"sqlite://{db}?mode=rwc", "--loglevel", "info"]
            proc = WorkerProcess("flower", "celeriac-flower", [], argv, env, workers.log_dir,
                                 workers.log_dir / "celeriac-flower.log")
            started.append(proc)
            fl = CeleriacFlower(proc, f"http://127.0.0.1:{port}")
            # It serves once it has asked the workers for their state (inspect, several times its timeout).
            deadline = time.monotonic() + 20
            up = False
            while proc.alive and not up and time.monotonic() < deadline:
                up = _http(fl.base + "/healthcheck")[0] == 200
                if not up:
                    time.sleep(0.1)
            if up:
                break
            proc.terminate(timeout=5)
        else:
            pytest.fail(f"celeriac flower did not answer /healthcheck:\n{proc.log_tail()}")
        if "CELERIAC_FLOWER_UI_DIR" not in env:
            for name in ("index.html", "app.js", "app.css"):
                status, served = _http(f"{fl.base}/static/{name}")
                assert status == 200 and served == (UI_DIR / name).read_text(), (
                    f"the binary's embedded {name} differs from flower-compat/ui/{name}: rebuild celeriac "
                    "(or set CELERIAC_FLOWER_UI_DIR=flower-compat/ui to serve the files from the checkout)")
        return fl

    yield start
    for proc in started:
        proc.terminate(timeout=5)


def start_worker(workers):
    """A worker with task events and heartbeats (and, for Python Celery, remote control: flower asks the
    workers for their queues) on."""
    settings = {"worker_send_task_events": True}
    if workers.kind_under_test == "python":
        settings["worker_enable_remote_control"] = True
    return workers.start(settings=settings, heartbeat=True)


@contextlib.contextmanager
def step(page, artifacts, name):
    """One stage of the test: its screenshot ``<name>.png`` at the end, ``<name>-failure.png`` if it fails."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            page.screenshot(path=str(artifacts / f"{name}-failure.png"), full_page=True)
        raise
    page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


# --------------------------------------------------------------------- tests
def test_flower_ui_workers_tasks_revoke_and_queues(workers, client_app, iso, celeriac_flower, page):
    from playwright.sync_api import expect

    worker = start_worker(workers)  # its readiness sentinel runs before flower listens: no event of it is seen
    fl = celeriac_flower()
    # Heartbeats reach flower: its event stream is up, so it sees every event of the tasks sent from now on.
    wait_for(lambda: any(w["hostname"] == worker.name and w["status"] is True
                         for w in fl.get_json("/workers?json=1")["data"]),
             10, message=f"{worker.name} online in celeriac flower")

    adds = [client_app.send_task("bench.add", (i, 10)) for i in range(3)]
    bad = client_app.send_task("bench.fail", ("ui-boom",))
    assert [r.get(timeout=GET_TIMEOUT) for r in adds] == [10, 11, 12]
    with pytest.raises(ValueError):
        bad.get(timeout=GET_TIMEOUT)
    # Sent once the others are done, so that it is the most recently received task.
    later = client_app.send_task("bench.add", (40, 2), countdown=60)
    artifacts = workers.log_dir

    # -- dashboard: Processed / Succeeded / Failed count the task events seen from the worker, as Flower's
    # dashboard does (the countdown task is received, not finished).
    with step(page, artifacts, "dashboard"):
        page.goto(fl.base + "/")
        expect(page).to_have_title(re.compile("Workers"))
        row = page.locator(f'#workers-table tbody tr[data-worker="{worker.name}"]')
        expect(row.get_by_test_id("worker-status")).to_have_text("Online")
        expect(row.locator('[data-col="processed"]')).to_have_text("5")
        expect(row.locator('[data-col="succeeded"]')).to_have_text("3")
        expect(row.locator('[data-col="failed"]')).to_have_text("1")
        expect(row.locator('[data-col="active"]')).to_have_text("0")
        expect(row.locator('[data-col="loadavg"]')).to_have_text(re.compile(r"^\d+\.\d\d, \d+\.\d\d, \d+\.\d\d$"))
        total = page.get_by_test_id("workers-total")
        expect(total.locator('[data-col="processed"]')).to_have_text("5")
        expect(total.locator('[data-col="status"]')).to_have_text("1 online")
        expect(page.locator('#nav a[aria-current="page"]')).to_have_text("Workers")

    # -- task list: filter by state, search by id (navigation through the top nav, without a page load)
    with step(page, artifacts, "tasks-failure"):
        page.get_by_test_id("nav-tasks").click()
        expect(page).to_have_url(fl.base + "/tasks")
        rows = page.locator("#tasks-table tbody tr[data-task-id]")
        expect(rows).to_have_count(5)
        # Most recently received first: the countdown task was sent last.
        expect(rows.first).to_have_attribute("data-task-id", later.id)
        expect(page.locator("#filter-taskname option")).to_have_text(["Any task", "bench.add", "bench.fail"])
        expect(page.locator("#filter-worker option")).to_have_text(["Any worker", worker.name])
        page.get_by_label("State").select_option("FAILURE")
        expect(rows).to_have_count(1)
        expect(rows).to_have_attribute("data-task-id", bad.id)
        expect(rows.locator('[data-col="state"]')).to_have_text("FAILURE")
        expect(rows.locator('[data-col="name"]')).to_have_text("bench.fail")
        expect(rows.locator('[data-col="result"]')).to_have_text("ValueError('ui-boom')")
        expect(page).to_have_url(fl.base + "/tasks?state=FAILURE")

    with step(page, artifacts, "tasks-filters"):
        page.get_by_label("State").select_option("SUCCESS")
        page.get_by_label("Task name").select_option("bench.add")
        page.get_by_label("Worker").select_option(worker.name)
        expect(rows).to_have_count(3)
        assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.taskId)")) == sorted(r.id for r in adds)
        page.get_by_label("Per page").select_option("10")
        expect(page.get_by_test_id("tasks-next")).to_be_disabled()
        expect(page.get_by_test_id("tasks-prev")).to_be_disabled()

    with step(page, artifacts, "tasks-pages"):
        page.goto(fl.base + "/tasks?limit=2")
        expect(rows).to_have_count(2)
        expect(rows.first).to_have_attribute("data-task-id", later.id)
        expect(page.get_by_test_id("tasks-range")).to_have_text("1–2")
        expect(page.get_by_test_id("tasks-prev")).to_be_disabled()
        seen = []
        for expected_range, count in (("1–2", 2), ("3–4", 2), ("5–5", 1)):
            expect(page.get_by_test_id("tasks-range")).to_have_text(expected_range)
            expect(rows).to_have_count(count)
            seen += rows.evaluate_all("rs => rs.map(r => r.dataset.taskId)")
            if count == 2:
                page.get_by_test_id("tasks-next").click()
        expect(page.get_by_test_id("tasks-next")).to_be_disabled()
        expect(page).to_have_url(fl.base + "/tasks?offset=4&limit=2")
        assert sorted(seen) == sorted([later.id, bad.id, *(r.id for r in adds)]), seen
        page.get_by_test_id("tasks-prev").click()
        expect(page.get_by_test_id("tasks-range")).to_have_text("3–4")

    with step(page, artifacts, "tasks-search"):
        page.get_by_label("Per page").select_option("20")
        page.get_by_label("State").select_option("")
        page.get_by_label("Task name").select_option("")
        page.get_by_label("Worker").select_option("")
        page.get_by_label("Search").fill(later.id)
        page.get_by_label("Search").press("Enter")
        expect(rows).to_have_count(1)
        expect(rows).to_have_attribute("data-task-id", later.id)
        expect(rows.locator('[data-col="args"]')).to_have_text("(40, 2)")
        expect(rows.locator('[data-col="state"]')).to_have_text("RECEIVED")

    # -- the countdown task's page: revoke it
    with step(page, artifacts, "task-revoked"):
        rows.get_by_test_id("task-link").click()
        expect(page).to_have_url(f"{fl.base}/task/{later.id}")
        expect(page.get_by_test_id("task-state")).to_have_text("RECEIVED")
        expect(page.locator("#task-name")).to_have_text("bench.add")
        expect(page.locator("#task-args")).to_have_text("(40, 2)")
        expect(page.locator("#task-worker")).to_have_text(worker.name)
        expect(page.locator("#task-eta")).not_to_have_text("—")
        expect(page.locator("#task-received")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$"))
        expect(page.get_by_test_id("revoke-button")).to_be_enabled()
        page.get_by_test_id("revoke-button").click()
        expect(page.get_by_test_id("action-message")).to_have_text(f"Revoked '{later.id}'")
        # The result backend has REVOKED at once; the task-revoked event comes only when the ETA is due.
        expect(page.get_by_test_id("task-state")).to_have_text("REVOKED")
        expect(page.get_by_test_id("revoke-button")).to_be_disabled()
        wait_for(lambda: client_app.AsyncResult(later.id).state == "REVOKED", 5, message="REVOKED stored")

    # -- the failed task's page: exception and traceback, preformatted
    with step(page, artifacts, "task-failure"):
        page.goto(f"{fl.base}/task/{bad.id}")
        expect(page.get_by_test_id("task-state")).to_have_text("FAILURE")
        expect(page.locator("pre#task-exception")).to_have_text("ValueError('ui-boom')")
        expect(page.locator("pre#task-traceback")).to_contain_text("ValueError: ui-boom")
        expect(page.locator("pre#task-args")).to_have_text("('ui-boom',)")
        expect(page.locator("#task-failed")).to_have_text(re.compile(r"^\d{4}-\d\d-\d\dT"))

    # -- a succeeded task's page: its result, and a link back to the list of its worker's tasks
    with step(page, artifacts, "task-success"):
        page.goto(f"{fl.base}/task/{adds[2].id}")
        expect(page.get_by_test_id("task-state")).to_have_text("SUCCESS")
        expect(page.locator("pre#task-result")).to_have_text("12")
        expect(page.locator("#task-kwargs")).to_have_text("{}")
        expect(page.locator("#task-runtime")).not_to_have_text("—")
        expect(page.get_by_test_id("revoke-button")).to_be_disabled()

    # -- queues
    with step(page, artifacts, "queues"):
        page.get_by_test_id("nav-queues").click()
        expect(page).to_have_url(fl.base + "/queues")
        queue = page.locator(f'#queues-table tr[data-queue="{iso.queue}"]')
        expect(queue.locator('[data-col="name"]')).to_have_text(iso.queue)
        expect(queue.locator('[data-col="messages"]')).to_have_text("0")

    # Back goes to the previous page of the single-page app.
    page.go_back()
    expect(page).to_have_url(f"{fl.base}/task/{adds[2].id}")
    expect(page.get_by_test_id("task-state")).to_have_text("SUCCESS")


def test_flower_ui_explains_a_closed_api(workers, celeriac_flower, page):
    from playwright.sync_api import expect

    fl = celeriac_flower(api_open=False)  # neither FLOWER_UNAUTHENTICATED_API nor --basic-auth
    with step(page, workers.log_dir, "api-closed"):
        page.goto(fl.base + "/tasks")
        banner = page.get_by_test_id("error-banner")
        expect(banner).to_be_visible()
        expect(banner).to_have_attribute("data-kind", "auth")
        expect(banner).to_contain_text("401")
        expect(banner).to_contain_text("FLOWER_UNAUTHENTICATED_API")
        expect(page.get_by_test_id("tasks-status")).to_have_text("The tasks could not be loaded.")
    with step(page, workers.log_dir, "api-closed-dashboard"):
        # The dashboard is not part of the API: it still works.
        page.get_by_test_id("nav-workers").click()
        expect(banner).to_be_hidden()
        expect(page.locator("#workers-table tbody tr.empty")).to_contain_text("No workers seen yet")
