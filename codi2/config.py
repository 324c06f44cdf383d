"""Every setting of the daemon in one place, loaded with pydantic-settings.

Precedence (highest first): CLI flags (passed as init values), environment (`CODI2_SECTION__KEY`, and
`USER_ID` / `TENANT_ID` / `SESSION_ID` / `HOSTNAME` for identity), then the TOML file. This module imports
nothing else of codi2, so every other module can depend on it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tomllib
import typing
from contextvars import ContextVar
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, Literal

import fdb.apiversion
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "CODI2_"
STATE_DIR_NAME = ".codi2"
JOURNAL_FILE_NAME = "journal.db"
_toml_path: ContextVar[Path | None] = ContextVar("codi2_toml_path", default=None)


class ConfigError(Exception):
    """A configuration problem, already phrased as one line for the user."""


def split_bind_addr(value: str) -> tuple[str, int]:
    """Split `host:port` or `[v6]:port`; raise ValueError with a reason a person can act on."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, got {port_text!r}")
    return host, int(port_text)


def _check_bind_addr(value: str) -> str:
    split_bind_addr(value)
    return value


BindAddr = Annotated[str, AfterValidator(_check_bind_addr)]


def _check_path(value: Path) -> Path:
    """A NUL cannot reach a system call: refused here rather than as a crash at the first open."""
    if "\x00" in str(value):
        raise ValueError("path contains a NUL byte")
    return value


def _nonempty_path(value: Any) -> Any:
    """pydantic turns "" into Path("."), so an empty string is refused before it becomes a path."""
    if isinstance(value, str | bytes) and not value:
        raise ValueError("empty path: name a directory or file")
    return value


FilePath = Annotated[Path, BeforeValidator(_nonempty_path), AfterValidator(_check_path)]

# Below 610, `on_error` resets a transaction's timeout and retry limit, which the FDB sink relies on.
FDB_API_MIN = 610


def _check_api_version(value: int) -> int:
    """The installed `fdb` bindings cap the API version (their libfdb_c must support it), not the cluster."""
    latest = fdb.apiversion.LATEST_API_VERSION
    if value > latest:
        raise ValueError(
            f"{value} is above {latest}, the highest the installed foundationdb bindings ({version('foundationdb')})"
            f" support: set {latest} or lower (README: client/server version matrix)"
        )
    if value < FDB_API_MIN:
        raise ValueError(f"{value} is below {FDB_API_MIN}: set {FDB_API_MIN} or higher, up to {latest}")
    return value


