"""``charts/celeriac``, the Helm chart, rendered offline by Helm's own SDK (PyPI ``helm-python-sdk``) with the
default and the production values; every manifest validated strictly by ``kubernetes-validate`` against the
oldest Kubernetes the chart supports and the newest one known, and the custom resources (KEDA, Prometheus
Operator) against schemas of the fields their CRDs define. Then what an operator relies on: warm shutdowns
fit the grace period, probes on /health, one PodDisruptionBudget per worker, beat replicated, the migration
Job before everything, KEDA watching every priority list of every queue, job="celery" for the dashboards, and
the chart agreeing with compose/ (same workers, queues, ports and routes).
"""
import os
import subprocess
import tomllib
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from crd_schemas import CRD_SCHEMAS

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "celeriac"
KUBE_VERSIONS = ["1.27.0", kubernetes_validate.latest_version()]
PRIORITY_SUFFIXES = ["", "\x06\x163", "\x06\x166", "\x06\x169"]


def production_values():
    return helm.values_from_yaml((CHART / "values-production.yaml").read_text())


def render(values=None):
    """Every rendered manifest as a dict, in template order."""
    out = helm.Chart.load(str(CHART)).render(values, name="aura", namespace="shop", is_install=True)
    docs = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(out[path]) if d)
    return docs


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def values_of(values):
    merged = helm.Chart.load(str(CHART)).merge_values(values)
    return merged


