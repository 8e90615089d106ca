"""Alert rules under promtool (Debian's prometheus package): celeriac's own rules in compose/alerts.yml with
their unit tests, and celery-exporter's celery-mixin alerts, unchanged, on series labelled as celeriac exports
them. The mixin comes from ``../shared/peers/celery-mixin`` (``CELERY_MIXIN_DIR`` elsewhere).
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MIXIN = Path(os.environ.get("CELERY_MIXIN_DIR", ROOT.parent / "shared" / "peers" / "celery-mixin"))
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing: make prometheus installs it")


def promtool(*args):
    r = subprocess.run([PROMTOOL, *map(str, args)], capture_output=True, text=True, timeout=120)
    return r.returncode, r.stdout + r.stderr


def test_our_rules_are_valid_and_loaded_by_both_prometheus_configs():
    assert promtool("check", "rules", ROOT / "compose" / "alerts.yml")[0] == 0
    for config in ("prometheus.yml", "prometheus-compose.yml"):
        rc, out = promtool("check", "config", ROOT / "compose" / config)
        assert rc == 0 and "1 rule files found" in out, out


def test_our_alerts_fire_on_our_series():
    rc, out = promtool("test", "rules", HERE / "alerts_test.yml")
    assert rc == 0, out


def test_a_wrong_expectation_fails(tmp_path):
    """promtool really compares: one changed figure in an expected annotation turns the run red."""
    text = (HERE / "alerts_test.yml").read_text().replace("../../compose/alerts.yml",
                                                           str(ROOT / "compose" / "alerts.yml"))
    assert "moved 2 undecodable" in text
    bad = tmp_path / "bad_test.yml"
    bad.write_text(text.replace("moved 2 undecodable", "moved 3 undecodable"))
    rc, out = promtool("test", "rules", bad)
    assert rc != 0 and "CeleriacDeadLettersGrowing" in out


@pytest.mark.skipif(not MIXIN.is_dir(), reason=f"celery-mixin fixtures not found at {MIXIN}")
def test_celery_mixin_alerts_accept_our_metrics(tmp_path):
    alerts = MIXIN / "prometheus_alerts.yaml"
    assert promtool("check", "rules", alerts)[0] == 0
    # The mixin's own tests, unchanged, first, laid out as upstream has them (tests/ beside the rules).
    (tmp_path / "tests").mkdir()
    shutil.copy(alerts, tmp_path / "prometheus_alerts.yaml")
    shutil.copy(MIXIN / "tests.yaml", tmp_path / "tests" / "tests.yaml")
    rc, out = promtool("test", "rules", tmp_path / "tests" / "tests.yaml")
    assert rc == 0, out
    test = tmp_path / "mixin_test.yml"
    test.write_text((HERE / "mixin_alerts_test.yml").read_text().replace("MIXIN_ALERTS", str(alerts)))
    rc, out = promtool("test", "rules", test)
    assert rc == 0, out