class Section(BaseModel):
    """A TOML table: unknown keys are errors so typos never pass silently. The string under each field is
    its description: `codi2 config reference` reads it from this source into docs/config.md (pydantic's
    `use_attribute_docstrings` would parse this file at every start of the daemon)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ServerSettings(Section):
    bind_addr: BindAddr = "0.0.0.0:8765"
    """Where the health server listens (`/livez`, `/readyz`, `/status`, `/metrics`): HOST:PORT or
    [V6]:PORT; port 0 picks a free one."""
    shutdown_timeout_s: float = Field(default=20.0, gt=0, le=86_400, allow_inf_nan=False)
    """How long a shutdown (SIGTERM, SIGINT) may take, in seconds: reading what the kernel queued,
    journaling it and shipping the outbox. What is left then stays in the journal for the next start; a
    second signal stops at once. Kubernetes' `terminationGracePeriodSeconds` must exceed it, else SIGKILL
    cuts the drain short (`codi2 provision` renders it from this value)."""

    @property
    def host(self) -> str:
        return split_bind_addr(self.bind_addr)[0]

    @property
    def port(self) -> int:
        return split_bind_addr(self.bind_addr)[1]


class FoundationDBSettings(Section):
    cluster_file: FilePath | None = None
    """The FoundationDB cluster file, used when it exists; `FDB_CLUSTER_FILE` in the environment wins over it."""
    cluster_string: str | None = None
    """The cluster string (`desc:id@host:port`), written to `<state dir>/fdb.cluster` when no cluster file
    is found, or when the one found there names another cluster; naming a cluster makes `fdb` the default
    backend."""
    api_version: Annotated[int, AfterValidator(_check_api_version)] = 730
    """The FoundationDB API version: from 610 up to what the installed Python bindings support (730); the
    installed `libfdb_c` must support it too (see the README's version matrix)."""
    root_prefix: list[str] = Field(default_factory=lambda: ["codi2"])
    """Tuple prefix of every key codi2 writes; tenants are scoped below it."""
    transaction_timeout_ms: int = Field(default=5000, ge=100, le=60_000)
    """Time limit of one FoundationDB transaction, in milliseconds."""
    retry_limit: int = Field(default=10, ge=0, le=1000)
    """Retries of one transaction on retryable errors before the batch counts as failed (and is retried later)."""
    batch_bytes: int = Field(default=1_000_000, ge=10_000, le=1_000_000)
    """One transaction's size as FoundationDB counts it (mutations and conflict ranges); larger batches are
    split. FoundationDB advises at most 1 MB."""
    event_id_retention_hours: float | None = Field(default=None, gt=0, le=24 * 365 * 10)
    """No effect since layout v2 (docs/fdb-layout.md); accepted so that configs written for earlier releases
    still load, with a warning. A re-sent batch lands once by its stream's progress key, not by per-event id
    keys kept this long, and the id keys of salvaged batches leave with the trail (`[retention]`)."""
    tls_cert_file: FilePath | None = None
    """codi2's client certificate (PEM) for mutual TLS with the cluster; set with `tls_key_file`. Without TLS
    the connection is neither encrypted nor authenticated (docs/security.md)."""
    tls_key_file: FilePath | None = None
    """The private key of `tls_cert_file` (PEM, without a passphrase)."""
    tls_ca_file: FilePath | None = None
    """The CA bundle (PEM) the cluster's certificates are checked against."""
    tls_verify_peers: str | None = None
    """FoundationDB's peer verification pattern, e.g. `Check.Valid=1,S.CN=fdb-server`; unset, the client's
    default applies."""

    @model_validator(mode="after")
    def _tls_pair(self) -> FoundationDBSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        return self


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # not there (yet): nothing to compare
        return None
    return st.st_dev, st.st_ino


def _same_or_inside(inner: Path, outer: Path) -> str | None:
    """How resolved `inner` overlaps resolved `outer` when realpath cannot tell: a bind mount shows one
    directory at two paths, and inotify gives both the same watch, so a change reaches one root's trail only.
    None when they are apart (or either is missing)."""
    outer_id = _identity(outer)
    if outer_id is None:
        return None
    if _identity(inner) == outer_id:
        return f"{inner} and {outer} are the same directory"
    above = next((p for p in inner.parents if _identity(p) == outer_id), None)
    return None if above is None else f"{inner} lies inside {outer} (as {above})"


class MonitoringSettings(Section):
    watch_paths: list[FilePath] = Field(default_factory=lambda: [Path("/workspace")], min_length=1)
    """Directories watched recursively; every change below them becomes an audit event."""
    ignore_patterns: list[str] = Field(default_factory=lambda: [".git", "node_modules", "target", "dist"])
    """Gitignore-style patterns of trees that get no watch and no events; a bare name matches at any depth."""
    hash_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0, le=1 << 40)
    """Files up to this size get a sha256 in their event; larger ones get `sha256 = null`. Each change of a file
    within the limit is read whole on the journal thread, and every other change waits meanwhile: about
    1.2 GB/s of one core (sha256 with the CPU's SHA extensions, file in the page cache, measured on the build
    machine), so the default costs at most some 55 ms per change, 8 GiB about 7 s, and a multi-GB file
    rewritten continuously keeps a core busy and delays unrelated changes by seconds (/status
    `pipeline.hashing` shows the hash in progress)."""
    initial_scan: Literal["record", "silent"] = "record"
    """On the very first start: `record` emits `created` (origin `baseline`) for everything there, so the
    trail is complete from day one; `silent` only notes it in the index (0.1's default). 0.1's spellings
    `events` and `baseline` are read as `record` and `silent`."""
    rescan_interval_s: float = Field(default=60.0, ge=1.0, le=86_400.0)
    """How often directories without a watch (watch limit, permissions) are tried again and diffed against
    the index, in seconds; also how often hard-linked files with names outside the watched trees are
    re-statted (at most 1,000 a round), which bounds how late a write through such a name is recorded."""
    session_file: FilePath | None = None
    """A file the IDE keeps the current session id in (e.g. `/workspace/.theia/session`): read again when it
    changes (a stat at each batch cut), and each event carries the session current when it was recorded.
    Unset, missing, empty, not a regular file or reached through a symlink inside a watch root (where the user
    may plant one): the fixed `session_id` (`--session-id`, `$SESSION_ID`)."""

    @field_validator("watch_paths")
    @classmethod
    def _disjoint(cls, paths: list[Path]) -> list[Path]:
        """Roots may not overlap (after resolving symlinks, and by device and inode through bind mounts): the
        watcher gives each directory one watch, so a change inside the overlap would reach only one root's
        trail, and each root must be complete."""
        resolved = [(p, Path(os.path.realpath(p))) for p in paths]
        for i, (a, ra) in enumerate(resolved):
            for b, rb in resolved[i + 1 :]:
                if ra == rb:
                    raise ValueError(f"{a} and {b} are the same directory ({ra}): list it once")
                inner, outer = (b, a) if rb.is_relative_to(ra) else (a, b) if ra.is_relative_to(rb) else (None, None)
                if inner is not None:
                    raise ValueError(
                        f"{inner} lies inside {outer} (after resolving symlinks): overlapping roots are refused:"
                        f" keep only {outer}, which covers it"
                    )
                if (same := _same_or_inside(rb, ra)) is not None or (same := _same_or_inside(ra, rb)) is not None:
                    raise ValueError(
                        f"{same} (a bind mount shows one directory at two paths): overlapping roots are refused"
                    )
        return paths

    @field_validator("initial_scan", mode="before")
    @classmethod
    def _legacy_initial_scan(cls, value: Any) -> Any:
        """0.1 spelled these "events" and "baseline" (then the default, which recorded nothing)."""
        return {"events": "record", "baseline": "silent"}.get(value, value)


