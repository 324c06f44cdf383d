"""Numbered schema migrations kept in SQLite's `PRAGMA user_version`, shared by the journal and the SQLite
store because, with the SQLite backend, both live in one file.

One file then holds two schemas with their own histories, so `user_version` is split: each owner keeps its
version in 16 bits of its own (`Schema.shift`) and never touches the other's. A schema is a list of steps;
step *i* takes the schema from version *i* to *i + 1*, inside the caller's write transaction, so a failed
migration leaves the file as it was. Step 1 adopts a file made before versions were kept (version 0 but
with tables): it is the one step written to accept what it finds. A version newer than the steps this
release knows is refused, never migrated down.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass

Step = Callable[[sqlite3.Connection], None]
FIELD_MASK = 0xFFFF
BUSY_TIMEOUT_S = 2.0  # another writer on the file (a tool, a reader's lock): fail, report, retry


class SchemaTooNew(Exception):
    """The file was written by a newer release: this one does not know its layout (`schema` names whose)."""

    def __init__(self, schema: str, found: int, latest: int) -> None:
        super().__init__(f"{schema} schema {found} is newer than this release reads ({latest})")
        self.schema = schema


def execute_script(db: sqlite3.Connection, script: str) -> None:
    """Run `;`-separated DDL statement by statement: `executescript` would first commit the caller's
    transaction, and a migration must stay inside it."""
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def user_version(db: sqlite3.Connection) -> int:
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


@dataclass(frozen=True, slots=True)
class Schema:
    """One owner's migrations and where in `user_version` its version lives."""

    name: str
    shift: int  # 0 or 16: the low or the high half of user_version (a signed 32-bit integer)
    steps: Sequence[Step]

    @property
    def latest(self) -> int:
        return len(self.steps)

    def version(self, db: sqlite3.Connection) -> int:
        return (user_version(db) >> self.shift) & FIELD_MASK

    def current(self, db: sqlite3.Connection) -> bool:
        """Whether `migrate` has nothing to do (a read: no write lock is taken); raises SchemaTooNew."""
        found = self.version(db)
        if found > self.latest:
            raise SchemaTooNew(self.name, found, self.latest)
        return found == self.latest

    def migrate(self, db: sqlite3.Connection) -> None:
        """Run the missing steps and record the version, inside the caller's write transaction."""
        if self.current(db):
            return
        for step in self.steps[self.version(db) :]:
            step(db)
        whole = user_version(db) & ~(FIELD_MASK << self.shift)
        db.execute(f"PRAGMA user_version = {whole | self.latest << self.shift}")
