"""The Kubernetes deployment in deploy/ renders, is schema-valid, and keeps its promises.

Every overlay under deploy/overlays/ is rendered with `kubectl kustomize` (offline, no
cluster) and then:

- validated in strict mode (unknown fields are errors) against the Kubernetes OpenAPI schemas
  bundled with kubernetes-validate, for the oldest cluster version we support and the newest
  the validator knows;
- the KEDA custom resources (ScaledObject, TriggerAuthentication), which the validator has no
  schema for and would only warn about, are validated here against a strict schema of the
  KEDA v2 fields, plus their embedded standard types through the Kubernetes schemas. Any
  other kind without a schema fails the test instead of passing unchecked;
- checked for the operational properties docs/architecture.md asks of each workload.

Without kubectl these tests skip locally, naming the missing tool, and fail in CI (CI=true);
they never pass silently.
"""

from __future__ import annotations

import ast
import base64
import math
import operator
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.support.manifests import BASE, DEPLOY, OVERLAYS, Manifest, render

# The oldest cluster minor we support (README "Requirements") and the newest schema bundled
# with kubernetes-validate, whatever version that is.
KUBERNETES_VERSIONS = ("1.30", "latest")

HTTP_COMPONENTS = {"token-issuance", "session-resolution", "history"}
CONSUMER_COMPONENT = "history-consumer"
# The app's default drain budget; terminationGracePeriodSeconds must outlast it.
SHUTDOWN_TIMEOUT_FLOOR = 25
UID = 10001

# Path -> Service. Nothing else may be reachable from the Internet.
PUBLIC_ROUTES = {
    "/widget/sessions": "session-resolution",
    "/widget/authenticate-user": "token-issuance",
    "/.well-known/jwks.json": "token-issuance",
}
INTERNAL_PREFIXES = ("/v1", "/admin", "/metrics", "/healthz", "/readyz", "/docs", "/openapi")

SECRET_NAME = "widget-identity-secrets"
# The Secret's keys. REDIS_URL is not one: the kubelet builds it from REDIS_PASSWORD and the
# ConfigMap's REDIS_ADDRESS, which the KEDA triggers read as well.
SECRET_VARS = {
    "DATABASE_URL", "DATABASE_DIRECT_URL", "ADMIN_TOKEN", "KEY_ENCRYPTION_KEY", "REDIS_PASSWORD",
}  # fmt: skip
REDIS_URL_TEMPLATE = re.compile(r"^(rediss?)://:\$\(REDIS_PASSWORD\)@\$\(REDIS_ADDRESS\)/\d+$")
SECRET_MOUNT = "/etc/widget-identity/secrets"
ALLOWED_EGRESS = {("TCP", 5432), ("TCP", 6379), ("UDP", 53), ("TCP", 53)}
CONSUMER_GROUP = "history"


# --- rendering --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    name: str
    docs: tuple[Manifest, ...]

    def of_kind(self, kind: str) -> list[Manifest]:
        return [d for d in self.docs if d["kind"] == kind]

    def named(self, kind: str, name: str) -> Manifest:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: expected one {kind}/{name}, found {len(found)}"
        return found[0]

    @property
    def deployments(self) -> list[Manifest]:
        return self.of_kind("Deployment")

    def workloads(self) -> list[Manifest]:
        """Everything that runs a pod: the Deployments and the migrate Job."""
        return self.deployments + self.of_kind("Job")

    def config(self) -> dict[str, str]:
        maps = [
            d
            for d in self.of_kind("ConfigMap")
            if d["metadata"]["name"].startswith("widget-identity-config")
        ]
        assert len(maps) == 1, f"{self.name}: expected one widget-identity-config ConfigMap"
        data: dict[str, str] = maps[0]["data"]
        return data


def _rendered(name: str) -> Rendered:
    return Rendered(name, render(DEPLOY / "overlays" / name))


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> Rendered:
    return _rendered(request.param)


# --- small readers ----------------------------------------------------------------------


def _component(doc: Manifest) -> str:
    component: str = doc["metadata"]["labels"]["app.kubernetes.io/component"]
    return component


def _pod_spec(workload: Manifest) -> Manifest:
    spec: Manifest = workload["spec"]["template"]["spec"]
    return spec


def _pod_labels(workload: Manifest) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _containers(workload: Manifest) -> list[Manifest]:
    spec = _pod_spec(workload)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def _is_http(deployment: Manifest) -> bool:
    return bool(_pod_spec(deployment)["containers"][0]["args"][0] == "serve")


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {
    None: 1.0, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
    "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40,
}  # fmt: skip


def _quantity(value: str | int | float) -> float:
    match = _QUANTITY.match(str(value))
    assert match, f"unparseable resource quantity {value!r}"
    return float(match[1]) * _FACTORS[match[2]]


def _prestop_sleep_seconds(container: Manifest) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:  # the native sleep action (Kubernetes >= 1.30)
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return int(command[1])
    return 0


def _env_refs(workload: Manifest) -> Iterator[tuple[str, Manifest]]:
    for container in _containers(workload):
        for env in container.get("env", []):
            yield env["name"], env


# --- schema validation ------------------------------------------------------------------


def _validator_module() -> Any:
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (it is in the dev extras: "
        "pip install -e '.[dev]'); cannot check manifests against the Kubernetes schemas",
    )


def _k8s_version(kv: Any, wanted: str) -> str:
    return str(kv.latest_version()) if wanted == "latest" else wanted


def _k8s_errors(kv: Any, doc: Manifest, version: str, where: str) -> list[str]:
    try:
        kv.validate(doc, version, strict=True)
    except kv.ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        return [f"{where}: {path}: {exc.message}"]
    return []


# KEDA v2 (keda.sh/v1alpha1), written from the KEDA documentation for the fields that exist,
# strict like the Kubernetes schemas: an unknown or misspelt field is an error, as is a
# non-string trigger metadata value (the API server rejects those). Extend it when a new
# field is used on purpose.
_STR = {"type": "string", "minLength": 1}
_COUNT = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}

