"""The chain's format, checked by a verifier written from docs/trail-format.md alone (shortest-form msgpack
by hand, hashlib, hmac, sqlite3; nothing of codi2) against the doc's worked example and a store the
journal wrote; the journal sealing each batch in the transaction that makes it durable; keys."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import sqlite3
import struct
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sink_contract import make_event

from codi2.journal.journal import Journal
from codi2.journal.outbox import OutboxReader
from codi2.journal.recovery import move_aside
from codi2.stores.sqlite import LocalStore, SqliteSink
from codi2.trail import chain
from codi2.trail.chain import ChainHead, load_key, make_key
from codi2.trail.events import Event, decode_event, encode_event
from codi2.trail.verify import verify

DOC = Path(__file__).resolve().parent.parent / "docs" / "trail-format.md"


# A third party's verifier, from the doc --------------------------------------------------------------


class Raw(bytes):
    """msgpack already encoded: a record as the store keeps it."""


def _sized(n: int, fix: tuple[int, int] | None, forms: tuple[tuple[int, str], ...]) -> bytes:
    """A length: in the fix form's low bits when it fits, else in the first wide enough of `forms`."""
    if fix is not None and n < fix[1]:
        return bytes([fix[0] | n])
    code, fmt = next((code, fmt) for code, fmt in forms if n < 1 << (8 * struct.calcsize(fmt)))
    return bytes([code]) + struct.pack(fmt, n)


def mp(value: Any) -> bytes:
    """msgpack in the shortest form, by the rules docs/trail-format.md lists."""
    if isinstance(value, Raw):
        return bytes(value)
    if value is None:
        return b"\xc0"
    if isinstance(value, int):
        if -32 <= value < 0x80:
            return struct.pack(">b" if value < 0 else ">B", value)
        forms = ((0xD0, ">b"), (0xD1, ">h"), (0xD2, ">i"), (0xD3, ">q"))
        if value > 0:
            forms = ((0xCC, ">B"), (0xCD, ">H"), (0xCE, ">I"), (0xCF, ">Q"))
        for code, fmt in forms:
            try:
                return bytes([code]) + struct.pack(fmt, value)
            except struct.error:
                continue
    if isinstance(value, str):
        data = value.encode()
        return _sized(len(data), (0xA0, 32), ((0xD9, ">B"), (0xDA, ">H"), (0xDB, ">I"))) + data
    if isinstance(value, bytes):
        return _sized(len(value), None, ((0xC4, ">B"), (0xC5, ">H"), (0xC6, ">I"))) + value
    if isinstance(value, list):
        return _sized(len(value), (0x90, 16), ((0xDC, ">H"), (0xDD, ">I"))) + b"".join(map(mp, value))
    raise TypeError(value)


V1 = [
    "id",
    "seq",
    "ts",
    "tenant_id",
    "user_id",
    "session_id",
    "pod",
    "action",
    "path",
    "dest_path",
    "root",
    "type",
    "size",
    "mode",
    "mtime",
    "sha256",
    "origin",
]
V2 = [*V1, "uid", "gid", "target"]
BINARY = ("path", "dest_path", "root", "target")


def record(event: dict[str, Any]) -> list[Any]:
    """An event, as `codi2 events` prints it, as its record: the shortest version that holds it (2 when it
    has an owner or a target), the binary fields as their bytes."""
    version, keys = (2, V2) if any(event.get(k) is not None for k in V2[len(V1) :]) else (1, V1)
    return [version, *(os.fsencode(event[k]) if k in BINARY and event[k] is not None else event[k] for k in keys)]


def reference_link(header: dict[str, Any], records: list[Any], key: bytes | None) -> bytes:
    fields = [header[k] for k in ("stream_id", "number", "ts", "prev", "key_id")]
    message = mp([1, *fields, records])
    return hmac.new(key, message, hashlib.sha256).digest() if key else hashlib.sha256(message).digest()


def verify_sqlite_store(path: Path, keys: dict[str, bytes]) -> list[str]:
    """Every problem found in a SQLite store, read with SQL only."""
    problems: list[str] = []
    with closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        for (stream,) in db.execute("SELECT DISTINCT stream_id FROM batches").fetchall():
            prev = bytes(32)
            for h in db.execute("SELECT * FROM batches WHERE stream_id = ? ORDER BY number", (stream,)).fetchall():
                where = "SELECT body FROM events WHERE pos BETWEEN ? AND ? ORDER BY pos"
                bodies = [Raw(body) for (body,) in db.execute(where, (h["first_pos"], h["last_pos"]))]
                if h["prev"] != prev or len(bodies) != h["events"]:
                    problems.append(f"{stream} {h['number']}: chain or count")
                if reference_link(dict(h), bodies, keys.get(h["key_id"])) != h["link"]:
                    problems.append(f"{stream} {h['number']}: link")
                prev = h["link"]
    return problems