VARIANTS = {"default": None, "production": production_values()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_helm_lint_is_clean(variant):
    report = helm.lint(str(CHART), VARIANTS[variant], strict=True, namespace="shop")
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_manifest_validates_strictly(variant):
    docs = render(VARIANTS[variant])
    kinds = sorted({d["kind"] for d in docs})
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    expected = {"ConfigMap", "Deployment", "Job", "PodDisruptionBudget", "Service"}
    if variant == "default":
        assert kinds == sorted(expected | {"Secret"})
    else:
        assert kinds == sorted(expected | {"ScaledObject", "ServiceMonitor", "TriggerAuthentication"})


def test_a_bad_manifest_is_caught():
    """The validation can fail: a typo'd field and a number where KEDA wants a string are refused."""
    docs = render(production_values())
    deploy = dict(next(d for d in docs if d["kind"] == "Deployment"))
    deploy["spec"] = dict(deploy["spec"], replica=2)
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deploy, KUBE_VERSIONS[-1], strict=True)
    scaled = next(d for d in docs if d["kind"] == "ScaledObject")
    scaled["spec"]["triggers"][0]["metadata"]["listLength"] = 50
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(scaled, CRD_SCHEMAS["ScaledObject"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_workers_stop_warm_and_report_health(variant):
    values = values_of(VARIANTS[variant])
    docs = render(VARIANTS[variant])
    deployments = by_kind(docs, "Deployment")
    services = by_kind(docs, "Service")
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for name, w in values["workers"].items():
        d = deployments[f"aura-celeriac-{name}"]
        pod = d["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        args = c["args"]
        assert args[:3] == ["--log-format", "json", "worker"]
        assert args[args.index("-Q") + 1] == ",".join(w["queues"])
        assert args[args.index("--metrics-addr") + 1] == f"0.0.0.0:{w['metricsPort']}"
        assert float(args[args.index("--shutdown-timeout") + 1]) == values["shutdownTimeout"]
        assert pod["terminationGracePeriodSeconds"] == values["shutdownTimeout"] + values["gracePeriodMargin"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
        assert c["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}
        assert c["ports"] == [{"name": "metrics", "containerPort": w["metricsPort"]}]
        assert c["envFrom"] == [{"secretRef": {"name": values["existingSecret"] or "aura-celeriac-env"}}]
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        svc = services[f"aura-celeriac-{name}-metrics"]
        assert svc["spec"]["ports"][0]["port"] == w["metricsPort"]
        assert svc["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
        assert pdbs[f"aura-celeriac-{name}"]["spec"]["selector"] == d["spec"]["selector"]
        # Under KEDA the Deployment leaves replicas to the autoscaler.
        assert ("replicas" in d["spec"]) == (not values["keda"]["enabled"])
    beat = deployments["aura-celeriac-beat"]
    assert beat["spec"]["replicas"] == values["beat"]["replicas"] >= 2
    assert "aura-celeriac-beat" in pdbs


@pytest.mark.parametrize("variant", VARIANTS)
def test_migrations_run_first(variant):
    docs = render(VARIANTS[variant])
    (job,) = by_kind(docs, "Job").values()
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert script.splitlines()[0] == "celeriac migrate up"
    if variant == "default":
        assert "celeriac tenants add \"demo\" --name \"Demo shop\"" in script
        # What the hook reads exists before it: the Secret and the ConfigMap are earlier hooks.
        for kind in ("Secret", "ConfigMap"):
            (res,) = by_kind(docs, kind).values()
            assert res["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
            assert int(res["metadata"]["annotations"]["helm.sh/hook-weight"]) < 0
    else:
        assert "Secret" not in {d["kind"] for d in docs}  # existingSecret: the chart makes none


def test_keda_watches_every_priority_list():
    values = values_of(production_values())
    docs = render(production_values())
    scaled = by_kind(docs, "ScaledObject")
    assert set(scaled) == {f"aura-celeriac-{n}" for n in values["workers"]}
    for name, w in values["workers"].items():
        so = scaled[f"aura-celeriac-{name}"]["spec"]
        assert so["scaleTargetRef"]["name"] == f"aura-celeriac-{name}"
        lists = [t["metadata"]["listName"] for t in so["triggers"]]
        assert lists == [q + s for q in w["queues"] for s in PRIORITY_SUFFIXES]
        assert {t["authenticationRef"]["name"] for t in so["triggers"]} == {"aura-celeriac-broker"}
    assert scaled["aura-celeriac-payment"]["spec"]["minReplicaCount"] == 2


@pytest.mark.parametrize("trigger", ["prometheus", "rabbitmq"])
def test_keda_other_triggers(trigger):
    docs = render({"keda": {"enabled": True, "trigger": trigger}})
    so = by_kind(docs, "ScaledObject")["aura-celeriac-general"]["spec"]
    assert [t["type"] for t in so["triggers"]] == [trigger, trigger]
    if trigger == "prometheus":
        assert so["triggers"][0]["metadata"]["query"] == 'max(celery_queue_length{queue_name="realtime"})'
    else:
        assert [t["metadata"]["queueName"] for t in so["triggers"]] == ["realtime", "bulk"]
        assert so["triggers"][0]["metadata"]["mode"] == "QueueLength"
    for doc in docs:
        if doc["kind"] in CRD_SCHEMAS:
            jsonschema.validate(doc, CRD_SCHEMAS[doc["kind"]])


def test_unknown_keda_trigger_is_refused():
    with pytest.raises(helm.HelmError, match="keda.trigger must be redis, prometheus or rabbitmq"):
        render({"keda": {"enabled": True, "trigger": "sqs"}})


def test_service_monitor_names_the_job_celery():
    docs = render(production_values())
    (sm,) = by_kind(docs, "ServiceMonitor").values()
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    for ep in sm["spec"]["endpoints"]:
        assert ep["path"] == "/metrics"
        assert {"targetLabel": "job", "replacement": "celery"} in ep["relabelings"]
    selector = sm["spec"]["selector"]["matchLabels"]
    scraped = [s for s in by_kind(docs, "Service").values()
               if all(s["metadata"]["labels"].get(k) == v for k, v in selector.items())]
    assert sorted(s["metadata"]["name"] for s in scraped) == [
        "aura-celeriac-beat-metrics", "aura-celeriac-email-metrics", "aura-celeriac-flower",
        "aura-celeriac-general-metrics", "aura-celeriac-payment-metrics", "aura-celeriac-sync-metrics"]


def test_chart_agrees_with_compose():
    """The chart and compose/ describe one platform: the same workers, queues, metrics ports and routes."""
    compose = yaml.safe_load((ROOT / "compose" / "compose.yaml").read_text())["services"]
    values = values_of(None)
    for name, w in values["workers"].items():
        cmd = compose[name]["command"]
        assert cmd[cmd.index("-Q") + 1] == ",".join(w["queues"]), name
        assert cmd[cmd.index("--metrics-addr") + 1] == f"0.0.0.0:{w['metricsPort']}", name
    shipped = tomllib.loads((ROOT / "compose" / "celeriac.toml").read_text())
    (config,) = by_kind(render(), "ConfigMap").values()
    chart = tomllib.loads(config["data"]["celeriac.toml"])
    assert chart["task_routes"] == shipped["task_routes"]
    for section in ("email", "payment", "sync"):
        assert chart[section] == shipped[section], section
    assert tomllib.loads(config["data"]["beat.toml"]) == tomllib.loads(
        (ROOT / "compose" / "beat.toml").read_text())


@pytest.mark.skipif(not os.environ.get("CELERIAC_BIN"), reason="needs CELERIAC_BIN (make test sets it)")
def test_the_binary_takes_every_rendered_flag():
    """Each long option the chart passes is one the celeriac binary documents for that subcommand."""
    docs = render(production_values())
    seen = set()
    for d in by_kind(docs, "Deployment").values():
        args = d["spec"]["template"]["spec"]["containers"][0]["args"]
        sub = next(a for a in args if not a.startswith("-") and a != "json")
        flags = [a for a in args if a.startswith("--") and a != "--log-format"]
        if (sub, tuple(flags)) in seen:
            continue
        seen.add((sub, tuple(flags)))
        out = subprocess.run([os.environ["CELERIAC_BIN"], sub, "--help"], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 0, out.stderr
        for flag in flags:
            assert flag in out.stdout, (sub, flag)
    assert {s for s, _ in seen} == {"worker", "beat", "flower", "webhooks"}
