"""The hash chain that makes the trail tamper-evident. Each batch of a stream carries a link: the SHA-256
(with `[integrity] key_file`, the HMAC-SHA256) of the previous batch's link, its own header and its
events' records. Removing, altering, reordering or inserting anything in a store therefore changes a
link that the next batch commits to; with a key, nobody without it can compute a consistent chain again.

The journal seals a batch in the transaction that makes it durable (`codi2.journal.journal`), so a batch replayed
after a crash carries the same link; every sink stores the header with the batch; `codi2.trail.verify` checks
it. docs/trail-format.md describes the format for anyone writing a verifier of their own. Imports only
the event model.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import NamedTuple

import msgspec

from codi2.trail.events import BatchHeader

FORMAT = 1
ZERO = bytes(32)  # the `prev` of a stream's first batch
KEY_MIN_BYTES = 32
KEY_MAX_BYTES = 4096  # a key file is a secret of a few dozen bytes; anything far larger is a mistake
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class ChainKey(NamedTuple):
    """An HMAC key and its id: the first 16 hex digits of HMAC-SHA256(key, "codi2 key id"), recorded in every
    header it seals, so a verifier knows which key to use and a rotation is visible in the chain."""

    id: str
    secret: bytes


class ChainHead(NamedTuple):
    """Where a stream stands: the number and link of its last batch (0 and `ZERO` before the first)."""

    batches: int
    link: bytes


def make_key(secret: bytes) -> ChainKey:
    return ChainKey(hmac.new(secret, b"codi2 key id", hashlib.sha256).hexdigest()[:16], secret)


def load_key(path: Path) -> ChainKey:
    """The key in a file (a mounted Secret): its bytes without trailing CR and LF, at least 32 of them.
    Raises ValueError with one line that says what is wrong."""
    try:
        # O_NONBLOCK: a FIFO planted at the path must not hang the daemon or `codi2 verify` before the type check.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file (a key is {KEY_MIN_BYTES} to {KEY_MAX_BYTES} bytes)")
        # Bounded: /dev/zero or a huge file given by mistake must not be read into memory.
        data = os.read(fd, KEY_MAX_BYTES + 1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > KEY_MAX_BYTES:
        raise ValueError(f"{path} holds more than {KEY_MAX_BYTES} bytes; a key is {KEY_MIN_BYTES} to {KEY_MAX_BYTES}")
    secret = data.rstrip(b"\r\n")
    if len(secret) < KEY_MIN_BYTES:
        raise ValueError(
            f"{path} holds {len(secret)} bytes; a key needs at least {KEY_MIN_BYTES} (head -c 32 /dev/urandom > FILE)"
        )
    return make_key(secret)


def records(bodies: list[bytes]) -> bytes:
    """Events' records (`codi2.trail.events.encode_event`) as one msgpack array, the form the link covers;
    equal to `codi2.trail.events.encode_events` of the same events."""
    return _encoder.encode([msgspec.Raw(body) for body in bodies])


def message(stream_id: str, number: int, ts: str, prev: bytes, key_id: str | None, records: bytes) -> bytes:
    """What a link is computed over: the msgpack array [1, stream_id, number, ts, prev, key_id, records]."""
    return _encoder.encode([FORMAT, stream_id, number, ts, prev, key_id, msgspec.Raw(records)])


def link(message: bytes, key: ChainKey | None) -> bytes:
    if key is None:
        return hashlib.sha256(message).digest()
    return hmac.new(key.secret, message, hashlib.sha256).digest()


def seal(stream_id: str, head: ChainHead, ts: str, records: bytes, count: int, key: ChainKey | None) -> BatchHeader:
    """The header of the batch after `head`, whose `count` events are `records`."""
    number, key_id = head.batches + 1, key.id if key else None
    made = link(message(stream_id, number, ts, head.link, key_id, records), key)
    return BatchHeader(stream_id, number, ts, head.link, made, key_id, count)


def expected_link(header: BatchHeader, records: bytes, key: ChainKey | None) -> bytes:
    """The link a header must carry if its events are `records`."""
    return link(message(header.stream_id, header.number, header.ts, header.prev, header.key_id, records), key)


def encode_header(h: BatchHeader) -> bytes:
    """A header as the journal's outbox keeps it: [1, stream_id, number, ts, prev, link, key_id, events]."""
    return _encoder.encode([FORMAT, h.stream_id, h.number, h.ts, h.prev, h.link, h.key_id, h.events])


def decode_header(blob: bytes) -> BatchHeader:
    version, *fields = _decoder.decode(blob)
    if version != FORMAT:
        raise ValueError(f"unknown batch header version {version!r}")
    return BatchHeader(*fields)