class SpoolSettings(Section):
    max_bytes: int = Field(default=1 << 30, ge=1 << 20, le=1 << 50)
    """Bytes of journaled, uncommitted batches at which journaling pauses until the store catches up; changes
    meanwhile coalesce (a `gap` event marks it), none is dropped."""
    fsync: bool = True
    """Make every batch durable (fsync) before it counts as observed; off survives a crash of codi2 but not
    of the machine."""


class StorageSettings(Section):
    backend: Literal["sqlite", "fdb"] | None = None
    """The store: unset means `fdb` when a cluster is named (`cluster_file` or `cluster_string`), else `sqlite`."""
    sqlite_path: FilePath | None = None
    """The SQLite database of the `sqlite` backend; unset means `<state dir>/audit.db`."""


class StateSettings(Section):
    dir: FilePath | None = None
    """The daemon's own files (spool, index, barrier), never watched or audited; unset means
    `<first watch path>/.codi2`."""


class BatchingSettings(Section):
    max_events: int = Field(default=1000, ge=1, le=100_000)
    """Flush a batch once it holds this many events."""
    max_bytes: int = Field(default=1_000_000, ge=1024, le=1 << 30)
    """Flush a batch once its events reach this many (estimated) bytes."""
    max_delay_ms: int = Field(default=200, ge=1, le=60_000)
    """Flush a batch at the latest this many milliseconds after its first change; also the window in which
    repeated changes to one path coalesce into one event."""


class IntegritySettings(Section):
    key_file: FilePath | None = None
    """A file holding the key (at least 32 bytes, e.g. `head -c 32 /dev/urandom`; mount it from a Secret) that
    makes every batch's chain link an HMAC-SHA256 instead of a SHA-256, so that someone who can write the
    store but lacks the key cannot forge a consistent trail. Its id is recorded in each batch it seals: to
    rotate it, replace the file and restart, and give `codi2 verify` every key still in the trail
    (docs/trail-format.md)."""


DURATION = re.compile(r"(?P<count>[0-9]+)(?P<unit>[smhdw])")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


# A cutoff this far back is still a date (year 1 is the first one); unset keeps a trail for ever.
MAX_DURATION_S = 100 * 365 * 86_400


def duration_s(text: str) -> int:
    """A duration such as "90d", "12h", "30m", "45s", "2w" in seconds, at most 100 years; ValueError otherwise."""
    m = DURATION.fullmatch(text.strip())
    if m is None or int(m["count"]) == 0:
        raise ValueError(f"expected a duration such as 90d, 12h, 30m or 2w, got {text!r}")
    seconds = int(m["count"]) * DURATION_UNITS[m["unit"]]
    if seconds > MAX_DURATION_S:
        raise ValueError(f"a duration is at most 100 years (36500d), got {text!r}")
    return seconds


def _check_duration(value: str) -> str:
    duration_s(value)
    return value


