"""The alert rules and the Grafana dashboard in deploy/monitoring hold up.

- `promtool check rules` accepts the PrometheusRule's groups, and `promtool test rules` runs
  the unit tests in deploy/monitoring/tests/ (synthetic series -> which alerts fire, when);
- every metric the rules and the dashboard read is one the services export (collected from
  prometheus_client's registry after importing every module of shared/ and services/), a
  recording rule defined beside them, or one of the few series Prometheus or
  kube-state-metrics provide; so a renamed metric, label or label value fails here;
- the dashboard shows what an operator needs and the rules alert on what matters.

Without promtool the promtool tests skip locally and fail in CI (CI=true).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser as promql
import pytest
import yaml

from shared.config import Settings
from tests.support.manifests import MONITORING, ROOT
from tests.support.tools import promtool

RULES = MONITORING / "prometheusrule.yaml"
RULE_TESTS = MONITORING / "tests" / "alerts.test.yaml"
DASHBOARD = MONITORING / "dashboard.json"

# Series read from elsewhere than the services, and who provides them.
EXTERNAL_METRICS = {
    "up": "Prometheus itself, one per scrape target",
    "kube_deployment_status_replicas_ready": "kube-state-metrics",
    "kube_deployment_spec_replicas": "kube-state-metrics",
}
EXTERNAL_LABELS = {"deployment"}  # kube-state-metrics
# Added to every scraped series by Prometheus and the PodMonitor's relabelling.
TARGET_LABELS = {"namespace", "pod", "component", "job", "instance", "container", "endpoint"}


# --- what the services export -----------------------------------------------------------

_COLLECT = textwrap.dedent(
    """
    import importlib, json, pkgutil
    import services, shared
    from prometheus_client import REGISTRY
    from prometheus_client.utils import floatToGoString
    from services.history.consumers import GROUP
    from shared.bus.applier import BATCH_SPLIT
    from shared.bus.messages import Outcome

    for package in (shared, services):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    metrics = {}
    # Sample name -> collector is the registry's own index; label names and bucket bounds
    # are attributes prometheus_client has kept for years (no public accessor exists).
    for name, collector in REGISTRY._names_to_collectors.items():
        # A counter or histogram is scraped as name_total, name_bucket...: never bare.
        kind = getattr(collector, "_type", "")
        if kind in {"counter", "histogram", "summary"} and name == collector._name:
            continue
        labels = list(getattr(collector, "_labelnames", ()))
        bounds = [floatToGoString(b) for b in getattr(collector, "_upper_bounds", ())]
        if name.endswith("_bucket"):
            labels.append("le")
        metrics[name] = {"labels": labels, "buckets": bounds}
    values = {
        "outcome": [o.value for o in Outcome] + [BATCH_SPLIT],
        "group": [GROUP],
    }
    print(json.dumps({"metrics": metrics, "values": values}))
    """
)


@dataclass(frozen=True)
class Exported:
    metrics: dict[str, dict[str, list[str]]]
    values: dict[str, list[str]]  # label -> every value the code can give it

    @property
    def labels(self) -> set[str]:
        return {label for m in self.metrics.values() for label in m["labels"]}


@functools.cache
def exported() -> Exported:
    # A fresh interpreter: only what importing the code registers, nothing a test added.
    proc = subprocess.run(
        [sys.executable, "-c", _COLLECT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    return Exported(data["metrics"], data["values"])


# --- what the rules and the dashboard read ----------------------------------------------


def _rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES.read_text())["spec"]["groups"]
    return groups


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _rule_groups() for rule in group["rules"]]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query, Grafana's variables made concrete."""
    queries = [
        (panel["title"], target["expr"])
        for panel in _panels(_dashboard()["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in _dashboard()["templating"]["list"]:
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else ""
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", text)
        if match:  # the variable's values come from this series' label
            queries.append((f"${variable['name']}", f"count by ({match[2]}) ({match[1]})"))
    return queries


def _as_promql(grafana_expr: str) -> str:
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", grafana_expr)
    return re.sub(r"\$\{?(\w+)\}?", r"\1", expr)  # "$namespace" -> a literal value


@dataclass
class Reads:
    selectors: list[promql.VectorSelector] = field(default_factory=list)
    grouping: set[str] = field(default_factory=set)
    numbers: list[float] = field(default_factory=list)

    def metric_names(self) -> set[str]:
        return {s.name for s in self.selectors if s.name}


def _reads(expr: str) -> Reads:
    reads = Reads()

    def visit(node: Any) -> None:
        if isinstance(node, promql.VectorSelector):
            reads.selectors.append(node)
        elif isinstance(node, promql.NumberLiteral):
            reads.numbers.append(node.val)
        modifier = getattr(node, "modifier", None)
        if isinstance(modifier, promql.AggModifier):
            reads.grouping |= set(modifier.labels)
        elif isinstance(modifier, promql.BinModifier):
            if modifier.matching is not None:
                reads.grouping |= set(modifier.matching.labels)
            reads.grouping |= set(modifier.group_labels or ())

    promql.walk(promql.parse(expr), visit)
    return reads


def _matcher_values(matcher: Any) -> list[str] | None:
    """The literal values a matcher stands for: the value, or a|b|c; None for real regexes."""
    value = str(matcher.value)
    if matcher.op in (promql.MatchOp.Equal, promql.MatchOp.NotEqual):
        return [value]
    if re.fullmatch(r"[\w.]+(\|[\w.]+)*", value):
        return value.split("|")
    return None


def _problems(expr: str, recorded: set[str]) -> list[str]:
    """Everything in this query that names a metric, label or value nobody exports."""
    known = exported()
    reads = _reads(expr)
    problems: list[str] = []
    for selector in reads.selectors:
        name = selector.name
        if name in recorded or name in EXTERNAL_METRICS:
            continue
        if name not in known.metrics:
            problems.append(f"{name}: no such metric is exported")
            continue
        metric = known.metrics[name]
        for matcher in selector.matchers.matchers:
            label = matcher.name
            if label in TARGET_LABELS:
                continue
            if label not in metric["labels"]:
                problems.append(f"{name}: has no label {label!r} (it has {metric['labels']})")
                continue
            values = _matcher_values(matcher)
            allowed = metric["buckets"] if label == "le" else known.values.get(label)
            if values is not None and allowed is not None:
                for value in set(values) - set(allowed):
                    problems.append(f"{name}: {label}={value!r} never occurs (only {allowed})")
    everything = known.labels | TARGET_LABELS | EXTERNAL_LABELS | {"le"}
    for label in sorted(reads.grouping - everything):
        problems.append(f"groups by {label!r}, which no series carries")
    return problems


def _all_queries() -> list[tuple[str, str]]:
    rules = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in _rules()]
    return rules + [(title, _as_promql(expr)) for title, expr in _dashboard_queries()]


# --- tests ------------------------------------------------------------------------------


def test_the_exported_metrics_are_found() -> None:
    """The collection itself works: the well-known metrics are there, with their labels."""
    metrics = exported().metrics
    assert metrics["wi_http_requests_total"]["labels"] == ["method", "route", "status"]
    assert "0.25" in metrics["wi_http_request_duration_seconds_bucket"]["buckets"]
    assert "dead_lettered" in exported().values["outcome"]


@pytest.mark.parametrize(("where", "expr"), _all_queries(), ids=[w for w, _ in _all_queries()])
def test_every_query_reads_only_exported_metrics_labels_and_values(where: str, expr: str) -> None:
    problems = _problems(expr, _recorded())
    assert not problems, f"{where}: {expr}\n" + "\n".join(problems)


def test_the_cross_check_catches_renames() -> None:
    recorded = _recorded()
    assert _problems("rate(wi_http_request_total[5m])", recorded)  # a renamed counter
    assert _problems("rate(wi_http_requests[5m])", recorded)  # never scraped without _total
    assert _problems('rate(wi_events_consumed_total{outcome="dead"}[5m])', recorded)
    assert _problems('wi_http_request_duration_seconds_bucket{le="0.3"}', recorded)
    assert _problems('wi_outbox_backlog{route="/x"}', recorded)
    assert _problems("sum by (tenant) (wi_outbox_backlog)", recorded)
    assert _problems('wi_http_requests_total{status=~"5.."}', recorded) == []


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": _rule_groups()}))
    proc = subprocess.run(
        [promtool(), "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in proc.stdout


def test_the_alerts_fire_as_their_unit_tests_expect(tmp_path: Path) -> None:
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": _rule_groups()}))
    proc = subprocess.run(
        [promtool(), "test", "rules", RULE_TESTS.name],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert len(tested) >= 3, tested


def test_the_rules_alert_on_what_an_operator_must_know() -> None:
    by_alert = {rule["alert"]: rule for rule in _rules() if "alert" in rule}
    sources = {rule["record"]: _reads(rule["expr"]) for rule in _rules() if "record" in rule}

    def reads(alert: str) -> set[str]:
        names = _reads(by_alert[alert]["expr"]).metric_names()
        for name in names & set(sources):
            names |= sources[name].metric_names()
        return names

    def matchers(alert: str) -> set[tuple[str, str]]:
        return {
            (m.name, m.value)
            for s in _reads(by_alert[alert]["expr"]).selectors
            for m in s.matchers.matchers
        }

    assert "wi_event_lag_seconds_bucket" in reads("WidgetIdentityEventLagHigh")
    assert "wi_events_consumed_total" in reads("WidgetIdentityConsumerStalled")
    assert ("outcome", "dead_lettered") in matchers("WidgetIdentityDeadLettersGrowing")
    assert "wi_outbox_backlog" in reads("WidgetIdentityOutboxNotDraining")
    assert "wi_http_requests_total" in reads("WidgetIdentityHigh5xxRatio")
    for burn in (
        "WidgetIdentityLatencyBudgetBurningFast",
        "WidgetIdentityLatencyBudgetBurningSlow",
    ):
        assert "wi_http_request_duration_seconds_bucket" in reads(burn)
        # Multiwindow: each condition pairs a long and a short window of the same ratio.
        windows = set(re.findall(r"ratio_rate(\w+)", by_alert[burn]["expr"]))
        assert len(windows) == 4, f"{burn}: windows {windows}"
    for alert, rule in by_alert.items():
        assert rule["labels"]["severity"] in {"critical", "warning"}, alert
        assert {"summary", "description"} <= set(rule["annotations"]), alert


def test_the_outbox_alert_threshold_is_the_relay_batch_size() -> None:
    """wi_outbox_backlog is the size of the relay's last batch: 'always full' is the batch."""
    batch = {f.name: f.default for f in dataclasses.fields(Settings)}["relay_batch"]
    rule = next(r for r in _rules() if r.get("alert") == "WidgetIdentityOutboxBacklogHigh")
    assert _reads(rule["expr"]).numbers == [batch], (rule["expr"], batch)


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    dashboard = _dashboard()
    panels = [p for p in _panels(dashboard["panels"]) if p["type"] != "row"]
    ids = [p["id"] for p in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert dashboard["uid"], "a fixed uid keeps links stable across imports"
    read: set[str] = set()
    dead_letters = False
    for panel in panels:
        assert panel.get("targets"), f"{panel['title']}: no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            reads = _reads(_as_promql(target["expr"]))
            read |= reads.metric_names()
            for selector in reads.selectors:
                matchers = {(m.name, m.value) for m in selector.matchers.matchers}
                # One namespace at a time: dev and prod never mix on a panel.
                assert ("namespace", "namespace") in matchers, f"{panel['title']}: {selector}"
                dead_letters |= ("outcome", "dead_lettered") in matchers
    needed = {
        "wi_http_requests_total": "request rate and errors",
        "wi_http_request_duration_seconds_bucket": "latency percentiles per route",
        "wi_event_lag_seconds_bucket": "event lag",
        "wi_events_consumed_total": "consumer throughput",
        "wi_events_published_total": "events published",
        "wi_outbox_backlog": "outbox backlog",
        "kube_deployment_status_replicas_ready": "readiness",
    }
    missing = {name: why for name, why in needed.items() if name not in read}
    assert not missing, f"the dashboard does not show {missing}"
    assert dead_letters, "the dashboard does not show dead letters"
