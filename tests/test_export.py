"""`codi2 events --format ocsf|ecs`: every kind of event validated against OCSF 1.5.0's own schema
(shipped offline by `ocsf-json-schema`, compiled to JSON Schema, checked with `jsonschema`) and against
ECS 9.4.0's field definitions (tests/data/ecs_fields_9.4.0.json, from Elastic's `@elastic/ecs`)."""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema
from sink_contract import make_event

from codi2.trail.events import Event, parse_time
from codi2.trail.export import ECS_VERSION, OCSF_VERSION, render, to_ecs, to_ocsf

ECS_FIELDS = Path(__file__).parent / "data" / f"ecs_fields_{ECS_VERSION}.json"
NON_UTF8 = os.fsdecode(b"caf\xe9 \xff.txt")

EVENTS = {
    "created": make_event("src/main.py"),
    "updated": make_event("src/main.py", action="updated", session_id="s1"),
    "deleted": make_event("src/main.py", action="deleted", size=None, mode=None, mtime=None, sha256=None),
    "moved": make_event("a/x.py", action="moved", dest_path="b/y.py"),
    "moved_dir": make_event("a", action="moved", dest_path="b", type="dir", sha256=None),
    "symlink": make_event("link", type="symlink", sha256=None),
    "chown": make_event("src/main.py", action="updated", uid=1234, gid=4321),
    "retarget": make_event("link", action="updated", type="symlink", sha256=None, uid=0, gid=0, target=NON_UTF8),
    "gap": make_event("", action="gap", dest_path="inotify_overflow", type="dir", size=7, mode=None, sha256=None),
    "gap_uncounted": make_event("", action="gap", dest_path="spool_full", type="dir", size=None, sha256=None),
    "non_utf8": make_event(NON_UTF8, action="moved", dest_path=NON_UTF8 + "\n2"),
    "far_mtime": make_event("old", origin="baseline", mtime="+10000-01-01T00:00:00.000000Z"),
}


@cache
def ocsf_validator() -> Draft202012Validator:
    schema = OcsfJsonSchemaEmbedded(get_ocsf_schema(OCSF_VERSION)).get_class_schema("file_activity")
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


@cache
def ocsf_enum(attribute: str) -> dict[str, str]:
    """The captions OCSF gives an enum attribute of File System Activity."""
    values = get_ocsf_schema(OCSF_VERSION)["classes"]["file_activity"]["attributes"][attribute]["enum"]
    return {key: value["caption"] for key, value in values.items()}


def _line(fmt: str, event: Event) -> dict[str, Any]:
    """The printed line, read as strictly as a SIEM pipeline reads it: one line, valid UTF-8 JSON."""
    text = render(fmt, event)
    assert "\n" not in text and text.isascii()
    record = json.loads(text)
    json.dumps(record, ensure_ascii=False).encode("utf-8")  # no lone surrogate anywhere
    return record  # type: ignore[no-any-return]


@pytest.mark.parametrize("name", EVENTS)
def test_ocsf_records_are_valid_file_system_activity(name: str) -> None:
    event = EVENTS[name]
    record = _line("ocsf", event)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in ocsf_validator().iter_errors(record)]
    assert errors == []
    assert record["class_uid"] == 1001 and record["category_uid"] == 1
    assert record["metadata"]["version"] == OCSF_VERSION == "1.5.0"
    assert record["metadata"]["uid"] == event.id
    assert record["metadata"]["product"]["name"] == "codi2"
    assert record["type_uid"] == 1001 * 100 + record["activity_id"]
    assert ocsf_enum("type_uid")[str(record["type_uid"])] == f"File System Activity: {record['type_name'][22:]}"
    assert record["time"] == round(parse_time(event.ts).timestamp() * 1000)
    assert record["actor"]["user"]["uid"] == event.user_id
    assert record["device"]["hostname"] == event.pod


@pytest.mark.parametrize(
    ("action", "activity_id", "caption"),
    [("created", 1, "Create"), ("updated", 3, "Update"), ("deleted", 4, "Delete"), ("moved", 5, "Rename")],
)
def test_ocsf_activity_ids_are_the_schema_s(action: str, activity_id: int, caption: str) -> None:
    record = to_ocsf(EVENTS[action])
    assert (record["activity_id"], record["activity_name"]) == (activity_id, caption)
    assert ocsf_enum("activity_id")[str(activity_id)] == caption


def test_ocsf_file_facts_rename_and_gap() -> None:
    created = to_ocsf(EVENTS["created"])["file"]
    assert created == {
        "name": "main.py",
        "path": "/workspace/src/main.py",
        "type_id": 1,
        "type": "Regular File",
        "size": 3,
        "hashes": [{"algorithm_id": 3, "algorithm": "SHA-256", "value": "0" * 64}],
        "modified_time": 1_700_000_000_000,
    }
    moved = to_ocsf(EVENTS["moved_dir"])
    assert (moved["file"]["path"], moved["file_result"]["path"]) == ("/workspace/a", "/workspace/b")
    assert moved["file"]["type_id"] == 2
    assert "modified_time" not in to_ocsf(EVENTS["far_mtime"])["file"]
    gap = to_ocsf(EVENTS["gap"])
    assert (gap["activity_id"], gap["activity_name"], gap["type_name"]) == (99, "Gap", "File System Activity: Other")
    assert (gap["severity_id"], gap["status_id"], gap["status_detail"]) == (3, 2, "inotify_overflow")
    assert gap["file"] == {"name": "workspace", "path": "/workspace", "type_id": 2, "type": "Folder"}  # no "size"
    assert gap["unmapped"]["lost_changes"] == 7
    assert "7 changes" in gap["message"] and "inotify_overflow" in gap["message"]


