"""Generate the derived files of packaging/monitoring/ (`make monitoring`; a test fails when they drift):

- codi2-dashboard.json: the Grafana dashboard, built with grafana-foundation-sdk (checked in);
- with `--docs-url URL` (or $CODI2_DOCS_URL; `make monitoring DOCS_URL=URL`), what Prometheus loads, into
  `--output-dir` (dist/monitoring): codi2.rules.yml with every runbook link absolute (URL is where docs/ is
  served), and the same rules as a Prometheus Operator PrometheusRule. There is no default URL: a link
  that points nowhere is worse than none, and only the operator knows where the docs are served.

Every query selects with the target labels the scrape configuration adds (tenant, user, pod), which the
dashboard's variables choose from.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import urllib.parse
from pathlib import Path

import yaml
from grafana_foundation_sdk.builders.dashboard import Dashboard as DashboardBuilder
from grafana_foundation_sdk.builders.dashboard import DatasourceVariable, QueryVariable, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.builders.stat import Panel as Stat
from grafana_foundation_sdk.builders.statetimeline import Panel as StateTimeline
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

from codi2.provisioning.render import to_yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "codi2.rules.yml"
DASHBOARD = HERE / "codi2-dashboard.json"
OUTPUT = HERE.parent.parent / "dist" / "monitoring"
DOCS_URL = "$DOCS_URL"  # in codi2.rules.yml's runbook links, replaced by --docs-url

DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
SEL = 'tenant=~"$tenant", user=~"$user", pod=~"$pod"'
BY_POD = "tenant, user, pod"
POD_LEGEND = "{{tenant}}/{{user}} {{pod}}"
RATE = "$__rate_interval"


def _query(expr: str, legend: str = POD_LEGEND, ref: str = "A") -> Dataquery:
    return Dataquery().expr(expr).legend_format(legend).ref_id(ref)


def _timeseries(title: str, unit: str, description: str, *queries: tuple[str, str]) -> Timeseries:
    panel = Timeseries().title(title).description(description).datasource(DATASOURCE).unit(unit).height(8)
    for ref, (expr, legend) in zip("ABCDEFGH", queries, strict=False):  # Grafana's query ids
        panel = panel.with_target(_query(expr, legend, ref))
    return panel


def _stat(title: str, description: str, expr: str) -> Stat:
    query = Dataquery().expr(expr).ref_id("A").instant()
    return Stat().title(title).description(description).datasource(DATASOURCE).height(4).with_target(query)


def _variable(name: str, label: str, selector: str) -> QueryVariable:
    return (
        QueryVariable(name)
        .label(label)
        .datasource(DATASOURCE)
        .query(f"label_values({selector}, {name})")
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_ASC)
    )


def _duration_quantile(q: float) -> tuple[str, str]:
    buckets = f"codi2_batch_commit_duration_seconds_bucket{{{SEL}}}"
    return f"histogram_quantile({q}, sum by (le) (rate({buckets}[{RATE}])))", f"p{round(q * 100)}"


def _store_state() -> StateTimeline:
    """The worst state per pod: 2 blocked, 1 degraded (commits failing), 0 ok (from the committed counter,
    which every daemon exports)."""
    expr = (
        f"max by ({BY_POD}) (2 * codi2_store_blocked{{{SEL}}}"
        f" or (sum by ({BY_POD}) (rate(codi2_store_errors_total{{{SEL}}}[{RATE}])) > bool 0)"
        f" or 0 * codi2_events_committed_total{{{SEL}}})"
    )
    states = {"0": ("ok", "green"), "1": ("degraded", "orange"), "2": ("blocked", "red")}
    return (
        StateTimeline()
        .title("Store state")
        .description("Degraded: batch commits failing (retried, nothing lost). Blocked: a batch that can never commit.")
        .datasource(DATASOURCE)
        .height(8)
        .mappings([ValueMap({v: ValueMappingResult(text=t, color=c) for v, (t, c) in states.items()})])
        .with_target(_query(expr))
    )


def _rows() -> dict[str, list[Stat | Timeseries | StateTimeline]]:
    return {
        "Overview": [
            _stat("Daemons up", "Targets scraped successfully.", f'sum(up{{job="codi2", {SEL}}})'),
            _stat(
                "Not ready",
                "Daemons whose /readyz fails (Codi2NotReady).",
                f"count(codi2_ready{{{SEL}}} == 0) or vector(0)",
            ),
            _stat(
                "Stores blocked",
                "Daemons holding a batch the store can never commit (Codi2StoreBlocked).",
                f"sum(codi2_store_blocked{{{SEL}}})",
            ),
            _stat(
                "Gaps recorded",
                "Gap markers written in the time range (Codi2TrailGap).",
                f"sum(increase(codi2_gaps_total{{{SEL}}}[$__range]))",
            ),
            _stat(
                "Events dropped",
                "Events that could not be kept in the time range (Codi2EventsDropped).",
                f"sum(increase(codi2_events_dropped_total{{{SEL}}}[$__range]))",
            ),
            _stat(
                "Restarts",
                "Daemon starts in the time range (Codi2RestartLoop).",
                f'sum(changes(process_start_time_seconds{{job="codi2", {SEL}}}[$__range]))',
            ),
        ],
        "Events": [
            _timeseries(
                "Events per second by action",
                "ops",
                "Audit events produced from file changes (a `gap` marks where the history of changes was lost).",
                (f"sum by (action) (rate(codi2_events_observed_total{{{SEL}}}[{RATE}]))", "{{action}}"),
            ),
            _timeseries(
                "Committed and dropped per second",
                "ops",
                "Events committed to the store, and events that could not be kept, by reason.",
                (f"sum(rate(codi2_events_committed_total{{{SEL}}}[{RATE}]))", "committed"),
                (f"sum by (reason) (rate(codi2_events_dropped_total{{{SEL}}}[{RATE}]))", "dropped: {{reason}}"),
            ),
            _timeseries(
                "Commit lag",
                "s",
                "Age of the oldest event of the last committed batch (Codi2CommitLagHigh).",
                (f"max by ({BY_POD}) (codi2_event_commit_lag_seconds{{{SEL}}})", POD_LEGEND),
            ),
        ],
        "Store": [
            _store_state(),
            _timeseries(
                "Store errors by code",
                "ops",
                "Failed batch commits per second, by FoundationDB or SQLite error (Codi2StoreDegraded).",
                (f"sum by (error) (rate(codi2_store_errors_total{{{SEL}}}[{RATE}]))", "{{error}}"),
            ),
            _timeseries(
                "Batch commit duration",
                "s",
                "Time to commit one batch: 50th and 99th percentile, and the mean.",
                _duration_quantile(0.5),
                _duration_quantile(0.99),
                (
                    f"sum(rate(codi2_batch_commit_duration_seconds_sum{{{SEL}}}[{RATE}]))"
                    f" / sum(rate(codi2_batch_commit_duration_seconds_count{{{SEL}}}[{RATE}]))",
                    "mean",
                ),
            ),
        ],
        "Journal and spool": [
            _timeseries(
                "Journal write errors",
                "ops",
                "Failed journal writes per second, by error (Codi2JournalFailing): the changes are held in memory"
                " and retried until a write succeeds.",
                (
                    f"sum by ({BY_POD}, error) (rate(codi2_journal_errors_total{{{SEL}}}[{RATE}]))",
                    "{{error}} " + POD_LEGEND,
                ),
            ),
            _timeseries(
                "Spool bytes against its limit",
                "bytes",
                "Bytes of uncommitted batches, and [spool] max_bytes, where journaling pauses"
                " (Codi2SpoolNearlyFull at 80%).",
                (f"max by ({BY_POD}) (codi2_spool_bytes{{{SEL}}})", POD_LEGEND),
                (f"max by ({BY_POD}) (codi2_spool_max_bytes{{{SEL}}})", "limit " + POD_LEGEND),
            ),
            _timeseries(
                "Waiting events",
                "short",
                "Events in the spool not yet committed, and changes reported by the watcher not yet journaled.",
                (f"max by ({BY_POD}) (codi2_spool_events{{{SEL}}})", "spool " + POD_LEGEND),
                (f"max by ({BY_POD}) (codi2_pipeline_queue_events{{{SEL}}})", "queue " + POD_LEGEND),
            ),
            _timeseries(
                "Corrupt spool records",
                "short",
                "Spool batches found corrupt and lost (a `gap` event marks each place), in the journal or in an older"
                " codi2's spool being migrated.",
                (f"max by ({BY_POD}) (codi2_spool_corrupt_records_total{{{SEL}}})", POD_LEGEND),
            ),
        ],
        "Watching": [
            _timeseries(
                "Watches and unwatched directories",
                "short",
                "inotify watches in place, and directories that could not be watched (Codi2UnwatchedDirectories).",
                (f"max by ({BY_POD}) (codi2_inotify_watches{{{SEL}}})", "watches " + POD_LEGEND),
                (f"max by ({BY_POD}) (codi2_unwatched_directories{{{SEL}}})", "unwatched " + POD_LEGEND),
            ),
            _timeseries(
                "Overflows and rescans",
                "short",
                "Kernel queue overflows (Codi2InotifyOverflows), and trees diffed against the index by origin.",
                (
                    f"sum by ({BY_POD}) (increase(codi2_inotify_overflows_total{{{SEL}}}[{RATE}]))",
                    "overflows " + POD_LEGEND,
                ),
                (f"sum by (origin) (increase(codi2_rescans_total{{{SEL}}}[{RATE}]))", "rescans: {{origin}}"),
            ),
            _timeseries(
                "Watch roots gone and watched again",
                "short",
                "Watch roots whose path holds no directory (Codi2WatchRootGone), and roots watched again after being"
                " removed, replaced or renamed away.",
                (f"max by ({BY_POD}) (codi2_watch_roots_gone{{{SEL}}})", "gone " + POD_LEGEND),
                (
                    f"sum by ({BY_POD}) (increase(codi2_watch_roots_reestablished_total{{{SEL}}}[{RATE}]))",
                    "watched again " + POD_LEGEND,
                ),
            ),
            _timeseries(
                "Watcher handler errors",
                "short",
                "Kernel events the watcher failed to handle (Codi2HandlerErrors).",
                (f"sum by ({BY_POD}) (increase(codi2_inotify_handler_errors_total{{{SEL}}}[{RATE}]))", POD_LEGEND),
            ),
        ],
        "Process": [
            _timeseries(
                "CPU",
                "short",
                "CPU seconds per second: the daemon must never slow the user's editor or build.",
                (f'rate(process_cpu_seconds_total{{job="codi2", {SEL}}}[{RATE}])', POD_LEGEND),
            ),
            _timeseries(
                "Resident memory",
                "bytes",
                "Resident set size of the daemon.",
                (f'process_resident_memory_bytes{{job="codi2", {SEL}}}', POD_LEGEND),
            ),
        ],
    }


def dashboard() -> DashboardBuilder:
    committed = "codi2_events_committed_total"  # every daemon exports it, so it lists every workspace
    builder = (
        DashboardBuilder("codi2")
        .uid("codi2")
        .description("One codi2 daemon per workspace pod: events, store, spool, watches (packaging/monitoring).")
        .tags(["codi2"])
        .refresh("1m")
        .time("now-6h", "now")
        .with_variable(DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(_variable("tenant", "Tenant", committed))
        .with_variable(_variable("user", "User", f'{committed}{{tenant=~"$tenant"}}'))
        .with_variable(_variable("pod", "Pod", f'{committed}{{tenant=~"$tenant", user=~"$user"}}'))
    )
    ids = itertools.count(1)  # Grafana needs a unique id per panel (links, "view panel")
    for title, panels in _rows().items():
        builder = builder.with_row(Row(title).id(next(ids)))
        for panel in panels:  # the panels of a row share its 24 columns
            builder = builder.with_panel(panel.id(next(ids)).span(24 // len(panels)))
    return builder


def dashboard_json() -> str:
    return json.dumps(dashboard().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def docs_url(value: str) -> str:
    """The base of every runbook link: an absolute http(s) URL, without a trailing slash."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(
            f"--docs-url {value!r}: give the absolute http(s) URL where the repository's docs/ is served, "
            "e.g. https://git.example.com/platform/codi2/-/blob/main/docs"
        )
    return value.rstrip("/")


