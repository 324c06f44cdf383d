"""The trail in the shapes SIEMs ingest: OCSF File System Activity and the Elastic Common Schema.

Pure functions of an `Event`, one JSON object per event, so `codi2 events --format ocsf|ecs` feeds a
shipper (Vector, Fluent Bit) with nothing to map on its side. The versions targeted are named in every
record (`metadata.version`, `ecs.version`); tests validate the output against OCSF's published schema
and ECS's field definitions (tests/test_export.py).

Names that are not UTF-8 are shown with `\\xNN` escapes for their undecodable bytes: SIEM pipelines read
JSON strictly and reject the lone surrogates the lossless `jsonl` form carries. The exact bytes stay in
the trail (`codi2 events --format jsonl`), found by the event's id, which every record carries.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable
from typing import Any

from codi2 import __version__
from codi2.trail.events import LIFECYCLE, Action, Event, parse_time

OCSF_VERSION = "1.5.0"
ECS_VERSION = "9.4.0"
PRODUCT = {"name": "codi2", "vendor_name": "codi2", "version": __version__}

# OCSF 1.5.0 File System Activity (class 1001, category 1 System Activity).
OCSF_CLASS_UID, OCSF_CATEGORY_UID = 1001, 1
OCSF_ACTIVITY: dict[Action, tuple[int, str]] = {
    "created": (1, "Create"),
    "updated": (3, "Update"),
    "deleted": (4, "Delete"),
    "moved": (5, "Rename"),
    "gap": (99, "Other"),  # not a file operation: "Other", with `activity_name` and `message` saying what
    "start": (99, "Other"),  # the daemon's own life (docs/trail-format.md): details in `dest_path`
    "stop": (99, "Other"),
}
OCSF_FILE_TYPE = {"file": (1, "Regular File"), "dir": (2, "Folder"), "symlink": (7, "Symbolic Link")}
OCSF_SHA256 = 3  # fingerprint algorithm_id
OCSF_DEVICE_OTHER = 99  # device type_id: a pod is none of OCSF's device types; `type` names it

# ECS event.type per action, from the types ECS expects with event.category "file".
ECS_TYPE: dict[Action, str] = {
    "created": "creation",
    "updated": "change",
    "deleted": "deletion",
    "moved": "change",
    "gap": "info",
    "start": "start",
    "stop": "end",
}


def _shown(name: str) -> str:
    """A name as valid Unicode: undecodable bytes (surrogate escapes) become `\\xNN`."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _full_path(root: str, path: str) -> str:
    return _shown(posixpath.join(root, path) if path else root)


def _epoch_ms(text: str) -> int:
    return round(parse_time(text).timestamp() * 1000)


def _mtime_ms(e: Event) -> int | None:
    """The file's mtime as epoch milliseconds; None when unknown or outside years 1-9999, which an mtime can
    be and `datetime` cannot hold."""
    try:
        return _epoch_ms(e.mtime) if e.mtime is not None else None
    except ValueError:
        return None


def _file_facts(e: Event) -> Event:
    """The event with only what describes a file: a gap's `size` counts changes lost, not bytes."""
    if e.action == "gap" or e.action in LIFECYCLE:
        return e._replace(size=None, mode=None, mtime=None, sha256=None)
    return e


def _gap_message(e: Event) -> str:
    lost = f"{e.size} changes" if e.size is not None else "changes"
    return f"history incomplete ({e.dest_path}): {lost} under {_full_path(e.root, e.path)} lost their history"


def _ocsf_file(e: Event, path: str) -> dict[str, Any]:
    full = _full_path(e.root, path)
    type_id, type_name = OCSF_FILE_TYPE[e.type]
    record: dict[str, Any] = {"name": posixpath.basename(full) or full, "path": full, "type_id": type_id}
    record["type"] = type_name
    if e.size is not None:
        record["size"] = e.size
    if e.sha256 is not None:
        record["hashes"] = [{"algorithm_id": OCSF_SHA256, "algorithm": "SHA-256", "value": e.sha256}]
    if (mtime := _mtime_ms(e)) is not None:
        record["modified_time"] = mtime
    if e.uid is not None:
        record["owner"] = {"uid": str(e.uid)}
    if e.gid is not None:
        record["xattributes"] = {"primary_group": str(e.gid)}
    return record


