"""JSON schemas for the custom resources the chart renders, which kubernetes-validate does not know: KEDA's
``ScaledObject`` and ``TriggerAuthentication`` (keda.sh/v1alpha1) and the Prometheus Operator's
``ServiceMonitor`` (monitoring.coreos.com/v1). Written from the fields their CRDs define (KEDA 2.x, operator
0.7x), strict like kubernetes-validate's: unknown fields are refused, and KEDA trigger metadata is a map of
strings (a bare number there is rejected by the API server).
"""

STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}


def resource(api_version, kind, spec):
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                    "namespace": {"type": "string"},
                    "labels": STRING_MAP,
                    "annotations": STRING_MAP,
                },
            },
            "spec": spec,
        },
    }


def strict(properties, required=()):
    return {"type": "object", "additionalProperties": False, "properties": properties, "required": list(required)}


INT = {"type": "integer", "minimum": 0}
STR = {"type": "string"}

SCALED_OBJECT = resource("keda.sh/v1alpha1", "ScaledObject", strict({
    "scaleTargetRef": strict({"name": STR, "apiVersion": STR, "kind": STR, "envSourceContainerName": STR},
                             ["name"]),
    "pollingInterval": INT,
    "cooldownPeriod": INT,
    "initialCooldownPeriod": INT,
    "idleReplicaCount": INT,
    "minReplicaCount": INT,
    "maxReplicaCount": INT,
    "advanced": {"type": "object"},
    "fallback": strict({"failureThreshold": INT, "replicas": INT}, ["failureThreshold", "replicas"]),
    "triggers": {
        "type": "array",
        "minItems": 1,
        "items": strict({
            "type": {"enum": ["redis", "prometheus", "rabbitmq", "cpu", "memory", "cron"]},
            "name": STR,
            "metadata": STRING_MAP,
            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
            "useCachedMetrics": {"type": "boolean"},
            "authenticationRef": strict({"name": STR, "kind": {"enum": ["TriggerAuthentication",
                                                                        "ClusterTriggerAuthentication"]}},
                                        ["name"]),
        }, ["type", "metadata"]),
    },
}, ["scaleTargetRef", "triggers"]))

SECRET_REF = strict({"parameter": STR, "name": STR, "key": STR}, ["parameter", "name", "key"])
TRIGGER_AUTHENTICATION = resource("keda.sh/v1alpha1", "TriggerAuthentication", strict({
    "secretTargetRef": {"type": "array", "minItems": 1, "items": SECRET_REF},
    "env": {"type": "array"},
    "podIdentity": {"type": "object"},
}))

RELABELING = strict({
    "sourceLabels": {"type": "array", "items": STR},
    "separator": STR,
    "targetLabel": STR,
    "regex": STR,
    "modulus": INT,
    "replacement": STR,
    "action": {"enum": ["replace", "Replace", "keep", "Keep", "drop", "Drop", "labelmap", "LabelMap",
                        "labeldrop", "LabelDrop", "labelkeep", "LabelKeep", "hashmod", "HashMod"]},
})
SERVICE_MONITOR = resource("monitoring.coreos.com/v1", "ServiceMonitor", strict({
    "selector": strict({"matchLabels": STRING_MAP, "matchExpressions": {"type": "array"}}),
    "namespaceSelector": strict({"any": {"type": "boolean"}, "matchNames": {"type": "array", "items": STR}}),
    "jobLabel": STR,
    "endpoints": {
        "type": "array",
        "minItems": 1,
        "items": strict({
            "port": STR,
            "targetPort": {"type": ["string", "integer"]},
            "path": STR,
            "scheme": {"enum": ["http", "https"]},
            "interval": {"type": "string", "pattern": "^(0|(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
            "scrapeTimeout": STR,
            "honorLabels": {"type": "boolean"},
            "relabelings": {"type": "array", "items": RELABELING},
            "metricRelabelings": {"type": "array", "items": RELABELING},
        }),
    },
}, ["selector", "endpoints"]))

CRD_SCHEMAS = {
    "ScaledObject": SCALED_OBJECT,
    "TriggerAuthentication": TRIGGER_AUTHENTICATION,
    "ServiceMonitor": SERVICE_MONITOR,
}
