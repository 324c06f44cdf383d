"""docs/config.md is generated from the settings model: it lists every key, its environment variable really
sets the key, the seed's keys are marked, and the file on disk is what `codi2 config reference` prints."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from test_config import SEED_TOML

from codi2.cli.config_reference import SEED_KEYS, Key, tables
from codi2.config import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "config.md"


def _keys() -> list[Key]:
    return [key for _, _, keys in tables() for key in keys]


def _leaves(data: dict[str, object], prefix: str = "") -> set[str]:
    keys = set()
    for name, value in data.items():
        if isinstance(value, dict):
            keys |= _leaves(value, f"{prefix}{name}.")
        else:
            keys.add(prefix + name)
    return keys


def test_docs_config_md_is_what_codi2_config_reference_prints() -> None:
    printed = subprocess.run(
        [sys.executable, "-m", "codi2", "config", "reference"], capture_output=True, text=True, timeout=60
    )
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout == DOC.read_text(), "docs/config.md drifted from the settings model: run `make docs`"


def test_every_key_of_the_model_is_documented_with_a_description() -> None:
    documented = {key.dotted for key in _keys()}
    assert documented == _leaves(Settings().model_dump())
    assert all(key.description and key.type and key.default and key.env for key in _keys())


def test_the_seeds_keys_are_marked() -> None:
    seed = _leaves(tomllib.loads(SEED_TOML))
    assert seed == SEED_KEYS
    assert {key.dotted for key in _keys() if key.seed} == seed
    text = DOC.read_text()
    for key in seed:
        assert f"| `{key.rsplit('.', 1)[-1]}` **seed** |" in text


@pytest.mark.parametrize(
    ("dotted", "value", "expected"),
    [
        ("server.bind_addr", "127.0.0.1:9", "127.0.0.1:9"),
        ("monitoring.watch_paths", '["/srv/ws"]', [Path("/srv/ws")]),
        ("spool.fsync", "false", False),
        ("batching.max_events", "17", 17),
        ("tenant_id", "acme", "acme"),
        ("pod", "workspace-7", "workspace-7"),
    ],
)
def test_the_documented_environment_variable_sets_the_key(
    monkeypatch: pytest.MonkeyPatch, dotted: str, value: str, expected: object
) -> None:
    (key,) = [k for k in _keys() if k.dotted == dotted]
    monkeypatch.setenv(key.env.strip("`"), value)
    settings: object = load_settings(None)
    for part in dotted.split("."):
        settings = getattr(settings, part)
    assert settings == expected


def test_types_and_defaults_are_written_as_toml_values() -> None:
    rows = {key.dotted: key for key in _keys()}
    assert rows["server.bind_addr"].default == '`"0.0.0.0:8765"`'
    assert rows["monitoring.ignore_patterns"].default == '`[".git", "node_modules", "target", "dist"]`'
    assert rows["spool.max_bytes"].default == "`1_073_741_824`"
    assert rows["storage.backend"].default == "unset"
    assert rows["pod"].default == "computed at start-up: `gethostname()`"
    assert rows["foundationdb.transaction_timeout_ms"].type == "integer (≥ 100, ≤ 60_000)"
    assert rows["logging.format"].type == '`"json"` or `"console"`'


def test_config_check_points_to_the_reference_on_an_unknown_key(tmp_path: Path) -> None:
    config = tmp_path / "codi2.toml"
    config.write_text("[server]\nport = 8765\n")
    result = subprocess.run(
        [sys.executable, "-m", "codi2", "config", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"codi2: {config}: server.port: unknown key "
        "(every key is listed in docs/config.md and by `codi2 config reference`)\n"
    )