def test_names_that_are_not_utf8_are_shown_escaped_in_both_formats() -> None:
    ocsf, ecs = to_ocsf(EVENTS["non_utf8"]), to_ecs(EVENTS["non_utf8"])
    assert ocsf["file"]["name"] == "caf\\xe9 \\xff.txt"
    assert ocsf["file_result"]["path"] == "/workspace/caf\\xe9 \\xff.txt\n2"
    assert ecs["codi2"]["original_path"] == "/workspace/caf\\xe9 \\xff.txt"


@cache
def ecs_fields() -> dict[str, Any]:
    data = json.loads(ECS_FIELDS.read_text())
    assert data["ecs_version"] == ECS_VERSION
    return data["fields"]  # type: ignore[no-any-return]


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        name = prefix + key
        if isinstance(value, dict) and name not in ("labels", "codi2"):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _ecs_type_ok(ecs_type: str, value: Any) -> bool:
    if ecs_type in ("keyword", "match_only_text", "text", "wildcard", "constant_keyword"):
        return isinstance(value, str)
    if ecs_type == "long":
        return isinstance(value, int) and not isinstance(value, bool)
    if ecs_type == "date":
        return isinstance(value, str) and parse_time(value).tzinfo is not None
    if ecs_type == "object":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    raise AssertionError(f"no check for ECS type {ecs_type}")


@pytest.mark.parametrize("name", [n for n in EVENTS if n != "far_mtime"])
def test_ecs_fields_are_ecs_s_with_their_types_and_allowed_values(name: str) -> None:
    event = EVENTS[name]
    flat = _flatten(_line("ecs", event))
    fields = ecs_fields()
    for field, value in flat.items():
        if field == "codi2":  # our own namespace, as ECS asks of custom fields
            continue
        assert field in fields, f"{field} is not an ECS {ECS_VERSION} field"
        spec = fields[field]
        values = value if "array" in spec.get("normalize", []) else [value]
        assert isinstance(values, list) and values, field
        for v in values:
            assert _ecs_type_ok(spec["type"], v), (field, spec["type"], v)
            assert "allowed_values" not in spec or v in spec["allowed_values"], (field, v)
    for category in flat["event.category"]:  # every event.type is one ECS expects with the category
        assert set(flat["event.type"]) <= set(fields["event.category"]["allowed_values"][category])
    assert flat["ecs.version"] == ECS_VERSION
    assert (flat["event.id"], flat["@timestamp"], flat["labels"]["tenant_id"]) == (event.id, event.ts, "t1")
    assert (flat["event.dataset"], flat["event.module"], flat["event.kind"]) == ("codi2.audit", "codi2", "event")


def test_ecs_mapping() -> None:
    created = to_ecs(EVENTS["created"])
    assert created["file"] == {
        "path": "/workspace/src/main.py",
        "name": "main.py",
        "directory": "/workspace/src",
        "type": "file",
        "size": 3,
        "mode": "0644",
        "mtime": EVENTS["created"].mtime,
        "hash": {"sha256": "0" * 64},
    }
    types = {name: to_ecs(EVENTS[name])["event"]["type"] for name in ("created", "updated", "deleted", "moved", "gap")}
    assert types == {
        "created": ["creation"],
        "updated": ["change"],
        "deleted": ["deletion"],
        "moved": ["change"],
        "gap": ["info"],
    }
    moved = to_ecs(EVENTS["moved"])
    assert (moved["file"]["path"], moved["codi2"]["original_path"]) == ("/workspace/b/y.py", "/workspace/a/x.py")
    assert "target_path" not in moved["file"]  # ECS: a symlink's target, not a rename's
    assert to_ecs(EVENTS["updated"])["labels"] == {"tenant_id": "t1", "session_id": "s1"}
    gap = to_ecs(EVENTS["gap"])
    assert (gap["event"]["outcome"], gap["event"]["reason"], gap["codi2"]["lost_changes"]) == (
        "failure",
        "inotify_overflow",
        7,
    )
    assert "size" not in gap["file"]
    assert "mtime" not in to_ecs(EVENTS["far_mtime"])["file"]


def test_the_owner_and_a_symlink_s_target_in_both_formats() -> None:
    """Numbers, never names (a sidecar cannot resolve them): OCSF's owner is a User with a uid (`file.uid` is
    the file's own id), the group an extended attribute; ECS has file.uid/gid and a symlink's target_path."""
    ocsf = to_ocsf(EVENTS["chown"])
    assert (ocsf["file"]["owner"], ocsf["file"]["xattributes"]) == ({"uid": "1234"}, {"primary_group": "4321"})
    assert "uid" not in ocsf["file"]
    ecs = to_ecs(EVENTS["chown"])["file"]
    assert (ecs["uid"], ecs["gid"]) == ("1234", "4321")
    assert not {"owner", "group", "target_path"} & ecs.keys()
    link = to_ecs(EVENTS["retarget"])["file"]
    assert (link["target_path"], link["uid"], link["gid"]) == ("caf\\xe9 \\xff.txt", "0", "0")
    assert to_ocsf(EVENTS["retarget"])["unmapped"]["target"] == "caf\\xe9 \\xff.txt"
    assert not {"owner", "xattributes"} & to_ocsf(EVENTS["gap"])["file"].keys()