_SCALED_OBJECT_SCHEMA: Manifest = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object"},  # validated as ObjectMeta by the Kubernetes schema
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["scaleTargetRef", "triggers"],
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["name"],
                    "properties": {
                        "apiVersion": _STR,
                        "kind": _STR,
                        "name": _STR,
                        "envSourceContainerName": _STR,
                    },
                },
                "pollingInterval": _COUNT,
                "cooldownPeriod": _COUNT,
                "initialCooldownPeriod": _COUNT,
                "idleReplicaCount": _COUNT,
                "minReplicaCount": _COUNT,
                "maxReplicaCount": _COUNT,
                "fallback": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["failureThreshold", "replicas"],
                    "properties": {"failureThreshold": _COUNT, "replicas": _COUNT},
                },
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "name": _STR,
                                # validated as HorizontalPodAutoscalerBehavior below
                                "behavior": {"type": "object"},
                            },
                        },
                        # KEDA >= 2.13: one composite metric from the named triggers.
                        "scalingModifiers": {
                            "type": "object",
                            "additionalProperties": False,
                            "required": ["formula", "target"],
                            "properties": {
                                "formula": _STR,
                                "target": _STR,
                                "activationTarget": _STR,
                                "metricType": {"enum": ["AverageValue", "Value"]},
                            },
                        },
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["type", "metadata"],
                        "properties": {
                            "type": _STR,
                            "name": _STR,
                            "metadata": _STRING_MAP,
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "useCachedMetrics": {"type": "boolean"},
                            "authenticationRef": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "properties": {
                                    "name": _STR,
                                    "kind": {
                                        "enum": [
                                            "TriggerAuthentication",
                                            "ClusterTriggerAuthentication",
                                        ]
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}

_TARGET_REFS = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": False,
        "required": ["parameter", "name", "key"],
        "properties": {"parameter": _STR, "name": _STR, "key": _STR},
    },
}
_TRIGGER_AUTHENTICATION_SCHEMA: Manifest = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"},
        "kind": {"const": "TriggerAuthentication"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "minProperties": 1,
            "properties": {
                "secretTargetRef": _TARGET_REFS,
                "configMapTargetRef": _TARGET_REFS,
                "env": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["parameter", "name"],
                        "properties": {"parameter": _STR, "name": _STR, "containerName": _STR},
                    },
                },
            },
        },
    },
}

# Prometheus Operator (monitoring.coreos.com/v1), the fields deploy/monitoring uses, as
# strict as the KEDA ones. The rules' PromQL is checked by promtool in test_monitoring.py.
_STRING_LIST = {"type": "array", "items": _STR}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": _STRING_LIST,
        "separator": {"type": "string"},
        "targetLabel": _STR,
        "regex": _STR,
        "modulus": _COUNT,
        "replacement": {"type": "string"},
        "action": {
            "enum": [
                "replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
                "lowercase", "uppercase", "keepequal", "dropequal",
            ]
        },
    },
}  # fmt: skip
_DURATION = {"type": "string", "pattern": r"^(\d+(ms|s|m|h|d|w|y))+$"}
_POD_MONITOR_SCHEMA: Manifest = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": _STR,
                "podTargetLabels": _STRING_LIST,
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRING_MAP, "matchExpressions": {}},
                },
                "namespaceSelector": {"type": "object"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": _STR,
                            "path": _STR,
                            "scheme": {"enum": ["http", "https"]},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABELING},
                            "metricRelabelings": {"type": "array", "items": _RELABELING},
                        },
                    },
                },
            },
        },
    },
}
_PROMETHEUS_RULE_SCHEMA: Manifest = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name", "rules"],
                        "properties": {
                            "name": _STR,
                            "interval": _DURATION,
                            "limit": _COUNT,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["record"]}, {"required": ["alert"]}],
                                    "properties": {
                                        "record": _STR,
                                        "alert": _STR,
                                        "expr": _STR,
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _STRING_MAP,
                                        "annotations": _STRING_MAP,
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}


# The redis-streams scalers' documented metadata keys (one Redis, or a Redis Cluster), the
# keys that name where Redis is, and their three mutually exclusive scaling targets.
_REDIS_STREAMS_COMMON_KEYS = {
    "usernameFromEnv", "passwordFromEnv", "stream", "consumerGroup", "pendingEntriesCount",
    "streamLength", "lagCount", "activationLagCount", "enableTLS", "unsafeSsl",
    "databaseIndex",
}  # fmt: skip
_REDIS_ADDRESS_KEYS = {
    "redis-streams": {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv"},
    "redis-cluster-streams": {
        "addresses", "addressesFromEnv", "hosts", "hostsFromEnv", "ports", "portsFromEnv",
    },
}  # fmt: skip
# The key that reads the address from the consumer's own environment, per scaler.
_REDIS_ADDRESS_FROM_ENV = {
    "redis-streams": "addressFromEnv",
    "redis-cluster-streams": "addressesFromEnv",
}
_REDIS_STREAMS_TARGETS = {"pendingEntriesCount", "streamLength", "lagCount"}
_REDIS_STREAMS_AUTH_PARAMS = {"username", "password", "tls", "ca", "cert", "key", "keyPassword"}


def _json_schema_errors(schema: Manifest, doc: Manifest, where: str) -> list[str]:
    import jsonschema  # a dependency of kubernetes-validate

    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{where}: {'.'.join(str(p) for p in err.path)}: {err.message}"
        for err in validator.iter_errors(doc)
    ]


def _meta_errors(kv: Any, doc: Manifest, version: str, where: str) -> list[str]:
    # ObjectMeta is a standard type: check it with the real schema, wrapped in a ConfigMap.
    wrapper = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc.get("metadata", {})}
    return _k8s_errors(kv, wrapper, version, f"{where} metadata")