class RetentionSettings(Section):
    max_age: Annotated[str, AfterValidator(_check_duration)] | None = None
    """How long the trail is kept (a duration: `90d`, `12h`, `2w`; at most 100 years); unset keeps it for
    ever. With SQLite the daemon prunes what is older itself, at start and then daily; with FoundationDB a
    pod never deletes trail data: the retention CronJob (`codi2 archive` then `codi2 prune`, which take
    their cutoff from it) does (docs/retention.md)."""

    @property
    def max_age_s(self) -> int | None:
        return None if self.max_age is None else duration_s(self.max_age)


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    """Lowest level logged (case-insensitive)."""
    format: Literal["json", "console"] = "json"
    """`json`: one JSON object per line on stderr, for log collectors; `console`: readable lines for a terminal."""

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class Settings(BaseSettings):
    """The whole configuration. Derived paths (`state_dir`, `sqlite_file`, `backend`) are properties."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    server: ServerSettings = ServerSettings()
    """The health port."""
    foundationdb: FoundationDBSettings = FoundationDBSettings()
    """The FoundationDB store (`backend = "fdb"`)."""
    monitoring: MonitoringSettings = MonitoringSettings()
    """What is watched."""
    storage: StorageSettings = StorageSettings()
    """Which store the events are committed to."""
    spool: SpoolSettings = SpoolSettings()
    """The durable spool between the batcher and the store."""
    state: StateSettings = StateSettings()
    """Where the daemon keeps its own files."""
    batching: BatchingSettings = BatchingSettings()
    """When a batch of events is cut."""
    integrity: IntegritySettings = IntegritySettings()
    """The hash chain that makes the trail tamper-evident."""
    retention: RetentionSettings = RetentionSettings()
    """How long the trail is kept, and who removes what is older."""
    logging: LoggingSettings = LoggingSettings()
    """Logs (structlog, on stderr)."""

    tenant_id: str | None = Field(default=None, validation_alias=AliasChoices("tenant_id", "TENANT_ID"))
    """Tenant every event is scoped to; required to run (or `--tenant-id`)."""
    user_id: str | None = Field(default=None, validation_alias=AliasChoices("user_id", "USER_ID"))
    """User the events belong to; required to run (or `--user-id`)."""
    session_id: str | None = Field(default=None, validation_alias=AliasChoices("session_id", "SESSION_ID"))
    """IDE session recorded in each event (or `--session-id`)."""
    pod: str = Field(default_factory=socket.gethostname, validation_alias=AliasChoices("pod", "HOSTNAME"))
    """Pod recorded in each event; in Kubernetes `HOSTNAME` is the pod name."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = _toml_path.get()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    @property
    def backend(self) -> Literal["sqlite", "fdb"]:
        """An unset backend means FDB when a cluster is named, so production never writes a local file."""
        if self.storage.backend is not None:
            return self.storage.backend
        fdb = self.foundationdb
        return "fdb" if fdb.cluster_file or fdb.cluster_string else "sqlite"

    @property
    def watch_roots(self) -> list[Path]:
        return [Path(os.path.abspath(p)) for p in self.monitoring.watch_paths]

    @property
    def state_dir(self) -> Path:
        if self.state.dir is not None:
            return Path(os.path.abspath(self.state.dir))
        return self.watch_roots[0] / STATE_DIR_NAME

    @property
    def sqlite_file(self) -> Path:
        if self.storage.sqlite_path is not None:
            return Path(os.path.abspath(self.storage.sqlite_path))
        return self.state_dir / "audit.db"

    @property
    def journal_file(self) -> Path:
        return self.state_dir / JOURNAL_FILE_NAME

    def private_paths(self) -> list[Path]:
        """The daemon's own places, never audit events (recording them would feed back for ever): its state
        directory, and a SQLite store with the files beside it. The daemon and `verify --disk` both use this."""
        return [self.state_dir, *(_with_companions(self.sqlite_file) if self.backend == "sqlite" else [])]

    def private_files(self) -> list[Path]:
        """The files the daemon holds open and locked (journal, store, their WAL and shm, the lock files): never
        opened by a walk, under any name (a hard link to one included)."""
        dbs = [self.journal_file, *([self.sqlite_file] if self.backend == "sqlite" else [])]
        return [self.state_dir / "lock", *(p for db in dbs for p in _with_companions(db))]

    def ignored_keys(self) -> list[str]:
        """Keys set in this config that no longer do anything, each as one line saying so: `run` logs them,
        `config check` prints them, and neither refuses the config (a fleet's config maps outlive releases)."""
        ignored = []
        if self.foundationdb.event_id_retention_hours is not None:
            ignored.append(
                "[foundationdb] event_id_retention_hours has no effect since layout v2 (a re-sent batch lands"
                " once by its stream's progress key; docs/fdb-layout.md): remove it"
            )
        return ignored

    def effective(self) -> dict[str, Any]:
        """The config as the daemon will use it, derived values filled in (for `config check`)."""
        data = self.model_dump(mode="json")
        data["storage"]["backend"] = self.backend
        data["storage"]["sqlite_path"] = str(self.sqlite_file) if self.backend == "sqlite" else None
        data["state"]["dir"] = str(self.state_dir)
        data["monitoring"]["watch_paths"] = [str(p) for p in self.watch_roots]
        return data


