"""Config loading: file, env and CLI precedence, derived values, and one-line errors."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DaemonProcess, run_codi2

from codi2.config import ConfigError, load_settings

SEED_TOML = """\
[server]
bind_addr = "0.0.0.0:8765"
[foundationdb]
cluster_file = "/etc/foundationdb/fdb.cluster"
cluster_string = "coditect:production@10.128.0.8:4500"
[monitoring]
watch_paths = ["/workspace"]
ignore_patterns = [".git", "node_modules", "target", "dist"]
[logging]
level = "info"
format = "json"
"""
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:

    for name in list(os.environ):
        if name.startswith("CODI2_") or name in ("TENANT_ID", "USER_ID", "SESSION_ID"):
            monkeypatch.delenv(name)


@pytest.fixture
def config_dir(tmp_path: Path) -> Path:
    """A real temp dir for config files; not called `fs`, which is pyfakefs's fixture (a dev dependency)."""
    return tmp_path


def _write(config_dir: Path, text: str) -> Path:
    path = config_dir / "codi2.toml"
    path.write_text(text)
    return path


def test_seed_config_loads_unchanged_and_means_fdb(config_dir: Path) -> None:
    settings = load_settings(_write(config_dir, SEED_TOML))
    assert settings.backend == "fdb"
    assert settings.server.host == "0.0.0.0" and settings.server.port == 8765
    assert settings.server.shutdown_timeout_s == 20.0
    assert settings.monitoring.ignore_patterns == [".git", "node_modules", "target", "dist"]
    assert settings.state_dir == Path("/workspace/.codi2")


def test_no_cluster_means_sqlite_under_state_dir(config_dir: Path) -> None:
    settings = load_settings(_write(config_dir, '[monitoring]\nwatch_paths = ["/srv/ws", "/srv/other"]\n'))
    assert settings.backend == "sqlite"
    assert settings.state_dir == Path("/srv/ws/.codi2")
    assert settings.sqlite_file == Path("/srv/ws/.codi2/audit.db")


def test_explicit_backend_wins_over_cluster(config_dir: Path) -> None:
    settings = load_settings(
        _write(config_dir, SEED_TOML + '[storage]\nbackend = "sqlite"\nsqlite_path = "/data/a.db"\n')
    )
    assert settings.backend == "sqlite"
    assert settings.sqlite_file == Path("/data/a.db")