def _scaled_object_errors(kv: Any, doc: Manifest, version: str, where: str) -> list[str]:
    errors = _json_schema_errors(_SCALED_OBJECT_SCHEMA, doc, where)
    errors += _meta_errors(kv, doc, version, where)
    if errors:
        return errors
    spec = doc["spec"]
    behavior = spec.get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
    if behavior is not None:
        hpa = {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "behavior-check"},
            "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": "x"},
                "maxReplicas": 1,
                "behavior": behavior,
            },
        }
        errors += _k8s_errors(kv, hpa, version, f"{where} advanced.hpaConfig.behavior")
    if spec.get("minReplicaCount", 0) > spec.get("maxReplicaCount", 100):
        errors.append(f"{where}: minReplicaCount > maxReplicaCount")
    for i, trigger in enumerate(spec["triggers"]):
        address_keys = _REDIS_ADDRESS_KEYS.get(trigger["type"])
        if address_keys is None:
            continue
        meta = trigger["metadata"]
        unknown = set(meta) - _REDIS_STREAMS_COMMON_KEYS - address_keys
        if unknown:
            errors.append(
                f"{where}: triggers.{i}: unknown {trigger['type']} keys {sorted(unknown)}"
            )
        if len(set(meta) & _REDIS_STREAMS_TARGETS) != 1:
            errors.append(f"{where}: triggers.{i}: needs exactly one of {_REDIS_STREAMS_TARGETS}")
        if "stream" not in meta or not {k for k in address_keys if "port" not in k} & set(meta):
            errors.append(f"{where}: triggers.{i}: needs a stream and an address")
    modifiers = spec.get("advanced", {}).get("scalingModifiers")
    if modifiers is not None:
        errors += _scaling_modifiers_errors(modifiers, spec["triggers"], where)
    return errors


_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The functions of KEDA's formula language (expr) the formulas here may call, with their
# Python equivalents for _replicas_wanted.
_FORMULA_FUNCTIONS: dict[str, Callable[..., float]] = {"max": max, "min": min}
_FORMULA_OPERATORS: dict[type, Callable[[float, float], float]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}  # fmt: skip


def _evaluate(formula: str, values: dict[str, float]) -> float:
    """A scalingModifiers formula, for the arithmetic subset of expr that is also Python
    syntax (numbers, trigger names, + - * /, parentheses, max/min); anything else fails the
    test rather than being guessed at."""

    def value(node: ast.expr) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return float(node.value)
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _FORMULA_OPERATORS:
            return _FORMULA_OPERATORS[type(node.op)](value(node.left), value(node.right))
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in _FORMULA_FUNCTIONS
            and not node.keywords
        ):
            return _FORMULA_FUNCTIONS[node.func.id](*(value(arg) for arg in node.args))
        raise AssertionError(f"formula {formula!r}: cannot evaluate {ast.dump(node)}")

    return value(ast.parse(formula, mode="eval").body)


def _replicas_wanted(spec: Manifest, values: list[float]) -> int:
    """The replica count KEDA's HPA would ask for, given each trigger's metric value (in
    trigger order), before min/maxReplicaCount and the HPA's 10% tolerance. Every metric here
    is an AverageValue: ceil(value / target). Without scalingModifiers the HPA takes the
    largest count over the triggers; with them, the one count of the composite metric."""
    triggers = spec["triggers"]
    modifiers = spec.get("advanced", {}).get("scalingModifiers")
    if modifiers is None:
        return max(
            math.ceil(v / float(_measure(t)[1])) for t, v in zip(triggers, values, strict=True)
        )
    named = {t["name"]: v for t, v in zip(triggers, values, strict=True)}
    return math.ceil(_evaluate(modifiers["formula"], named) / float(modifiers["target"]))


def _measure(trigger: Manifest) -> tuple[str, str]:
    """A redis-streams trigger's scaling target: (lagCount|pendingEntriesCount|..., value)."""
    ((key, value),) = [
        (k, v) for k, v in trigger["metadata"].items() if k in _REDIS_STREAMS_TARGETS
    ]
    return key, value


def _scaling_modifiers_errors(
    modifiers: Manifest, triggers: list[Manifest], where: str
) -> list[str]:
    """The formula's variables are trigger names: every trigger needs a name it can use, and
    one the formula leaves out would be silently ignored (the composite metric replaces all
    the per-trigger ones)."""
    errors = []
    names = [trigger.get("name", "") for trigger in triggers]
    for name in names:
        if not _IDENTIFIER.fullmatch(name):
            errors.append(f"{where}: trigger name {name!r} cannot be a formula variable")
    used = set(_IDENTIFIER.findall(modifiers["formula"])) - set(_FORMULA_FUNCTIONS)
    if used != set(names):
        errors.append(f"{where}: the formula uses {sorted(used)}, the triggers are {sorted(names)}")
    try:
        float(modifiers["target"])
    except ValueError:
        errors.append(f"{where}: scalingModifiers target {modifiers['target']!r} is no number")
    return errors


def _trigger_authentication_errors(kv: Any, doc: Manifest, version: str, where: str) -> list[str]:
    errors = _json_schema_errors(_TRIGGER_AUTHENTICATION_SCHEMA, doc, where)
    errors += _meta_errors(kv, doc, version, where)
    return errors


def _schema_and_meta(schema: Manifest) -> Callable[[Any, Manifest, str, str], list[str]]:
    def errors(kv: Any, doc: Manifest, version: str, where: str) -> list[str]:
        return _json_schema_errors(schema, doc, where) + _meta_errors(kv, doc, version, where)

    return errors


_CRD_VALIDATORS: dict[tuple[str, str], Callable[[Any, Manifest, str, str], list[str]]] = {
    ("keda.sh/v1alpha1", "ScaledObject"): _scaled_object_errors,
    ("keda.sh/v1alpha1", "TriggerAuthentication"): _trigger_authentication_errors,
    ("monitoring.coreos.com/v1", "PodMonitor"): _schema_and_meta(_POD_MONITOR_SCHEMA),
    ("monitoring.coreos.com/v1", "PrometheusRule"): _schema_and_meta(_PROMETHEUS_RULE_SCHEMA),
}


# --- tests ------------------------------------------------------------------------------


def test_dev_and_prod_overlays_exist() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS), f"overlays found: {OVERLAYS}"


