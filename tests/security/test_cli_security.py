"""`lclstream user | token | login | logout | certs` and `serve`'s auth flags, as separate
processes against a real server, the way an administrator and a user would run them."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import LCLS1_EXP, LCLS2_EXP, LCLSTREAM, cli_env, run_cli, wait_for_location

PASSWORD = "s3cret-enough"


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-state")


@pytest.fixture(scope="module")
def served(data_root: Path, state: Path) -> Iterator[str]:
    # The users file must exist at start for password login; an admin adds the first user.
    res = run_cli("user", "add", "alice", "--read", "tmox4*", "--password-stdin",
                  "--state-dir", str(state), input=PASSWORD + "\n")
    assert res.returncode == 0, res.stderr
    proc = subprocess.Popen([*LCLSTREAM, "serve", "--data", str(data_root), "--port", "0",
                             "--state-dir", str(state), "--audit-log", str(state / "audit")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env(LCLSTREAM_STATE_DIR=None))
    try:
        yield wait_for_location(proc)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)


def test_user_add_list_remove(state: Path, served: str) -> None:
    users = state / "users.json"
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    doc = json.loads(users.read_text())
    assert doc["users"]["alice"]["hash"].startswith("scrypt$")
    assert PASSWORD not in users.read_text()
    res = run_cli("user", "add", "bob", "--read", "xpp*,cxi*", "--password-stdin",
                  "--state-dir", str(state), input=PASSWORD + "\n")
    assert res.returncode == 0, res.stderr
    listed = run_cli("user", "list", "--state-dir", str(state)).stdout
    assert "alice\tread tmox4*" in listed and "bob\tread xpp*, cxi*" in listed
    assert run_cli("user", "remove", "bob", "--state-dir", str(state)).returncode == 0
    missing = run_cli("user", "remove", "bob", "--state-dir", str(state))
    assert missing.returncode == 1 and "no user 'bob'" in missing.stderr
    short = run_cli("user", "add", "carl", "--password-stdin", "--state-dir", str(state),
                    input="short\n")
    assert short.returncode == 1 and "password too short" in short.stderr


def test_login_keeps_the_token_and_ls_uses_it(served: str) -> None:
    no_token = {"LCLSTREAM_TOKEN": None}
    res = run_cli("ls", "--server", served, **no_token)
    assert res.returncode == 1
    assert "no credentials" in res.stderr and "lclstream login" in res.stderr
    wrong = run_cli("login", served, "-u", "alice", "--password-stdin", input="nope\n",
                    **no_token)
    assert wrong.returncode == 1 and "wrong user name or password" in wrong.stderr
    assert "Traceback" not in wrong.stderr
    res = run_cli("login", served, "-u", "alice", "--password-stdin", input=PASSWORD + "\n",
                  **no_token)
    assert res.returncode == 0, res.stderr
    assert f"logged in to {served} as alice" in res.stdout
    listed = run_cli("ls", "--server", served, **no_token)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [LCLS2_EXP]  # only what alice may read
    assert run_cli("logout", served).returncode == 0
    again = run_cli("ls", "--server", served, **no_token)
    assert again.returncode == 1 and "no credentials" in again.stderr


def test_token_create(served: str, state: Path, tmp_path: Path) -> None:
    res = run_cli("token", "create", "--sub", "robot", "--read", "xpp*", "--ttl", "10m",
                  "--state-dir", str(state))
    assert res.returncode == 0, res.stderr
    token = res.stdout.strip()
    listed = run_cli("ls", "--server", served, "--token", token)
    assert listed.stdout.split() == [LCLS1_EXP]
    out = tmp_path / "r3.arrow"
    got = run_cli("get", LCLS2_EXP, "7", "-o", str(out), "-q", "--server", served,
                  "--token", token)
    assert got.returncode == 1 and "'robot' may not read experiment 'tmox42619'" in got.stderr
    assert not out.exists()
    empty = run_cli("token", "create", "--sub", "x", "--state-dir", str(state))
    assert empty.returncode == 1 and "without grants" in empty.stderr
    bad = run_cli("token", "create", "--sub", "x", "--read", "a", "--ttl", "soon",
                  "--state-dir", str(state))
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_audit_file_from_the_command_line(served: str, state: Path) -> None:
    run_cli("ls", "--server", served)
    lines = [json.loads(line) for line in (state / "audit").read_text().splitlines()]
    assert {"rpc", "outcome", "sub", "iss", "peer", "experiment", "run", "bytes"} <= set(lines[-1])


def test_serve_refuses_no_auth_beyond_loopback(data_root: Path) -> None:
    res = run_cli("serve", "--data", str(data_root), "--port", "0", "--no-auth",
                  "--host", "0.0.0.0")
    assert res.returncode == 1 and "binds only to loopback" in res.stderr


def test_serve_no_auth_on_loopback(data_root: Path) -> None:
    proc = subprocess.Popen([*LCLSTREAM, "serve", "--data", str(data_root), "--port", "0",
                             "--no-auth"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=cli_env(LCLSTREAM_TOKEN=None))
    try:
        location = wait_for_location(proc)
        res = run_cli("ls", "--server", location, LCLSTREAM_TOKEN=None)
        assert res.returncode == 0 and LCLS1_EXP in res.stdout.split()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert "authentication is OFF" in proc.stderr.read()


def test_certs_make(tmp_path: Path) -> None:
    res = run_cli("certs", "make", str(tmp_path / "pki"))
    assert res.returncode == 0, res.stderr
    names = sorted(p.name for p in (tmp_path / "pki").iterdir())
    assert names == ["ca.pem", "client.key", "client.pem", "server.key", "server.pem"]
    assert "--tls-client-ca" in res.stdout