def rules_yaml(url: str) -> str:
    """codi2.rules.yml as Prometheus loads it: every runbook link absolute."""
    return RULES.read_text().replace(DOCS_URL, docs_url(url))


def prometheus_rule_yaml(url: str) -> str:
    """The same groups as the rendered codi2.rules.yml, for clusters that run the Prometheus Operator."""
    groups = yaml.safe_load(rules_yaml(url))["groups"]
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "codi2", "labels": {"app.kubernetes.io/name": "codi2"}},
        "spec": {"groups": groups},
    }
    header = "# Generated from codi2.rules.yml by generate.py --docs-url (`make monitoring DOCS_URL=...`).\n"
    return header + to_yaml([rule])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--docs-url", default=os.environ.get("CODI2_DOCS_URL"), help="where docs/ is served (default: $CODI2_DOCS_URL)"
    )
    parser.add_argument("--output-dir", type=Path, default=OUTPUT, help=f"for the rendered rules (default: {OUTPUT})")
    args = parser.parse_args(argv)
    DASHBOARD.write_text(dashboard_json())
    if not args.docs_url:
        print("generate.py: dashboard written; the rules need --docs-url (or $CODI2_DOCS_URL)", file=sys.stderr)
        return 0
    try:
        rules, prometheus_rule = rules_yaml(args.docs_url), prometheus_rule_yaml(args.docs_url)
    except ValueError as exc:
        parser.error(str(exc))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "codi2.rules.yml").write_text(rules)
    (args.output_dir / "prometheusrule.yaml").write_text(prometheus_rule)
    print(f"generate.py: rules with runbook links under {docs_url(args.docs_url)} in {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