@pytest.mark.parametrize("wanted_version", KUBERNETES_VERSIONS)
def test_every_manifest_passes_strict_schema_validation(
    overlay: Rendered, wanted_version: str
) -> None:
    kv = _validator_module()
    version = _k8s_version(kv, wanted_version)
    errors: list[str] = []
    no_schema: list[str] = []
    for doc in overlay.docs:
        where = f"{overlay.name} {doc['kind']}/{doc['metadata']['name']}"
        crd_check = _CRD_VALIDATORS.get((doc["apiVersion"], doc["kind"]))
        if crd_check is not None:
            errors += crd_check(kv, doc, version, where)
            continue
        try:
            errors += _k8s_errors(kv, doc, version, where)
        except kv.SchemaNotFoundError:
            no_schema.append(f"{doc['apiVersion']} {doc['kind']}")
    assert not no_schema, (
        f"no schema to validate {sorted(set(no_schema))}: add a validator to _CRD_VALIDATORS "
        "rather than letting them through unchecked"
    )
    assert not errors, "\n".join(errors)


def test_the_crd_schemas_reject_what_the_api_server_would(overlay: Rendered) -> None:
    """The hand-written KEDA schemas are strict: a typo or a numeric metadata value fails."""
    kv = _validator_module()
    version = _k8s_version(kv, "latest")
    scaled = overlay.named("ScaledObject", CONSUMER_COMPONENT)
    assert _scaled_object_errors(kv, scaled, version, "ok") == []
    typo = {**scaled, "spec": {**scaled["spec"], "maxReplicaCont": 3}}
    assert _scaled_object_errors(kv, typo, version, "typo")
    trigger = {**scaled["spec"]["triggers"][0]}
    trigger["metadata"] = {**trigger["metadata"], "lagCount": 10}
    numeric = {**scaled, "spec": {**scaled["spec"], "triggers": [trigger]}}
    assert _scaled_object_errors(kv, numeric, version, "numeric")
    advanced = scaled["spec"].get("advanced", {})
    if "scalingModifiers" in advanced:  # a formula naming no trigger (KEDA rejects it)
        name = scaled["spec"]["triggers"][0]["name"]
        formula = advanced["scalingModifiers"]["formula"].replace(name, f"{name}x")
        modifiers = {**advanced["scalingModifiers"], "formula": formula}
        misnamed = {
            **scaled,
            "spec": {**scaled["spec"], "advanced": {**advanced, "scalingModifiers": modifiers}},
        }
        assert _scaled_object_errors(kv, misnamed, version, "misnamed")


def test_the_monitoring_schemas_reject_typos() -> None:
    kv = _validator_module()
    version = _k8s_version(kv, "latest")
    prod = _rendered("prod")
    for kind in ("PodMonitor", "PrometheusRule"):
        doc = prod.named(kind, "widget-identity")
        check = _CRD_VALIDATORS[("monitoring.coreos.com/v1", kind)]
        assert check(kv, doc, version, "ok") == []
        typo = {**doc, "spec": {**doc["spec"], "selecter": {}}}
        assert check(kv, typo, version, "typo"), f"{kind}: a misspelt field passed"
    rules = prod.named("PrometheusRule", "widget-identity")
    group = rules["spec"]["groups"][0]
    bad_rule = {**group, "rules": [{"alert": "X", "exprr": "up == 0"}]}
    bad = {**rules, "spec": {"groups": [bad_rule]}}
    assert _CRD_VALIDATORS[("monitoring.coreos.com/v1", "PrometheusRule")](kv, bad, version, "x")


def test_renders_one_deployment_per_service_from_one_image(overlay: Rendered) -> None:
    components = {_component(d): d for d in overlay.deployments}
    assert set(components) == HTTP_COMPONENTS | {CONSUMER_COMPONENT}
    for component, deployment in components.items():
        args = _pod_spec(deployment)["containers"][0]["args"]
        expected = (
            ["consume", "history"] if component == CONSUMER_COMPONENT else ["serve", component]
        )
        assert args == expected, f"{overlay.name} {component}: args {args}"
    images = {c["image"] for w in overlay.workloads() for c in _containers(w)}
    assert len(images) == 1, f"{overlay.name}: one image for every process, got {images}"


def test_every_deployment_has_startup_liveness_and_readiness_probes(overlay: Rendered) -> None:
    port = int(overlay.config()["PORT"])
    for deployment in overlay.deployments:
        name = deployment["metadata"]["name"]
        for container in _pod_spec(deployment)["containers"]:
            ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
            assert ports.get("http") == port, f"{name}: containerPort http must equal PORT={port}"
            for probe, path in [
                ("startupProbe", "/healthz"),
                ("livenessProbe", "/healthz"),
                ("readinessProbe", "/readyz"),
            ]:
                assert probe in container, f"{overlay.name} {name}: no {probe}"
                http_get = container[probe].get("httpGet", {})
                assert http_get.get("path") == path, f"{name}: {probe} must GET {path}"
                assert http_get.get("port") in ("http", port), f"{name}: {probe} port"


def test_every_container_sets_cpu_and_memory_requests_and_limits(overlay: Rendered) -> None:
    for workload in overlay.workloads():
        for container in _containers(workload):
            where = f"{overlay.name} {workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request is not None, f"{where}: no {resource} request"
                assert limit is not None, f"{where}: no {resource} limit"
                assert _quantity(request) <= _quantity(limit), (
                    f"{where}: {resource} request > limit"
                )


def test_every_pod_runs_non_root_read_only_without_privilege_escalation(
    overlay: Rendered,
) -> None:
    for workload in overlay.workloads():
        pod = _pod_spec(workload)
        pod_ctx = pod.get("securityContext", {})
        assert pod_ctx.get("runAsNonRoot") is True, f"{workload['metadata']['name']}: pod"
        assert pod_ctx.get("runAsUser") == UID
        assert pod_ctx.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        tmp_volumes = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
        for container in _containers(workload):
            where = f"{overlay.name} {workload['metadata']['name']}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert ctx.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
            assert ctx.get("runAsUser", pod_ctx.get("runAsUser")) == UID, f"{where}: runAsUser"
            assert ctx.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem"
            assert ctx.get("allowPrivilegeEscalation") is False, f"{where}: privilege escalation"
            assert ctx.get("privileged", False) is False, f"{where}: privileged"
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), f"{where}: drop ALL"
            assert not ctx.get("capabilities", {}).get("add"), f"{where}: adds capabilities"
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert mounts.get("/tmp") in tmp_volumes, f"{where}: /tmp must be an emptyDir"


