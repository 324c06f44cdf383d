"""packaging/vector/: the Vector configurations parse, their `exec` source runs a command line our parser
accepts (`codi2 events --follow --cursor-file … --format ocsf|ecs`), streamed, and every sink reads it. Vector
itself is neither in Debian nor on PyPI, so `vector validate` cannot run here (docs/siem.md)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from sink_contract import make_event

from codi2.cli import events
from codi2.cli.main import build_parser
from codi2.trail.export import to_ecs

CONFIGS = sorted((Path(__file__).parent.parent / "packaging" / "vector").glob("*.yaml"))
VARIABLES = {"TENANT_ID": "acme", "SIEM_ENDPOINT": "https://siem.invalid/ingest", "SIEM_TOKEN": "t"}


def _interpolate(text: str) -> str:
    """Vector's `${VAR}` interpolation, with sample values (every variable a config uses must have one)."""
    return re.sub(r"\$\{(\w+)\}", lambda m: VARIABLES.get(m[1], f"<{m[1].lower()}>"), text)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_the_exec_source_runs_a_valid_codi2_events_stream(config: Path) -> None:
    vector: dict[str, Any] = yaml.safe_load(_interpolate(config.read_text()))
    sources = {name: s for name, s in vector["sources"].items() if s["type"] == "exec"}
    assert sources
    for source in sources.values():
        assert source["mode"] == "streaming" and source["streaming"]["respawn_on_exit"] is True
        assert source["decoding"]["codec"] == "json" and source["framing"]["method"] == "newline_delimited"
        command = source["command"]
        assert command[0] == "codi2"
        args = build_parser().parse_args(command[1:])
        assert args.func is events.command
        assert args.follow and args.format in ("ocsf", "ecs")
        assert args.tenant_id == "acme" and args.cursor_file.is_absolute() and "acme" in args.cursor_file.name
    for sink in vector["sinks"].values():
        assert set(sink["inputs"]) <= set(vector["sources"])
        assert sink["buffer"] == {"type": "disk", "max_size": 268435488, "when_full": "block"}


def test_elasticsearch_indexes_each_event_under_its_own_id() -> None:
    """A line a restarted reader prints again must meet its first copy: the document id is the event's."""
    vector = yaml.safe_load(_interpolate((CONFIGS[0].parent / "codi2-elasticsearch.yaml").read_text()))
    (sink,) = vector["sinks"].values()
    assert sink["bulk"]["action"] == "create"
    event = make_event()
    record: Any = to_ecs(event)
    for part in sink["id_key"].split("."):
        record = record[part]
    assert record == event.id