# The doc, the reference and codi2 ------------------------------------------------------------------


def test_the_worked_example_of_the_doc() -> None:
    doc = DOC.read_text()
    example = doc[doc.index("## Worked example") :]
    event_json, message_hex = re.findall(r"```(?:json)?\n(.*?)```", example, re.S)
    plain, keyed, plain_v1 = re.findall(r"`([0-9a-f]{64})`", example)
    event = json.loads(event_json)
    assert record(event)[0] == 2
    key = b"an example key: 32 bytes or more"
    key_id = hmac.new(key, b"codi2 key id", hashlib.sha256).hexdigest()[:16]
    header = {"stream_id": "5f0c2b7e-3d1a-4c8e-9b6f-0a1d2e3f4a5b", "number": 1, "ts": "2026-11-27T12:00:00.120000Z"}
    header |= {"prev": bytes(32), "key_id": None}

    assert mp([1, *header.values(), [record(event)]]).hex() == "".join(message_hex.split())  # the rules by hand
    assert reference_link(header, [record(event)], None).hex() == plain
    assert f"whose id is `{key_id}`" in example
    assert reference_link(header | {"key_id": key_id}, [record(event)], key).hex() == keyed
    v1 = event | {"uid": None, "gid": None}  # the same event before codi2 kept owners
    assert mp([1, *header.values(), [record(v1)]]).hex().startswith("9701") and len(mp(record(v1))) + 35 + 36 < 349
    assert reference_link(header, [record(v1)], None).hex() == plain_v1

    records = chain.records([encode_event(Event.from_fields(event))])  # and codi2 itself
    head = ChainHead(0, chain.ZERO)
    assert chain.seal(header["stream_id"], head, header["ts"], records, 1, None).link.hex() == plain
    assert chain.seal(header["stream_id"], head, header["ts"], records, 1, make_key(key)).link.hex() == keyed
    records = chain.records([encode_event(Event.from_fields(v1))])
    assert chain.seal(header["stream_id"], head, header["ts"], records, 1, None).link.hex() == plain_v1


paths = st.binary(min_size=1, max_size=300).filter(lambda b: b"\x00" not in b).map(os.fsdecode)
texts = st.text(max_size=300)
numbers = st.one_of(st.none(), st.integers(min_value=-(2**63), max_value=2**64 - 1))


owners = st.one_of(st.none(), st.integers(min_value=0, max_value=2**32 - 1))


@given(
    path=paths,
    dest=st.one_of(st.none(), paths),
    session=st.one_of(st.none(), texts),
    user=texts,
    size=numbers,
    uid=owners,
    gid=owners,
    target=st.one_of(st.none(), paths),
)
def test_the_doc_s_encoding_rules_are_codi2_s(
    path: str,
    dest: str | None,
    session: str | None,
    user: str,
    size: int | None,
    uid: int | None,
    gid: int | None,
    target: str | None,
) -> None:
    event = make_event(path, dest_path=dest, session_id=session, user_id=user, size=size, mode=size, seq=abs(size or 0))
    event = event._replace(uid=uid, gid=gid, target=target)
    assert list(event.to_dict()) == V2  # the doc's keys are codi2's
    assert mp(record(event.to_dict())) == encode_event(event)
    assert decode_event(encode_event(event)) == event


def test_a_verifier_of_one_s_own_checks_what_the_journal_wrote(tmp_path: Path) -> None:
    """The SQLite journal writes the store; the doc's verifier, with SQL only, finds it intact, and then
    finds the event removed from it."""
    store = tmp_path / "audit.db"
    key = make_key(os.urandom(32))
    streams = []
    for sealer in (None, key):  # two journals on the file in turn: an unkeyed stream, then a keyed one
        journal = Journal(store, store=LocalStore(), key=sealer)
        for n in range(3):
            with journal.transaction():
                name = os.fsdecode(b"f-\xff" * 40) + str(n)
                v1 = [make_event(name, size=2**40) for _ in range(10)]  # no owner: version 1 records
                v2 = [make_event(name, uid=1000, gid=2**32 - 2, target=os.fsdecode(b"\xfe")) for _ in range(10)]
                journal.append([e for pair in zip(v1, v2, strict=True) for e in pair])
        streams.append(journal.stream_id)
        journal._db.execute("DELETE FROM meta")  # as if the state dir were new: the next journal starts a stream
        journal.close()
    assert verify_sqlite_store(store, {key.id: key.secret}) == []
    with closing(sqlite3.connect(store)) as db, db:
        db.execute("DELETE FROM events WHERE pos = 30")  # in the first stream's second batch
    assert verify_sqlite_store(store, {key.id: key.secret}) == [
        f"{streams[0]} 2: chain or count",
        f"{streams[0]} 2: link",
    ]