def to_ocsf(e: Event) -> dict[str, Any]:
    """OCSF 1.5.0 File System Activity. A rename's source is `file` and its destination `file_result`; a
    gap is activity 99 Other, severity Medium, status Failure, with the cause in `status_detail`. The owner
    is `file.owner.uid` (a number: no name is resolvable in a sidecar; `file.uid` is the file's own id) and
    its group `file.xattributes.primary_group`, as OCSF's extended attributes name it; a symlink's target
    has no OCSF attribute and is `unmapped.target`."""
    gap = e.action == "gap"
    activity_id, activity = OCSF_ACTIVITY[e.action]
    activity_name = "Gap" if gap else activity
    record: dict[str, Any] = {
        "class_uid": OCSF_CLASS_UID,
        "class_name": "File System Activity",
        "category_uid": OCSF_CATEGORY_UID,
        "category_name": "System Activity",
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": OCSF_CLASS_UID * 100 + activity_id,
        "type_name": f"File System Activity: {activity}",
        "time": _epoch_ms(e.ts),
        "severity_id": 3 if gap else 1,
        "severity": "Medium" if gap else "Informational",
        "status_id": 2 if gap else 1,
        "status": "Failure" if gap else "Success",
        "metadata": {
            "version": OCSF_VERSION,
            "uid": e.id,
            "sequence": e.seq,
            "tenant_uid": e.tenant_id,
            "product": PRODUCT,
        },
        "actor": {"user": {"uid": e.user_id}},
        "device": {"type_id": OCSF_DEVICE_OTHER, "type": "Kubernetes Pod", "hostname": e.pod, "name": e.pod},
        "file": _ocsf_file(_file_facts(e), e.path),
        "unmapped": {"origin": e.origin, "root": _shown(e.root)},
    }
    if e.session_id is not None:
        record["actor"]["session"] = {"uid": e.session_id}
    if e.mode is not None:
        record["unmapped"]["mode"] = f"{e.mode:04o}"
    if e.target is not None:
        record["unmapped"]["target"] = _shown(e.target)
    if gap:
        record["status_detail"] = e.dest_path
        record["message"] = _gap_message(e)
        if e.size is not None:
            record["unmapped"]["lost_changes"] = e.size
    elif e.action == "moved" and e.dest_path is not None:
        record["file_result"] = _ocsf_file(e, e.dest_path)
    return record


def _ecs_file(e: Event, path: str) -> dict[str, Any]:
    full = _full_path(e.root, path)
    record: dict[str, Any] = {
        "path": full,
        "name": posixpath.basename(full) or full,
        "directory": posixpath.dirname(full),
        "type": e.type,
    }
    if e.size is not None:
        record["size"] = e.size
    if e.mode is not None:
        record["mode"] = f"{e.mode:04o}"
    if _mtime_ms(e) is not None:
        record["mtime"] = e.mtime
    if e.sha256 is not None:
        record["hash"] = {"sha256": e.sha256}
    if e.uid is not None:
        record["uid"] = str(e.uid)
    if e.gid is not None:
        record["gid"] = str(e.gid)
    if e.target is not None:
        record["target_path"] = _shown(e.target)
    return record


def to_ecs(e: Event) -> dict[str, Any]:
    """ECS 9.4.0. A rename describes the file at its new place (`file.*`), as Elastic's own agents do, with
    the old path in `codi2.original_path`: ECS's `file.target_path` means a symlink's target, and is that.
    The owner is `file.uid` and `file.gid`; `file.owner` and `file.group` are names, which a sidecar cannot
    resolve, so they are left out rather than filled with numbers. A gap is `event.type: [info]`,
    `event.outcome: failure`, with the cause in `event.reason`."""
    gap = e.action == "gap"
    dest = e.dest_path if e.action == "moved" else None
    event: dict[str, Any] = {
        "kind": "event",
        "category": ["file"],
        "type": [ECS_TYPE[e.action]],
        "action": e.action,
        "id": e.id,
        "created": e.ts,
        "sequence": e.seq,
        "dataset": "codi2.audit",
        "module": "codi2",
        "outcome": "failure" if gap else "success",
    }
    record: dict[str, Any] = {
        "@timestamp": e.ts,
        "ecs": {"version": ECS_VERSION},
        "event": event,
        "file": _ecs_file(_file_facts(e), e.path if dest is None else dest),
        "user": {"id": e.user_id},
        "host": {"name": e.pod, "hostname": e.pod},
        "orchestrator": {"type": "kubernetes", "resource": {"type": "pod", "name": e.pod}},
        "labels": {"tenant_id": e.tenant_id},
        "codi2": {"origin": e.origin, "root": _shown(e.root)},
    }
    if e.session_id is not None:
        record["labels"]["session_id"] = e.session_id
    if dest is not None:
        record["codi2"]["original_path"] = _full_path(e.root, e.path)
    if gap:
        event["reason"] = e.dest_path
        record["message"] = _gap_message(e)
        if e.size is not None:
            record["codi2"]["lost_changes"] = e.size
    return record


FORMATS: dict[str, Callable[[Event], dict[str, Any]]] = {"ocsf": to_ocsf, "ecs": to_ecs}


def render(fmt: str, e: Event) -> str:
    """One line of `codi2 events --format ocsf|ecs`: compact JSON, ASCII only (a newline in a name cannot
    split it)."""
    return json.dumps(FORMATS[fmt](e), separators=(",", ":"))