def _with_companions(db: Path) -> list[Path]:
    """A SQLite file and the files SQLite and the store lock keep beside it."""
    return [db, *(db.with_name(db.name + suffix) for suffix in ("-wal", "-shm", "-journal", ".lock"))]


_IDENTITY_ENV = {
    "tenant_id": "TENANT_ID",
    "user_id": "USER_ID",
    "session_id": "SESSION_ID",
    "pod": "HOSTNAME",
}


def _where(path: Path | None, loc: tuple[Any, ...], cli_keys: set[str]) -> str:
    """Name the source a bad value most likely came from: a CLI flag, the environment or the file."""
    top = str(loc[0]) if loc else ""
    if top in cli_keys:
        return f"--{top.replace('_', '-')}"
    env_name = _IDENTITY_ENV.get(top) or ENV_PREFIX + "__".join(str(p) for p in loc).upper()
    if env_name in os.environ:
        return f"env {env_name}"
    return str(path) if path is not None else "defaults"


def _describe(error: ErrorDetails) -> str:
    if error["type"] == "extra_forbidden":
        return "unknown key (every key is listed in docs/config.md and by `codi2 config reference`)"
    if error["type"] == "missing":
        return "required"
    msg = str(error["msg"])
    return msg.removeprefix("Value error, ")


def _settings_error(exc: SettingsError) -> str:
    """One line for pydantic-settings' own error, which names only the table: the variable and the problem."""
    m = re.search(r'field "(\w+)"', str(exc))
    table = m[1] if m else ""
    cause = exc.__cause__
    problem = f"not valid JSON ({cause})" if isinstance(cause, json.JSONDecodeError) else str(cause or exc)
    prefix = ENV_PREFIX + table.upper()
    names = sorted(n for n in os.environ if n.upper() == prefix or n.upper().startswith(prefix + "__"))
    for name in sorted(names, key=lambda n: not _parsed_as_json(n)):  # those read as JSON first
        try:
            json.loads(os.environ[name])
        except ValueError:
            key = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            return f"env {name}: {key}: {problem}"
    return f"env {prefix}*: {table or '(top level)'}: {problem}"


def _parsed_as_json(env_name: str) -> bool:
    """Whether pydantic-settings parses this variable as JSON: a whole table, or a list or table in one."""
    table, _, key = env_name[len(ENV_PREFIX) :].lower().partition("__")
    field = Settings.model_fields.get(table)
    if field is None or not key:
        return field is not None
    sub = getattr(field.annotation, "model_fields", {}).get(key)
    return sub is not None and typing.get_origin(sub.annotation) in (list, dict, tuple, set)


def load_settings(path: Path | None, **cli: Any) -> Settings:
    """Load the TOML file, env and CLI values; turn every failure into one ConfigError line."""
    cli = {k: v for k, v in cli.items() if v is not None}
    if path is not None:
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        if not path.is_file():
            raise ConfigError(f"{path}: config path is not a regular file")
    token = _toml_path.set(path)
    try:
        return Settings(**cli)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}): TOML files are UTF-8") from None
    except SettingsError as exc:  # a value the environment gives as JSON that does not parse
        raise ConfigError(_settings_error(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except RecursionError:
        raise ConfigError(f"{path}: tables or arrays nested too deeply to read") from None
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            key = ".".join(str(p) for p in loc) or "(top level)"
            problems.append(f"{_where(path, loc, set(cli))}: {key}: {_describe(error)}")
        raise ConfigError("; ".join(problems)) from None
    finally:
        _toml_path.reset(token)