def test_env_overrides_file_and_cli_overrides_env(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(config_dir, 'tenant_id = "from-file"\n' + SEED_TOML)
    monkeypatch.setenv("CODI2_SERVER__BIND_ADDR", "127.0.0.1:9000")
    monkeypatch.setenv("CODI2_BATCHING__MAX_EVENTS", "17")
    monkeypatch.setenv("CODI2_SERVER__SHUTDOWN_TIMEOUT_S", "2.5")
    monkeypatch.setenv("TENANT_ID", "from-env")
    monkeypatch.setenv("HOSTNAME", "workspace-pod")
    settings = load_settings(path)
    assert settings.server.port == 9000
    assert settings.batching.max_events == 17
    assert settings.server.shutdown_timeout_s == 2.5
    assert settings.tenant_id == "from-env"
    assert settings.pod == "workspace-pod"
    assert settings.monitoring.watch_paths == [Path("/workspace")]  # untouched keys keep the file's value
    assert load_settings(path, tenant_id="from-cli").tenant_id == "from-cli"


def test_logging_level_is_case_insensitive(config_dir: Path) -> None:
    assert load_settings(_write(config_dir, '[logging]\nlevel = "DEBUG"\n')).logging.level == "debug"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nport = 1\n", "server.port: unknown key"),
        ("[servr]\nbind_addr = 'x:1'\n", "servr: unknown key"),
        ("[batching]\nmax_events = 'many'\n", "batching.max_events: Input should be a valid integer"),
        ("[server]\nbind_addr = 'localhost'\n", "server.bind_addr: expected HOST:PORT"),
        ("[server]\nbind_addr = '127.0.0.1:70000'\n", "server.bind_addr: port must be a number from 0 to 65535"),
        ("[storage]\nbackend = 'mysql'\n", "storage.backend: Input should be 'sqlite' or 'fdb'"),
        ("[server]\nshutdown_timeout_s = 0\n", "server.shutdown_timeout_s: Input should be greater than 0"),
        ("[server]\nshutdown_timeout_s = -5\n", "server.shutdown_timeout_s: Input should be greater than 0"),
        ("[server]\nshutdown_timeout_s = inf\n", "server.shutdown_timeout_s: Input should be a finite number"),
        ("[server]\nshutdown_timeout_s = nan\n", "server.shutdown_timeout_s: Input should be a finite number"),
        # finite but past what a clock can add: the daemon's shutdown failed with an OverflowError
        (
            "[server]\nshutdown_timeout_s = 1e300\n",
            "server.shutdown_timeout_s: Input should be less than or equal to 86400",
        ),
        ("[server\n", "invalid TOML"),
        (
            "[foundationdb]\napi_version = 800\n",
            "foundationdb.api_version: 800 is above 730, the highest the installed foundationdb bindings (7.3.",
        ),
        (
            "[foundationdb]\napi_version = 520\n",
            "foundationdb.api_version: 520 is below 610: set 610 or higher, up to 730",
        ),
        (
            "[foundationdb]\nbatch_bytes = 9000000\n",
            "foundationdb.batch_bytes: Input should be less than or equal to 1000000",
        ),
    ],
)
def test_bad_config_names_file_key_and_problem(config_dir: Path, text: str, expected: str) -> None:
    path = _write(config_dir, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert expected in message
    assert "\n" not in message


def test_missing_file_is_an_error(config_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"/nowhere.toml: config file not found"):
        load_settings(config_dir / "nowhere.toml")


def test_bad_env_value_is_attributed_to_the_env_var(config_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CODI2_SERVER__BIND_ADDR", "nope")
    with pytest.raises(ConfigError, match=r"^env CODI2_SERVER__BIND_ADDR: server.bind_addr: expected HOST:PORT"):
        load_settings(_write(config_dir, SEED_TOML))


def test_shipped_configs_are_valid() -> None:
    prod = load_settings(REPO / "config" / "codi2.toml")
    assert prod.backend == "fdb"
    dev = load_settings(REPO / "config" / "dev.toml")
    assert dev.backend == "sqlite"
    assert dev.server.bind_addr == "127.0.0.1:8765"
    assert dev.logging.format == "console"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_codi2(*args, cwd=cwd)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (None, "config file not found"),
        ("[monitoring]\nwatch_pathz = []\n", "monitoring.watch_pathz: unknown key"),
        ("[batching]\nmax_delay_ms = 'soon'\n", "batching.max_delay_ms: Input should be a valid integer"),
        ("[server]\nbind_addr = ':x'\n", "server.bind_addr: expected HOST:PORT"),
    ],
)
def test_cli_bad_config_is_one_line_and_exit_2(tmp_path: Path, text: str | None, fragment: str) -> None:
    path = tmp_path / "codi2.toml"
    if text is not None:
        path.write_text(text)
    for args in (["--user-id", "u", "--tenant-id", "t"], ["config", "check"]):
        if args[0] == "config":
            result = _cli("config", "check", "--config", str(path))
        else:
            result = _cli("--config", str(path), *args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert str(path) in lines[0] and fragment in lines[0]
        assert "Traceback" not in result.stderr


def test_cli_run_requires_identity(tmp_path: Path) -> None:
    path = tmp_path / "codi2.toml"
    path.write_text("")
    result = _cli("run", "--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "codi2: tenant_id and user_id required to run (set --tenant-id or $TENANT_ID, --user-id or $USER_ID)"
    )


def test_cli_config_check_prints_effective_config() -> None:
    result = _cli("config", "check", "--config", str(REPO / "config" / "codi2.toml"))
    assert result.returncode == 0, result.stderr
    assert '"backend": "fdb"' in result.stdout
    assert '"dir": "/workspace/.codi2"' in result.stdout


def test_cli_version_and_help() -> None:
    from codi2 import __version__

    version = _cli("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"codi2 {__version__}"
    for args in (["--help"], ["run", "--help"], ["events", "--help"], ["config", "check", "--help"]):
        result = _cli(*args)
        assert result.returncode == 0 and "usage: codi2" in result.stdout
    assert "--follow" in _cli("events", "--help").stdout
    assert "--tenant-id" in _cli("run", "--help").stdout


def test_cli_unknown_option_is_usage_error() -> None:
    result = _cli("events", "--bogus")
    assert result.returncode == 2
    assert "unrecognized arguments: --bogus" in result.stderr


@pytest.mark.parametrize(
    ("variables", "fragment"),
    [
        (
            {"CODI2_MONITORING__WATCH_PATHS": "[bad"},
            "env CODI2_MONITORING__WATCH_PATHS: monitoring.watch_paths: not valid JSON",
        ),
        (
            {"CODI2_MONITORING__INITIAL_SCAN": "record", "CODI2_MONITORING__IGNORE_PATTERNS": "[1"},
            "env CODI2_MONITORING__IGNORE_PATTERNS: monitoring.ignore_patterns: not valid JSON",
        ),
        ({"CODI2_MONITORING": "{bad"}, "env CODI2_MONITORING: monitoring: not valid JSON"),
        ({"CODI2_FOUNDATIONDB__ROOT_PREFIX": '["a"'}, "env CODI2_FOUNDATIONDB__ROOT_PREFIX: foundationdb.root_prefix"),
    ],
)
def test_cli_env_value_that_is_not_json_is_one_line_and_exit_2(
    tmp_path: Path, variables: dict[str, str], fragment: str
) -> None:
    path = tmp_path / "codi2.toml"
    path.write_text("")
    result = run_codi2("--config", str(path), "--user-id", "u", "--tenant-id", "t", env=variables)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"codi2: {fragment}") and result.stderr.count("\n") == 1, result.stderr


def test_cli_config_that_is_not_utf8_is_one_line_and_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "codi2.toml"
    path.write_bytes(b"\xff\xfe[server]\n")
    result = _cli("--config", str(path), "--user-id", "u", "--tenant-id", "t")
    assert result.returncode == 2
    assert result.stderr == f"codi2: {path}: not UTF-8 text (byte 0): TOML files are UTF-8\n"


def test_a_key_without_effect_still_loads_and_is_named_by_config_check_and_run(
    tmp_path: Path, workspace: Path, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """`[foundationdb] event_id_retention_hours` was layout v1's: a fleet's config map that still sets it
    loads (exit 0), and both `config check` and the running daemon say, once, that it does nothing."""
    path = tmp_path / "old.toml"
    path.write_text("[foundationdb]\nevent_id_retention_hours = 72\n")
    result = _cli("config", "check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "event_id_retention_hours" in line]
    assert len(warned) == 1 and warned[0].startswith("codi2: warning:") and "no effect" in warned[0], result.stderr
    quiet = tmp_path / "new.toml"
    quiet.write_text("")
    assert "warning" not in _cli("config", "check", "--config", str(quiet)).stderr
    daemon = daemon_factory("[foundationdb]\nevent_id_retention_hours = 72\n")
    ignored = [line for line in daemon.logs if line.get("event") == "config_key_ignored"]
    assert len(ignored) == 1 and "event_id_retention_hours" in ignored[0]["detail"], ignored
