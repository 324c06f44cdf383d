"""packaging/monitoring/: the alert rules pass `promtool check rules` and their unit tests, every alert has
its runbook section, the generated dashboard and PrometheusRule match their sources, the PodMonitor finds
the pods `codi2 provision` makes, every PromQL expression names only metrics a running daemon exports, and
every log event, `/status` field and gap cause the runbook quotes is one the code has."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path
from types import ModuleType
from typing import Any

import promql_parser
import pytest
import yaml
from conftest import DaemonProcess, write_config
from prometheus_client.parser import text_string_to_metric_families

from codi2.cli.config_reference import tables
from codi2.metrics import DROP_REASONS
from codi2.provisioning.render import render
from codi2.provisioning.spec import WorkspaceSpec
from codi2.trail.events import Event

REPO = Path(__file__).resolve().parent.parent
CODE = REPO / "codi2"
MONITORING = REPO / "packaging" / "monitoring"
RULES = MONITORING / "codi2.rules.yml"
RULE_TESTS = MONITORING / "codi2.rules.test.yml"
RUNBOOK = REPO / "docs" / "runbook.md"
IDENTITY = ("tenant", "user", "pod")

# Series Prometheus makes itself rather than scraping them.
MADE_BY_PROMETHEUS = {"up"}
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_INTERVALS = {"$__rate_interval": "5m", "$__range": "6h"}
# The samples of a family, which /metrics lists by name even before a labelled family has a sample.
SAMPLE_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
# What the runbook quotes in backticks: a snake_case name (a log event, a metric, possibly with its label in
# braces, a key, a label value), and a dotted `/status` field such as `journal.state`.
QUOTED_NAME = re.compile(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)(?:\{[a-z_]*\})?`")
QUOTED_FIELD = re.compile(r"`([a-z][a-z_]*(?:\.[a-z_]+)+)`")
# Names the runbook quotes that belong to other programs: Prometheus' scrape configuration, sysctls.
NOT_OURS = {"kubernetes_sd_configs", "fs.inotify.max_queued_events", "fs.inotify.max_user_watches"}
LOG_LEVELS = {"debug", "info", "warning", "error", "exception", "critical"}


def _promtool() -> str:
    found = shutil.which(
        "promtool", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )
    if found is None:
        pytest.skip(
            "promtool not found on the PATH or in .venv/bin: `make test` extracts it from Debian's prometheus "
            "package where apt and the network are there (tools/get-promtool)"
        )
    return found


def _alerts() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("codi2_monitoring_generate", MONITORING / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _expressions() -> dict[str, str]:
    """Every PromQL expression that ships, by where it is: the rules, the dashboard's panels and variables."""
    found = {f"rule {rule['alert']}": rule["expr"] for rule in _alerts()}
    dashboard = json.loads((MONITORING / "codi2-dashboard.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found[f"panel {panel['title']!r} {target['refId']}"] = target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.+), \w+\)", variable["query"])
            assert selector, variable["query"]
            found[f"variable {variable['name']}"] = selector.group(1)
    return found


def _code() -> list[ast.AST]:
    return [ast.parse(path.read_text(), str(path)) for path in sorted(CODE.rglob("*.py"))]


def _log_events() -> set[str]:
    """The events codi2 logs: the first argument of every `log.<level>("name", ...)` in codi2/."""
    return {
        node.args[0].value
        for tree in _code()
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "log"
        and node.func.attr in LOG_LEVELS
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    }


def _gap_causes() -> set[str]:
    """The causes a `gap` event can name: `note_gap("cause", ...)`, the event factory's `gap("cause", ...)`
    and `_gap_reasons["cause"]` in codi2/."""
    causes = set()
    for tree in _code():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("note_gap", "gap") and node.args:
                cause = node.args[0]
            elif isinstance(node, ast.Subscript) and getattr(node.value, "attr", None) == "_gap_reasons":
                cause = node.slice
            else:
                continue
            if isinstance(cause, ast.Constant) and isinstance(cause.value, str):
                causes.add(cause.value)
    return causes


def _runbook_section(title: str) -> str:
    sections = re.split(r"^## ", RUNBOOK.read_text(), flags=re.MULTILINE)[1:]
    (section,) = [s for s in sections if s.split("\n", 1)[0] == title]
    return section


def _keys(tree: Any) -> set[str]:
    """Every key of a JSON document, at any depth."""
    if not isinstance(tree, dict):
        return set()
    return set(tree) | {key for value in tree.values() for key in _keys(value)}


def _metric_names(expr: str) -> set[str]:
    for variable, value in GRAFANA_INTERVALS.items():
        expr = expr.replace(variable, value)
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"a selector without a metric name: {expr}"
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


# promtool -------------------------------------------------------------------------------------------


def test_promtool_checks_the_rules() -> None:
    result = subprocess.run([_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alerts())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = subprocess.run(
        [_promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, cwd=MONITORING, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_unit_tested_firing_with_its_identity_and_not_firing() -> None:
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    evals = [e for test in tests for e in test["alert_rule_test"]]
    for alert in _alerts():
        mine = [e for e in evals if e["alertname"] == alert["alert"]]
        fired = [a for e in mine for a in e["exp_alerts"]]
        assert fired, f"{alert['alert']}: no test where it fires"
        assert all(set(IDENTITY) <= set(a["exp_labels"]) for a in fired), alert["alert"]
        assert any(not e["exp_alerts"] for e in mine), f"{alert['alert']}: no test where it must not fire"
    healthy = tests[-1]["alert_rule_test"]  # the healthy daemon, last, fires none of them
    assert sorted(e["alertname"] for e in healthy) == sorted(a["alert"] for a in _alerts())
    assert not any(e["exp_alerts"] for e in healthy)


# Rules, annotations, runbook --------------------------------------------------------------------------


def test_every_alert_has_a_severity_a_summary_naming_its_workspace_and_a_runbook_section() -> None:
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    }
    for alert in _alerts():
        name, annotations = alert["alert"], alert["annotations"]
        assert alert["labels"]["severity"] in ("critical", "warning"), name
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        for label in IDENTITY:
            assert f"$labels.{label}" in annotations["summary"], (name, label)
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "$DOCS_URL/runbook.md" and anchor == name.lower() and anchor in anchors, name


def test_the_runbook_says_for_each_alert_what_it_means_why_how_to_confirm_and_what_to_do() -> None:
    sections = re.split(r"^## ", RUNBOOK.read_text(), flags=re.MULTILINE)[1:]
    by_title = {section.split("\n", 1)[0]: section for section in sections}
    alerts = {alert["alert"] for alert in _alerts()}
    assert alerts <= set(by_title)
    assert set(by_title) - alerts == {"Labels: which workspace an alert is about", "Looking at one daemon"}
    for name in alerts:
        parts = re.split(r"\*\*(Means|Likely causes|Confirm|Do)\.\*\*", by_title[name])[1:]
        paragraphs = dict(zip(parts[::2], parts[1::2], strict=True))
        assert list(paragraphs) == ["Means", "Likely causes", "Confirm", "Do"], name
        assert "`/status`" in paragraphs["Confirm"] and "logs" in paragraphs["Confirm"], name


def test_the_gap_causes_the_runbook_explains_are_those_the_code_records() -> None:
    """The runbook's table of gap causes (the `dest_path` of a `gap` event) matches the code, both ways."""
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", _runbook_section("Codi2TrailGap"), flags=re.MULTILINE))
    found = _gap_causes()
    assert {"inotify_overflow", "journal_error", "pipeline_error"} <= found  # the walk finds them
    assert listed == found, f"runbook only: {sorted(listed - found)}; code only: {sorted(found - listed)}"


# Generated files, scrape configuration ---------------------------------------------------------------


def test_the_dashboard_is_what_generate_py_makes() -> None:
    assert (MONITORING / "codi2-dashboard.json").read_text() == _generator().dashboard_json(), "run `make monitoring`"


def test_the_rules_prometheus_loads_link_their_runbooks_absolutely(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Alertmanager and Grafana show a runbook_url as a link, which a relative path breaks; the base is
    where the operator serves docs/, given at render time (#24, item 10)."""
    generator = _generator()
    url = "https://git.example.com/platform/codi2/-/blob/main/docs/"
    assert generator.main(["--docs-url", url, "--output-dir", str(tmp_path)]) == 0
    rendered = yaml.safe_load((tmp_path / "codi2.rules.yml").read_text())["groups"]
    for group in rendered:
        for alert in group["rules"]:
            link = urllib.parse.urlsplit(alert["annotations"]["runbook_url"])
            assert (link.scheme, link.netloc) == ("https", "git.example.com"), alert["alert"]
            assert (
                f"{link.path}#{link.fragment}"
                == f"/platform/codi2/-/blob/main/docs/runbook.md#{alert['alert'].lower()}"
            )
    (rule,) = yaml.safe_load_all((tmp_path / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"] == rendered
    assert not (MONITORING / "prometheusrule.yaml").exists()  # only rendered, never checked in with a guess
    for bad in ("docs/runbook.md", "example.com/docs", "file:///srv/docs"):
        with pytest.raises(SystemExit) as exited:
            generator.main(["--docs-url", bad, "--output-dir", str(tmp_path / "bad")])
        assert exited.value.code == 2 and "absolute http(s) URL" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_the_dashboard_has_tenant_and_pod_variables_and_the_panels_operators_need() -> None:
    dashboard = json.loads((MONITORING / "codi2-dashboard.json").read_text())
    assert {"tenant", "user", "pod"} <= {v["name"] for v in dashboard["templating"]["list"]}
    titles = {panel["title"] for panel in dashboard["panels"]}
    for title in (
        "Events per second by action",
        "Commit lag",
        "Batch commit duration",
        "Spool bytes against its limit",
        "Store state",
        "Store errors by code",
        "Watches and unwatched directories",
        "Overflows and rescans",
    ):
        assert title in titles, title
    for where, expr in _expressions().items():
        if where.startswith("panel"):
            assert all(f'{label}=~"${label}"' in expr for label in IDENTITY), where


def test_the_pod_monitor_scrapes_provisioned_pods_and_labels_them_with_their_identity() -> None:
    (monitor,) = yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text())
    (pod,) = [
        m
        for m in render(
            WorkspaceSpec(
                user_id="alice",
                tenant_id="acme",
                codi2_config=(REPO / "config" / "codi2.toml").read_text(),
                registry="registry.example/coditect",
            )
        )
        if m["kind"] == "Pod"
    ]
    pod_labels = pod["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    containers = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]  # codi2 is a native sidecar
    ports = {port["name"] for container in containers for port in container.get("ports", [])}
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"

    def meta(label: str) -> str:
        return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", label)

    targets = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert targets["tenant"]["sourceLabels"] == [meta("coditect.ai/tenant")]
    assert targets["user"]["sourceLabels"] == [meta("coditect.ai/user-workspace")]
    assert pod_labels["coditect.ai/tenant"] == "acme" and pod_labels["coditect.ai/user-workspace"] == "alice"
    assert targets["job"]["replacement"] == "codi2"


# Against a running daemon -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """What a running daemon answers on /metrics and /status."""
    root = tmp_path_factory.mktemp("metrics")
    workspace = root / "workspace"
    workspace.mkdir()
    db = root / "audit.db"
    daemon = DaemonProcess(write_config(root / "codi2.toml", workspace, db), db)
    try:
        code, text = daemon.get("/metrics")
        status = daemon.status()
    finally:
        daemon.kill()
    assert code == 200
    return text, status


@pytest.fixture(scope="module")
def exported(scraped: tuple[str, dict[str, Any]]) -> dict[str, str]:
    """Every sample name the daemon's /metrics can carry, mapped to its metric family."""
    text, _ = scraped
    names = {}
    for family in text_string_to_metric_families(text):
        for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)):  # families with no sample yet count too
            names[family.name + suffix] = family.name
        names.update({sample.name: family.name for sample in family.samples})
    return names


def test_no_counter_exports_a_created_series(scraped: tuple[str, dict[str, Any]]) -> None:
    """`*_created` (when a counter was made) doubles the series of every pod and nothing reads it (#24)."""
    text, _ = scraped
    created = sorted({line.split("{")[0].split(" ")[0] for line in text.splitlines() if "_created" in line})
    assert created == [] and "codi2_events_committed_total" in text


def test_every_expression_names_only_metrics_the_daemon_exports(exported: dict[str, str]) -> None:
    unknown = {}
    for where, expr in _expressions().items():
        names = _metric_names(expr) - set(exported) - MADE_BY_PROMETHEUS
        if names:
            unknown[where] = sorted(names)
    assert not unknown, f"expressions naming metrics the daemon does not export: {unknown}"


def test_every_codi2_metric_is_on_the_dashboard_or_in_a_rule(exported: dict[str, str]) -> None:
    used = {exported[name] for expr in _expressions().values() for name in _metric_names(expr) if name in exported}
    unused = {family for family in exported.values() if family.startswith("codi2_")} - used
    assert not unused, f"metrics no panel or rule shows: {sorted(unused)}"


def test_every_log_event_the_runbook_quotes_is_one_codi2_logs(
    scraped: tuple[str, dict[str, Any]], exported: dict[str, str]
) -> None:
    """A snake_case name in backticks is a log event the code logs, or else a name the daemon has (a metric,
    a /status field, an event field, a config key, a label value, a rule annotation): a renamed or removed
    log event fails."""
    events = _log_events()
    assert {"codi2_ready", "inotify_queue_overflow", "journal_write_failed"} <= events  # calls over lines too
    _, status = scraped
    known = (
        set(exported)
        | set(exported.values())
        | _keys(status)
        | set(Event._fields)
        | {key.name for _, _, keys in tables() for key in keys}
        | set(DROP_REASONS)
        | _gap_causes()
        | {name for alert in _alerts() for name in alert["annotations"]}
        | NOT_OURS
    )
    quoted = set(QUOTED_NAME.findall(RUNBOOK.read_text()))
    assert "store_unavailable" in quoted  # the pattern finds them
    unknown = sorted(quoted - events - known)
    assert not unknown, (
        f"docs/runbook.md quotes names that codi2 neither logs as an event nor has as a metric, /status field, "
        f"event field, config key or label value (another program's name goes in NOT_OURS): {unknown}"
    )


def test_every_status_field_the_runbook_quotes_is_one_status_reports(scraped: tuple[str, dict[str, Any]]) -> None:
    _, status = scraped
    quoted = set(QUOTED_FIELD.findall(RUNBOOK.read_text())) - NOT_OURS
    assert "store.state" in quoted  # the pattern finds them

    def reported(dotted: str) -> bool:
        node: Any = status
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    unknown = sorted(field for field in quoted if not reported(field))
    assert not unknown, f"docs/runbook.md quotes /status fields the daemon does not report: {unknown}"