def test_termination_grace_outlasts_shutdown_timeout_and_prestop(overlay: Rendered) -> None:
    config = overlay.config()
    # SHUTDOWN_TIMEOUT runs from SIGTERM to exit: the app's optional pause before it stops
    # listening (DRAIN_DELAY, default 0) is spent out of it (shared/lifecycle.py), not on top.
    shutdown_timeout = float(config["SHUTDOWN_TIMEOUT"])
    drain_delay = float(config.get("DRAIN_DELAY", 0))
    assert shutdown_timeout >= SHUTDOWN_TIMEOUT_FLOOR
    assert drain_delay < shutdown_timeout, f"{overlay.name}: DRAIN_DELAY leaves no time to drain"
    for workload in overlay.workloads():
        pod = _pod_spec(workload)
        grace = pod.get("terminationGracePeriodSeconds", 30)
        # A preStop hook runs before SIGTERM is sent, so it does add to the budget.
        pre_stop = max(_prestop_sleep_seconds(c) for c in pod["containers"])
        budget = pre_stop + shutdown_timeout
        where = f"{overlay.name} {workload['metadata']['name']}"
        assert grace > SHUTDOWN_TIMEOUT_FLOOR, f"{where}: grace {grace} <= {SHUTDOWN_TIMEOUT_FLOOR}"
        assert grace > budget, (
            f"{where}: grace {grace} s must exceed preStop {pre_stop} s + SHUTDOWN_TIMEOUT "
            f"{shutdown_timeout} s (DRAIN_DELAY included), or the kubelet kills in-flight work"
        )


def test_http_deployments_keep_serving_while_their_endpoints_drain(overlay: Rendered) -> None:
    """Endpoint removal takes a few seconds to reach kube-proxy and the ingress controller:
    the pod must keep serving that long, through DRAIN_DELAY (chosen here: /readyz answers
    503 meanwhile) or a preStop sleep, but not both, which would only double the wait."""
    drain_delay = float(overlay.config().get("DRAIN_DELAY", 0))
    for deployment in filter(_is_http, overlay.deployments):
        for container in _pod_spec(deployment)["containers"]:
            pre_stop = _prestop_sleep_seconds(container)
            where = f"{overlay.name} {deployment['metadata']['name']}"
            assert (pre_stop > 0) != (drain_delay > 0), (
                f"{where}: preStop sleep {pre_stop} s and DRAIN_DELAY {drain_delay} s: "
                "exactly one of them should hold the pod while endpoints drain"
            )
            assert 2 <= pre_stop + drain_delay <= 15, f"{where}: drains {pre_stop + drain_delay} s"


def test_every_deployment_spreads_over_zones_and_nodes(overlay: Rendered) -> None:
    for deployment in overlay.deployments:
        constraints = _pod_spec(deployment).get("topologySpreadConstraints", [])
        keys = {c["topologyKey"] for c in constraints}
        where = f"{overlay.name} {deployment['metadata']['name']}"
        assert {"topology.kubernetes.io/zone", "kubernetes.io/hostname"} <= keys, where
        for constraint in constraints:
            selector = constraint["labelSelector"]["matchLabels"]
            assert _matches(selector, _pod_labels(deployment)), f"{where}: spreads other pods"


def test_every_deployment_has_a_pod_disruption_budget(overlay: Rendered) -> None:
    budgets = overlay.of_kind("PodDisruptionBudget")
    for deployment in overlay.deployments:
        covering = [
            b
            for b in budgets
            if _matches(b["spec"]["selector"]["matchLabels"], _pod_labels(deployment))
        ]
        where = f"{overlay.name} {deployment['metadata']['name']}"
        assert len(covering) == 1, f"{where}: {len(covering)} PodDisruptionBudgets"
        # maxUnavailable >= 1 lets a node drain proceed even at one replica.
        assert covering[0]["spec"].get("maxUnavailable", 0) >= 1, f"{where}: blocks drains"


def test_every_http_deployment_has_an_hpa_and_no_fixed_replicas(overlay: Rendered) -> None:
    hpas = overlay.of_kind("HorizontalPodAutoscaler")
    for deployment in overlay.deployments:
        name = deployment["metadata"]["name"]
        where = f"{overlay.name} {name}"
        # The autoscaler owns the count; a fixed value would be re-applied on every deploy.
        assert "replicas" not in deployment["spec"], f"{where}: sets spec.replicas"
        targeting = [h for h in hpas if h["spec"]["scaleTargetRef"]["name"] == name]
        if not _is_http(deployment):
            assert not targeting, f"{where}: KEDA owns this one; an HPA would fight it"
            continue
        assert len(targeting) == 1, f"{where}: {len(targeting)} HPAs"
        hpa = targeting[0]
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"], where
        assert hpa["spec"].get("metrics"), f"{where}: HPA without metrics"


def _partition_streams(config: dict[str, str]) -> list[str]:
    """The event stream's partitions as the app names them (STREAM_PREFIX, STREAM_PARTITIONS):
    one stream <prefix>events, or <prefix>events:{0} .. {N-1} (braces: cluster hash tags)."""
    prefix, partitions = config["STREAM_PREFIX"], int(config["STREAM_PARTITIONS"])
    if partitions == 1:
        return [f"{prefix}events"]
    return [f"{prefix}events:{{{p}}}" for p in range(partitions)]


