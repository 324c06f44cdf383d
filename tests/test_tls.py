"""FoundationDB TLS: the settings reach the bindings' network options before the client's network starts
(observed at the C boundary of the real bindings, over the fake libfdb_c, which accepts and ignores
them), and `codi2 test` checks the files, on real certificates, with one line per problem."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fakefdb
import fdb.fdboptions
import pytest
from tls_certs import DAY, NOW, TlsFiles, issue, other_key

from codi2.cli.tls import file_problems
from codi2.config import ConfigError, load_settings

# Records every network option and the network's set-up as the bindings hand them to libfdb_c.
RECORD_NETWORK_CALLS = """
import json, sys
from pathlib import Path
from codi2.config import load_settings
from codi2.stores.fdb.client import load_fdb
from codi2.stores.fdb.sink import open_fdb_sink

fdb = load_fdb(730)  # as open_fdb_sink does first; the library's functions exist from here
capi, calls = fdb.impl._capi, []
set_option, setup_network = capi.fdb_network_set_option, capi.fdb_setup_network

def recording_set_option(code, param, length):
    calls.append(["option", code, param[:length].decode() if param else None])
    return set_option(code, param, length)

def recording_setup_network():
    calls.append(["setup_network"])
    return setup_network()

capi.fdb_network_set_option, capi.fdb_setup_network = recording_set_option, recording_setup_network
open_fdb_sink(load_settings(Path(sys.argv[1]), tenant_id="t1"), writer=True)
print(json.dumps(calls))
"""


def _config(tmp_path: Path, tls: TlsFiles | None, verify_peers: str | None = None) -> Path:
    lines = [
        "[foundationdb]",
        'cluster_string = "test:abc@127.0.0.1:4500"',
        "transaction_timeout_ms = 2000",
    ]
    if tls is not None:
        lines += [f"tls_cert_file = {json.dumps(str(tls.cert))}", f"tls_key_file = {json.dumps(str(tls.key))}"]
        lines += [f"tls_ca_file = {json.dumps(str(tls.ca))}"]
    if verify_peers is not None:
        lines.append(f"tls_verify_peers = {json.dumps(verify_peers)}")
    lines += ["[state]", f"dir = {json.dumps(str(tmp_path / 'state'))}"]
    config = tmp_path / "codi2.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def _on_fake(fake_libfdb_c: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **fakefdb.child_env(fake_libfdb_c, tmp_path / "fakefdb.sqlite")}
    env.pop("FDB_CLUSTER_FILE", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, env=env)


def test_tls_options_reach_the_bindings_before_the_network_starts(tmp_path: Path, fake_libfdb_c: Path) -> None:
    code = {name: value[0] for name, value in fdb.fdboptions.NetworkOption.items()}
    tls = issue(tmp_path / "tls")
    with_tls = _config(tmp_path, tls, verify_peers="Check.Valid=1,S.CN=fdb-server")
    recorded = _on_fake(fake_libfdb_c, tmp_path, "-c", RECORD_NETWORK_CALLS, str(with_tls))
    assert recorded.returncode == 0, recorded.stderr
    assert json.loads(recorded.stdout) == [
        ["option", code["TLS_cert_path"], str(tls.cert)],
        ["option", code["TLS_key_path"], str(tls.key)],
        ["option", code["TLS_ca_path"], str(tls.ca)],
        ["option", code["TLS_verify_peers"], "Check.Valid=1,S.CN=fdb-server"],
        ["setup_network"],
    ]
    without = _on_fake(fake_libfdb_c, tmp_path, "-c", RECORD_NETWORK_CALLS, str(_config(tmp_path, None)))
    assert without.returncode == 0, without.stderr
    assert json.loads(without.stdout) == [["setup_network"]]


def test_cert_and_key_go_together(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[foundationdb]\ntls_cert_file = "/etc/foundationdb/tls.crt"\n')
    with pytest.raises(ConfigError) as error:
        load_settings(config)
    assert str(error.value) == (
        f"{config}: foundationdb: tls_cert_file and tls_key_file go together: set both or neither"
    )


def test_good_files_pass_and_every_bad_one_is_one_line_naming_it(tmp_path: Path) -> None:
    good = issue(tmp_path / "good")
    assert file_problems(good.cert, good.key, good.ca) == []
    expired = issue(tmp_path / "expired", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    future = issue(tmp_path / "future", not_before=NOW + DAY, not_after=NOW + 30 * DAY)
    encrypted = issue(tmp_path / "encrypted", passphrase=b"secret")
    stranger = other_key(tmp_path / "stranger.key")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not PEM at all\n")
    missing = tmp_path / "missing.pem"
    cases = [
        ((expired.cert, expired.key, good.ca), [f"certificate {expired.cert}: CN=codi2 expired on "]),
        ((future.cert, future.key, None), [f"certificate {future.cert}: CN=codi2 is not valid before "]),
        ((good.cert, stranger, None), [f"key {stranger}: does not belong to certificate {good.cert} (CN=codi2)"]),
        ((good.cert, encrypted.key, None), [f"key {encrypted.key}: encrypted; codi2 needs the key without"]),
        ((good.cert, garbage, None), [f"key {garbage}: not a PEM private key"]),
        ((tmp_path, good.key, None), [f"certificate {tmp_path}: Is a directory"]),
        (
            (expired.cert, stranger, missing),
            [
                f"certificate {expired.cert}: CN=codi2 expired on ",
                f"CA file {missing}: No such file or directory",
                f"key {stranger}: does not belong to certificate {expired.cert}",
            ],
        ),
        ((garbage, good.key, expired.ca), [f"certificate {garbage}: no PEM certificate in it"]),
    ]
    for files, expected in cases:
        problems = file_problems(*files)
        assert len(problems) == len(expected), problems
        for problem, start in zip(problems, expected, strict=True):
            assert problem.startswith(start) and "\n" not in problem, problem


def test_codi2_test_checks_the_tls_files_with_one_line_per_problem(tmp_path: Path, fake_libfdb_c: Path) -> None:
    good = issue(tmp_path / "good")
    expired = issue(tmp_path / "expired", not_before=NOW - 30 * DAY, not_after=NOW - DAY)
    bad = TlsFiles(cert=expired.cert, key=good.key, ca=good.ca)
    failed = _on_fake(fake_libfdb_c, tmp_path, "-m", "codi2", "test", "--config", str(_config(tmp_path, bad)))
    assert failed.returncode == 1, failed.stdout + failed.stderr
    lines = failed.stdout.splitlines()
    assert [line.split()[:2] for line in lines[:3]] == [["PASS", "config"], ["PASS", "libfdb_c"], ["FAIL", "tls"]]
    assert f"certificate {expired.cert}: CN=codi2 expired on " in lines[2]
    assert lines[3].startswith(f"      key {good.key}: does not belong to certificate {expired.cert}")
    assert lines[4].strip().startswith("hint: ") and len(lines) == 5

    for tls, detail in ((good, "the key is the certificate's"), (None, "neither encrypted nor authenticated")):
        passed = _on_fake(fake_libfdb_c, tmp_path, "-m", "codi2", "test", "--config", str(_config(tmp_path, tls)))
        assert passed.returncode == 0, passed.stdout + passed.stderr
        steps = [line.split()[1] for line in passed.stdout.splitlines()]
        assert steps == ["config", "libfdb_c", "tls", "cluster_file", "database", "probe"]
        assert detail in passed.stdout.splitlines()[2]