# The journal ---------------------------------------------------------------------------------------


def test_the_journal_seals_a_batch_when_it_commits_and_a_restart_continues_the_stream(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    journal = Journal(path)
    with journal.transaction():
        journal.append([make_event("a")])
        journal.append([make_event("b"), make_event("c")])
    with pytest.raises(OSError), journal.transaction():
        journal.append([make_event("never")])
        raise OSError("the disk is full")
    assert journal.chain.batches == 2  # a batch rolled back never moved the head
    stream, head = journal.stream_id, journal.chain
    journal.close()

    journal = Journal(path)
    assert (journal.stream_id, journal.chain) == (stream, head)
    with journal.transaction():
        journal.append([make_event("d")])
    reader = OutboxReader(path)
    batches = reader.next_batches(0, 10)
    headers = [b.header for b in batches]
    assert [(h.stream_id, h.number, h.events, h.key_id) for h in headers] == [
        (stream, 1, 1, None),
        (stream, 2, 2, None),
        (stream, 3, 1, None),
    ]
    assert [h.prev for h in headers] == [chain.ZERO, headers[0].link, headers[1].link]
    assert headers[1].link == head.link and headers[2].link == journal.chain.link
    for b in batches:  # the link covers the records the outbox ships
        assert chain.expected_link(b.header, chain.records([encode_event(e) for e in b.events]), None) == b.header.link
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "UPDATE outbox SET header = CAST(substr(header, 1, 5) || x'ff' || substr(header, 7) AS BLOB) WHERE n = 2"
        )
    assert reader.next_batches(0, 10)[1] == (2, "checksum mismatch")  # the row's checksum covers its header too


def test_a_damaged_sqlite_store_is_carried_over_with_its_chain(tmp_path: Path) -> None:
    """A recovery copies the events a damaged file yields into a new one (pipeline._recover): the headers
    come along, pointing at the events' new places, so the old stream still verifies, and shows its loss."""
    store = tmp_path / "audit.db"
    journal = Journal(store, store=LocalStore())
    for n in range(3):
        with journal.transaction():
            journal.append([make_event(f"f{n}-{i}") for i in range(5)])
    damaged_stream = journal.stream_id
    journal.close()
    with closing(sqlite3.connect(store)) as db, db:
        db.execute("DELETE FROM events WHERE pos = 7")  # a row the damage took, in the second batch
    aside = move_aside(store)
    journal = Journal(store, store=LocalStore())
    with journal.transaction():
        assert journal.salvage_store(aside) == 14
        journal.append([make_event("the gap of the recovery", action="gap")])
    report = verify(SqliteSink(store, create=False), "t1")
    breaks = {s.stream_id: [(b.kind, b.batch) for b in s.breaks] for s in report.streams}
    assert breaks == {damaged_stream: [("event_removed", 2)], journal.stream_id: []}
    assert report.unchained_events == 0 and report.trail_events == 15


def test_a_keyed_journal_seals_with_the_key_s_id(tmp_path: Path) -> None:
    key = make_key(b"s" * 40)
    journal = Journal(tmp_path / "journal.db", key=key)
    with journal.transaction():
        journal.append([make_event("a")])
    [batch] = OutboxReader(tmp_path / "journal.db").next_batches(0, 10)
    assert batch.header.key_id == key.id
    records = chain.records([encode_event(e) for e in batch.events])
    assert (
        batch.header.link
        == chain.expected_link(batch.header, records, key)
        != chain.expected_link(batch.header, records, None)
    )


# Keys ----------------------------------------------------------------------------------------------


def test_a_key_file_is_read_without_its_line_end_and_must_be_long_enough(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(b"k" * 32 + b"\r\n")
    assert load_key(path) == make_key(b"k" * 32)
    assert re.fullmatch(r"[0-9a-f]{16}", load_key(path).id)
    path.write_bytes(b"password\n")
    with pytest.raises(ValueError, match="holds 8 bytes; a key needs at least 32"):
        load_key(path)
    with pytest.raises(ValueError, match=r"cannot read .*missing: No such file"):
        load_key(tmp_path / "missing")


def test_a_key_file_that_cannot_be_read_stops_the_daemon_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "codi2.toml"
    config.write_text(f'[integrity]\nkey_file = "{tmp_path / "missing"}"\n[state]\ndir = "{tmp_path / "state"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "codi2", "run", "--config", str(config), "--user-id", "u", "--tenant-id", "t"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        result.stderr == f"codi2: integrity.key_file: cannot read {tmp_path / 'missing'}: No such file or directory\n"
    )