def test_consumer_is_scaled_by_keda_on_every_partition_of_its_group(overlay: Rendered) -> None:
    """KEDA watches the group on every partition stream the app uses, with the scaler that
    fits REDIS_CLUSTER, adds the partitions' backlogs up, and never asks for more consumers
    than partitions (each partition has one owner at a time; the rest would stand by)."""
    config = overlay.config()
    streams = _partition_streams(config)
    scaler = "redis-cluster-streams" if config["REDIS_CLUSTER"] == "true" else "redis-streams"
    spec = overlay.named("ScaledObject", CONSUMER_COMPONENT)["spec"]
    assert spec["scaleTargetRef"]["name"] == CONSUMER_COMPONENT
    assert spec["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= len(streams), (
        f"{overlay.name}: replicas {spec['minReplicaCount']}..{spec['maxReplicaCount']} "
        f"for {len(streams)} partition(s)"
    )
    auths = {a["metadata"]["name"] for a in overlay.of_kind("TriggerAuthentication")}
    watched: dict[str, list[str]] = {}  # measure -> the streams it is taken on
    for trigger in spec["triggers"]:
        meta = trigger["metadata"]
        where = f"{overlay.name} trigger {trigger.get('name')}"
        assert trigger["type"] == scaler, f"{where}: {trigger['type']}, REDIS_CLUSTER says {scaler}"
        assert meta["stream"] in streams, f"{where}: watches {meta['stream']}, not one of {streams}"
        assert meta["consumerGroup"] == CONSUMER_GROUP
        assert trigger["authenticationRef"]["name"] in auths
        watched.setdefault(_measure(trigger)[0], []).append(meta["stream"])
    assert "lagCount" in watched, f"{overlay.name}: scale on the group's backlog"
    for measure, on in watched.items():
        assert sorted(on) == sorted(streams), f"{overlay.name}: {measure} on {on}, not {streams}"
    # Summed: a replica's worth of backlog on every partition asks for a replica per
    # partition (judging the busiest partition alone would ask for one), and none idle.
    for measure in watched:
        values = [float(t["metadata"].get(measure, 0)) for t in spec["triggers"]]
        wanted = _replicas_wanted(spec, values)
        assert wanted == len(streams), f"{overlay.name}: {measure} at target asks for {wanted}"
    assert _replicas_wanted(spec, [0.0] * len(spec["triggers"])) == 0
    for auth in overlay.of_kind("TriggerAuthentication"):
        for ref in auth["spec"].get("secretTargetRef", []):
            assert ref["parameter"] in _REDIS_STREAMS_AUTH_PARAMS


# Settings every process must agree on, from the one ConfigMap and never per container: a
# consumer reading other partitions than the relay writes would silently miss events.
SHARED_SETTINGS = {"REDIS_ADDRESS", "REDIS_CLUSTER", "STREAM_PREFIX", "STREAM_PARTITIONS"}


def test_settings_every_process_shares_are_written_once(overlay: Rendered) -> None:
    config = overlay.config()
    missing = SHARED_SETTINGS - set(config)
    assert not missing, f"{overlay.name}: the ConfigMap lacks {sorted(missing)}"
    assert int(config["STREAM_PARTITIONS"]) >= 1
    assert config["REDIS_CLUSTER"] in {"true", "false"}
    (config_map,) = [
        d["metadata"]["name"]
        for d in overlay.of_kind("ConfigMap")
        if d["metadata"]["name"].startswith("widget-identity-config")
    ]
    for workload in overlay.workloads():
        for container in _containers(workload):
            where = f"{overlay.name} {workload['metadata']['name']}/{container['name']}"
            sources = [s["configMapRef"]["name"] for s in container.get("envFrom", [])]
            assert sources == [config_map], f"{where}: reads its settings from {sources}"
            overridden = {e["name"] for e in container.get("env", [])} & SHARED_SETTINGS
            assert not overridden, f"{where}: sets {sorted(overridden)} itself"


