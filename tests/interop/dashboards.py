"""Grafana dashboards checked through Prometheus (Grafana itself is not installable here): every panel query of
a dashboard, with its template variables filled in the way Grafana fills them (from their own
``label_values`` queries), evaluated against a live Prometheus's HTTP API.
"""
import json
import re
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIXIN = ROOT.parent / "shared" / "peers" / "celery-mixin"
MIXIN_DASHBOARDS = ["celery-tasks-overview.json", "celery-tasks-by-task.json", "celery-tasks.json"]
OUR_DASHBOARDS = sorted((ROOT / "compose" / "grafana" / "dashboards").glob("*.json"))
# Grafana's built-in interval variables, as a dashboard open on "last 1 hour" would have them.
BUILTINS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s"}


def prom(base, path, **params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]


def panels(dashboard):
    """Every panel, rows and nested panels included."""
    def walk(ps):
        for p in ps:
            yield p
            yield from walk(p.get("panels", []))
    yield from walk(dashboard.get("panels", []))
    for row in dashboard.get("rows", []):
        yield from walk(row.get("panels", []))


def targets(dashboard):
    """(panel title, expression) of every query target."""
    return [(p.get("title", ""), t["expr"]) for p in panels(dashboard) for t in p.get("targets", []) if t.get("expr")]


def fill(expr, variables):
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    for name, value in BUILTINS.items():
        expr = expr.replace(name, value)
    return expr


def variables(base, dashboard):
    """Fills each query variable in order, as Grafana does: the first value its label_values query finds
    (an ``All``/multi variable gets the regex of every value)."""
    out = {}
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        query = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((?:(.*),\s*)?(\w+)\)\s*", query)
        assert m, f"unsupported variable query {query!r}"
        selector, label = m.group(1), m.group(2)
        if selector:
            values = prom(base, "/api/v1/series", **{"match[]": fill(selector, out)})
            found = sorted({s[label] for s in values if label in s})
        else:
            found = sorted(prom(base, f"/api/v1/label/{label}/values"))
        assert found, f"variable {v['name']}: {query!r} found no value"
        out[v["name"]] = "|".join(found) if (v.get("multi") or v.get("includeAll")) else found[0]
    return out


def empty_queries(base, dashboard, expect_empty=()):
    """Queries that return no data (each as 'panel: expression'); ``expect_empty`` lists panel titles allowed
    to be empty."""
    vs = variables(base, dashboard)
    missing = []
    for title, expr in targets(dashboard):
        data = prom(base, "/api/v1/query", query=fill(expr, vs))
        if not data["result"] and title not in expect_empty:
            missing.append(f"{title}: {fill(expr, vs)}")
    return missing


def load(path):
    return json.loads(Path(path).read_text())
