"""`codi2 completion bash|zsh`: the scripts are generated from the real parser, and bash completes with them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BASH = shutil.which("bash")


def _script(shell: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "codi2", "completion", shell], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("completion") / "codi2.bash"
    path.write_text(_script("bash"))
    return path


def _complete(script: Path, words: list[str], cwd: Path | None = None) -> list[str]:
    """What bash offers for the last word: source the script, then call the function it registered for
    `codi2` with COMP_WORDS and COMP_CWORD set as bash's programmable completion sets them."""
    if BASH is None:
        pytest.skip("no bash on this machine")
    line = " ".join(words)
    program = f"""
source {script}
spec=$(complete -p codi2) || exit 3
function=$(sed -E 's/.* -F ([^ ]+) .*/\\1/' <<<"$spec")
COMP_WORDS=({" ".join(f"'{w}'" for w in words)})
COMP_CWORD={len(words) - 1}
COMP_LINE='{line}'
COMP_POINT={len(line)}
"$function" codi2 '{words[-1]}' '{words[-2]}'
printf '%s\\n' "${{COMPREPLY[@]}}"
"""
    result = subprocess.run([BASH, "--norc", "-c", program], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert result.returncode == 0, result.stderr
    return sorted(filter(None, result.stdout.split("\n")))


def test_bash_completes_a_subcommand(bash_script: Path) -> None:
    assert _complete(bash_script, ["codi2", "con"]) == ["config"]
    assert _complete(bash_script, ["codi2", "config", ""]) == ["check", "reference"]
    assert "completion" in _complete(bash_script, ["codi2", ""])


def test_bash_completes_an_option_and_its_choices(bash_script: Path) -> None:
    assert _complete(bash_script, ["codi2", "events", "--fo"]) == ["--follow", "--format"]
    assert _complete(bash_script, ["codi2", "events", "--format", ""]) == ["ecs", "jsonl", "ocsf", "table"]
    assert _complete(bash_script, ["codi2", "completion", ""]) == ["bash", "zsh"]


def test_bash_completes_config_paths_with_files(bash_script: Path, tmp_path: Path) -> None:
    (tmp_path / "codi2.toml").write_text("")
    assert _complete(bash_script, ["codi2", "run", "--config", "co"], cwd=tmp_path) == ["codi2.toml"]


def test_the_zsh_script_is_a_completion_function_for_codi2() -> None:
    script = _script("zsh")
    assert script.startswith("#compdef codi2")
    assert "reference" in script and "--tenant-id" in script
    zsh = shutil.which("zsh")
    if zsh is not None:  # parse it where zsh exists; bash is the shell the behaviour is tested in
        checked = subprocess.run([zsh, "-n"], input=script, capture_output=True, text=True, timeout=60)
        assert checked.returncode == 0, checked.stderr