def test_network_policies_start_from_a_default_deny(overlay: Rendered) -> None:
    deny_all = [
        p
        for p in overlay.of_kind("NetworkPolicy")
        if p["spec"].get("podSelector") == {}
        and {"Ingress", "Egress"} <= set(p["spec"].get("policyTypes", []))
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert deny_all, f"{overlay.name}: no default-deny NetworkPolicy for ingress and egress"


def test_egress_is_limited_to_postgres_redis_and_dns(overlay: Rendered) -> None:
    allowed: set[tuple[str, int]] = set()
    for policy in overlay.of_kind("NetworkPolicy"):
        for rule in policy["spec"].get("egress", []):
            where = f"{overlay.name} NetworkPolicy/{policy['metadata']['name']}"
            assert rule.get("ports"), f"{where}: an egress rule without ports opens every port"
            for port in rule["ports"]:
                key = (port.get("protocol", "TCP"), port["port"])
                assert key in ALLOWED_EGRESS, f"{where}: egress to {key}"
                allowed.add(key)
                if port["port"] == 53:
                    assert rule.get("to"), f"{where}: DNS egress must name the cluster DNS"
    assert {("TCP", 5432), ("TCP", 6379), ("UDP", 53)} <= allowed, f"{overlay.name}: {allowed}"


def test_only_public_services_admit_the_ingress_controller(overlay: Rendered) -> None:
    pods = {_component(d): _pod_labels(d) for d in overlay.deployments}
    reachable: dict[str, set[str]] = {c: set() for c in pods}
    for policy in overlay.of_kind("NetworkPolicy"):
        selector = policy["spec"]["podSelector"]
        for component, labels in pods.items():
            if not _selects(selector, labels):
                continue
            for rule in policy["spec"].get("ingress", []):
                for peer in rule.get("from", []):
                    ns = peer.get("namespaceSelector", {}).get("matchLabels", {})
                    reachable[component].add(ns.get("kubernetes.io/metadata.name", "<own>"))
    for component in ("token-issuance", "session-resolution"):
        assert "ingress-nginx" in reachable[component], f"{overlay.name}: {component} unreachable"
    for component in ("history", CONSUMER_COMPONENT):
        assert "ingress-nginx" not in reachable[component], f"{overlay.name}: {component} public"
    assert "<own>" in reachable["history"], f"{overlay.name}: history unreachable in-namespace"


def _selects(selector: Manifest, labels: dict[str, str]) -> bool:
    if not selector:
        return True
    if not all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present = expr["key"] in labels
        value = labels.get(expr["key"])
        ok = {
            "In": present and value in expr.get("values", []),
            "NotIn": not present or value not in expr.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expr["operator"]]
        if not ok:
            return False
    return True


def test_ingress_exposes_only_the_public_paths(overlay: Rendered) -> None:
    ingresses = overlay.of_kind("Ingress")
    assert ingresses, f"{overlay.name}: no Ingress"
    services = {s["metadata"]["name"]: s for s in overlay.of_kind("Service")}
    routed: dict[str, str] = {}
    for ingress in ingresses:
        assert "defaultBackend" not in ingress["spec"], "a default backend exposes everything"
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                value = path["path"]
                assert not value.startswith(INTERNAL_PREFIXES), f"{overlay.name}: exposes {value}"
                assert value in PUBLIC_ROUTES, f"{overlay.name}: unexpected public path {value}"
                backend = path["backend"]["service"]
                routed[value] = backend["name"]
                service = services.get(backend["name"])
                assert service is not None, f"{value} -> missing Service {backend['name']}"
                port_names = {p["name"] for p in service["spec"]["ports"]}
                assert backend["port"].get("name") in port_names
    assert routed == PUBLIC_ROUTES, f"{overlay.name}: routes {routed}"


def test_services_select_exactly_their_deployment(overlay: Rendered) -> None:
    for service in overlay.of_kind("Service"):
        selector = service["spec"]["selector"]
        chosen = [d for d in overlay.deployments if _matches(selector, _pod_labels(d))]
        assert len(chosen) == 1, f"{overlay.name} Service/{service['metadata']['name']}"
        container = _pod_spec(chosen[0])["containers"][0]
        port_names = {p["name"] for p in container["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: targetPort"
    with_service = {
        _component(d)
        for d in overlay.deployments
        for s in overlay.of_kind("Service")
        if _matches(s["spec"]["selector"], _pod_labels(d))
    }
    assert with_service == HTTP_COMPONENTS


def test_migration_job_runs_migrate_before_the_rollout(overlay: Rendered) -> None:
    jobs = [
        j
        for j in overlay.of_kind("Job")
        if _pod_spec(j)["containers"][0].get("args") == ["migrate"]
    ]
    assert len(jobs) == 1, f"{overlay.name}: expected one migrate Job, found {len(jobs)}"
    job = jobs[0]
    assert _pod_spec(job)["restartPolicy"] == "Never"
    assert job["spec"].get("backoffLimit") is not None
    annotations = job["metadata"].get("annotations", {})
    assert annotations.get("argocd.argoproj.io/hook") in {"PreSync", "Sync"}
    job_wave = int(annotations.get("argocd.argoproj.io/sync-wave", "0"))
    for doc in overlay.deployments + overlay.of_kind("ScaledObject"):
        wave = int(doc["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))
        assert wave > job_wave, f"{doc['metadata']['name']} (wave {wave}) rolls out before migrate"


def test_secrets_reach_containers_only_by_reference(overlay: Rendered) -> None:
    for workload in overlay.workloads():
        where = f"{overlay.name} {workload['metadata']['name']}"
        for name, env in _env_refs(workload):
            if name in SECRET_VARS:
                assert "value" not in env, f"{where}: {name} as a literal value"
                assert env["valueFrom"]["secretKeyRef"]["name"].startswith(SECRET_NAME)
            if name == "REDIS_URL":
                # Built by the kubelet from references only: no credentials in the manifest.
                assert REDIS_URL_TEMPLATE.match(env.get("value", "")), f"{where}: REDIS_URL {env}"
        for volume in _pod_spec(workload).get("volumes", []):
            secret = volume.get("secret")
            if secret is not None:
                assert secret["secretName"].startswith(SECRET_NAME), f"{where}: {volume}"
                assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{where}: world-readable"
                for container in _containers(workload):
                    for mount in container.get("volumeMounts", []):
                        if mount["name"] == volume["name"]:
                            assert mount.get("readOnly") is True, f"{where}: secrets writable"
                            assert mount["mountPath"] == SECRET_MOUNT, f"{where}: {mount}"
    leaked = SECRET_VARS & set(overlay.config())
    assert not leaked, f"{overlay.name}: secrets in the ConfigMap: {leaked}"


def test_base_contains_no_secret_values() -> None:
    base = Rendered("base", render(BASE))
    assert not base.of_kind("Secret"), "base must not carry a Secret"
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    assert "secretGenerator" not in kustomization
    assert not SECRET_VARS & set(base.config()), "secret variables in the base ConfigMap"
    for workload in base.workloads():
        for name, env in _env_refs(workload):
            assert name not in SECRET_VARS or "value" not in env, f"literal {name} in base"
    # user:password@ in any URL, unless the password is a $(VAR) reference the kubelet expands
    credentials = re.compile(r"://[^/\s:@]*:(?!\$\()[^@\s]+@")
    for path in sorted(BASE.rglob("*")):
        if path.is_file():
            assert not credentials.search(path.read_text()), f"{path}: credentials in a URL"


def test_secret_references_resolve(overlay: Rendered) -> None:
    secrets = {s["metadata"]["name"]: s for s in overlay.of_kind("Secret")}
    refs: list[tuple[str, str]] = []
    for workload in overlay.workloads():
        for _, env in _env_refs(workload):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.append((ref["name"], ref["key"]))
        for volume in _pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                refs += [(name, item["key"]) for item in volume["secret"].get("items", [])]
    for auth in overlay.of_kind("TriggerAuthentication"):
        refs += [(r["name"], r["key"]) for r in auth["spec"].get("secretTargetRef", [])]
    assert refs
    for name, key in refs:
        if secrets:  # generated in this overlay: every reference must hit it
            assert name in secrets, f"{overlay.name}: reference to missing Secret {name}"
            assert key in secrets[name].get("data", {}), f"{overlay.name}: {name} has no {key}"
        else:  # created out of band under the documented name
            assert name == SECRET_NAME, f"{overlay.name}: unknown external Secret {name}"


def test_session_state_reaches_postgres_directly(overlay: Rendered) -> None:
    """DATABASE_URL may name a transaction pooler (PgBouncer); what needs one backend for a
    whole session (the relay's advisory-lock leadership and LISTEN in every process, the
    migrations' lock) reads DATABASE_DIRECT_URL, and the migrate Job uses nothing else."""
    for workload in overlay.workloads():
        where = f"{overlay.name} {workload['metadata']['name']}"
        keys = {
            name: env["valueFrom"]["secretKeyRef"]["key"]
            for name, env in _env_refs(workload)
            if name.startswith("DATABASE_")
        }
        assert keys.get("DATABASE_DIRECT_URL") == "DATABASE_DIRECT_URL", f"{where}: {keys}"
        if workload["kind"] == "Job":
            assert keys["DATABASE_URL"] == "DATABASE_DIRECT_URL", f"{where}: migrates via a pooler"
        else:
            assert keys["DATABASE_URL"] == "DATABASE_URL", f"{where}: {keys}"


def test_only_dev_generates_a_secret_and_its_values_are_obviously_fake() -> None:
    for name in OVERLAYS:
        if name != "dev":
            assert not _rendered(name).of_kind("Secret"), f"{name} must not carry a Secret"
    secrets = _rendered("dev").of_kind("Secret")
    assert len(secrets) == 1
    data = {k: base64.b64decode(v).decode() for k, v in secrets[0]["data"].items()}
    assert set(data) == SECRET_VARS
    for key, value in data.items():
        shown = value if key != "KEY_ENCRYPTION_KEY" else base64.urlsafe_b64decode(value).decode()
        assert "dev" in shown.lower(), f"dev {key} does not look fake: {shown!r}"


def test_keda_reads_the_redis_address_and_password_the_pods_use(overlay: Rendered) -> None:
    """The Redis address and password are written once: the consumer's REDIS_URL is built
    from REDIS_ADDRESS (ConfigMap) and REDIS_PASSWORD (Secret), and the KEDA triggers read
    that same variable and that same Secret key, so the two cannot drift apart."""
    address = overlay.config()["REDIS_ADDRESS"]
    host, _, port = address.rpartition(":")
    assert host and port.isdigit(), f"{overlay.name}: REDIS_ADDRESS {address!r} is not host:port"
    assert not host.endswith(".invalid"), f"{overlay.name}: REDIS_ADDRESS left at the placeholder"
    consumer = overlay.named("Deployment", CONSUMER_COMPONENT)
    env = dict(_env_refs(consumer))
    scheme = REDIS_URL_TEMPLATE.match(env["REDIS_URL"]["value"])
    assert scheme, f"{overlay.name}: the consumer's REDIS_URL is not built from the two"
    pod_password = env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
    auths = {a["metadata"]["name"]: a for a in overlay.of_kind("TriggerAuthentication")}
    for trigger in overlay.named("ScaledObject", CONSUMER_COMPONENT)["spec"]["triggers"]:
        meta = trigger["metadata"]
        from_env = _REDIS_ADDRESS_FROM_ENV[trigger["type"]]
        assert meta.get(from_env) == "REDIS_ADDRESS", f"{overlay.name}: {meta}"
        second = (_REDIS_ADDRESS_KEYS[trigger["type"]] - {from_env}) & set(meta)
        assert not second, f"{overlay.name}: a second address in {sorted(second)}"
        # TLS is the one Redis setting still written twice (the URL scheme and the trigger).
        tls = meta.get("enableTLS", "false") == "true"
        assert tls == (scheme[1] == "rediss"), f"{overlay.name}: REDIS_URL {scheme[1]} vs {meta}"
        refs = auths[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
        password = [r for r in refs if r["parameter"] == "password"]
        assert len(password) == 1, f"{overlay.name}: KEDA has no Redis password"
        assert (password[0]["name"], password[0]["key"]) == (
            pod_password["name"],
            pod_password["key"],
        ), f"{overlay.name}: KEDA reads another password than the pods"


def test_every_container_states_its_image_pull_policy(overlay: Rendered) -> None:
    expected = "Always" if overlay.name == "dev" else "IfNotPresent"
    for workload in overlay.workloads():
        for container in _containers(workload):
            policy = container.get("imagePullPolicy")
            assert policy == expected, f"{overlay.name} {workload['metadata']['name']}: {policy}"


def test_dev_runs_one_replica_of_everything() -> None:
    dev = _rendered("dev")
    for hpa in dev.of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] == hpa["spec"]["maxReplicas"] == 1
    scaled = dev.named("ScaledObject", CONSUMER_COMPONENT)["spec"]
    assert scaled["minReplicaCount"] == scaled["maxReplicaCount"] == 1


def test_prod_scales_out_with_bigger_limits_and_a_pinned_image() -> None:
    dev, prod = _rendered("dev"), _rendered("prod")
    for hpa in prod.of_kind("HorizontalPodAutoscaler"):
        assert hpa["spec"]["minReplicas"] >= 2, f"prod {hpa['metadata']['name']}: one replica"
    assert prod.named("ScaledObject", CONSUMER_COMPONENT)["spec"]["minReplicaCount"] >= 2
    # Redis Cluster and a partitioned stream (a single stream would sit on one shard).
    config = prod.config()
    assert config["REDIS_CLUSTER"] == "true" and int(config["STREAM_PARTITIONS"]) > 1, config
    dev_limits = {
        d["metadata"]["name"]: _pod_spec(d)["containers"][0]["resources"]["limits"]
        for d in dev.deployments
    }
    for deployment in prod.deployments:
        name = deployment["metadata"]["name"]
        limits = _pod_spec(deployment)["containers"][0]["resources"]["limits"]
        for resource in ("cpu", "memory"):
            assert _quantity(limits[resource]) > _quantity(dev_limits[name][resource]), (
                f"prod {name}: {resource} limit not above dev's"
            )
    for workload in prod.workloads():
        for container in _containers(workload):
            image = container["image"]
            # The release tag for people, the digest for the nodes (the pipeline sets it).
            pinned = re.search(r":v?\d+\.\d+\.\d+[^/@]*@sha256:[0-9a-f]{64}$", image)
            assert pinned, f"prod {workload['metadata']['name']}: image {image} is not pinned"
