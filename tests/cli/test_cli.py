"""The `lclstream` command line, run as a user would: separate processes over loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from flight_server.generator import generate_lcls2_run
from tests.helpers import (
    LCLS2_EXP,
    LCLSTREAM,
    cli_env,
    interrupt,
    open_h5,
    run_cli,
    wait_for_location,
)


@pytest.fixture(scope="module")
def served(data_root: Path) -> Iterator[str]:
    proc = subprocess.Popen([*LCLSTREAM, "serve", "--data", str(data_root), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    try:
        yield wait_for_location(proc)
    finally:
        interrupt(proc)


def test_ls_lists_experiments_and_runs(served: str) -> None:
    out = run_cli("ls", "--server", served)
    assert out.returncode == 0, out.stderr
    assert LCLS2_EXP in out.stdout.split()
    runs = run_cli("ls", LCLS2_EXP, "--server", served)
    assert runs.returncode == 0, runs.stderr
    assert "lcls2-smalldata" in runs.stdout and "120" in runs.stdout and "90" in runs.stdout


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_get_writes_complete_files(served: str, tmp_path: Path, data_root: Path,
                                   suffix: str) -> None:
    out = tmp_path / f"run7{suffix}"
    res = run_cli("get", LCLS2_EXP, "7", "-c", "gmd/energy,pnccd/image,time", "-o", str(out),
                  "--server", served)
    assert res.returncode == 0, res.stderr
    assert "wrote 120 events" in res.stdout
    assert "100%" in res.stderr  # the progress bar ran to completion
    table = pq.read_table(out) if suffix == ".parquet" else ipc.open_file(out).read_all()
    assert table.column_names == ["gmd/energy", "pnccd/image", "time"]
    path = data_root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run0007.h5"
    with open_h5(path) as f:
        frames = table.column("pnccd/image").combine_chunks().to_numpy_ndarray()
        np.testing.assert_array_equal(frames, f["pnccd/image"][()])  # tensor type round-trips
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind


def test_get_failure_leaves_no_file(served: str, tmp_path: Path) -> None:
    out = tmp_path / "bad.parquet"
    res = run_cli("get", LCLS2_EXP, "7", "-c", "gmd/energi", "-o", str(out), "--server", served)
    assert res.returncode == 1
    assert "Did you mean 'gmd/energy'" in res.stderr and "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []
    res = run_cli("get", LCLS2_EXP, "7", "-o", str(tmp_path / "x.csv"), "--server", served)
    assert res.returncode == 1 and "unknown output format" in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreachable_server_is_a_clear_message(tmp_path: Path) -> None:
    for args in (["ls"], ["get", LCLS2_EXP, "7", "-o", str(tmp_path / "x.arrow")]):
        res = run_cli(*args, "--server", "grpc://127.0.0.1:1")
        assert res.returncode == 1
        assert "cannot reach a server at grpc://127.0.0.1:1" in res.stderr
        assert "Traceback" not in res.stderr
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_a_missing_data_directory(tmp_path: Path) -> None:
    res = run_cli("serve", "--data", str(tmp_path / "nowhere"), "--port", "0")
    assert res.returncode == 2 and "does not exist" in res.stderr


def test_generate_writes_each_layout(tmp_path: Path) -> None:
    for layout in ["lcls2", "lcls1", "cxi"]:
        res = run_cli("generate", "--data", str(tmp_path), "--layout", layout,
                      "--experiment", f"e{layout}", "--run", "3", "--events", "20")
        assert res.returncode == 0, res.stderr
        assert Path(res.stdout.strip()).is_file()


def test_demo_generates_and_serves(tmp_path: Path, monkeypatch) -> None:
    """What `make demo` runs: demo data written once, served with authentication on, a token
    left in the keyring so that a notebook connects with no login step."""
    monkeypatch.delenv("LCLSTREAM_TOKEN")
    monkeypatch.delenv("LCLSTREAM_STATE_DIR")  # the demo keeps its secrets in its data dir
    proc = subprocess.Popen([*LCLSTREAM, "demo", "--data", str(tmp_path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    try:
        location = wait_for_location(proc)
        from clients import connect

        with connect(location) as c:  # no token given: the keyring has the demo's
            assert c.whoami()["subject"] == "demo"
            assert c.experiments() == ["cxilu9218", "mx31245", "tmox42619"]
            runs = c.runs("tmox42619")
            assert runs.height >= 4 and (runs["events"] > 1000).all()
            assert c.read("cxilu9218", 12, ["entry_1/data_1/data"]).num_rows > 0
            frames = c.numpy("mx31245", 1, "entry/data/data")  # the NXmx Eiger series
            assert frames.shape == (180, 512, 512) and frames.dtype == "uint16"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 0


def test_sql_prints_a_table_and_writes_files(served: str, tmp_path: Path) -> None:
    query = f'SELECT run, count(*) AS n FROM {LCLS2_EXP}.events GROUP BY run ORDER BY run'
    res = run_cli("sql", query, "--server", served)
    assert res.returncode == 0, res.stderr
    assert "shape: (2, 2)" in res.stdout and "120" in res.stdout and "90" in res.stdout
    out = tmp_path / "counts.parquet"
    res = run_cli("sql", query, "-o", str(out), "--server", served)
    assert res.returncode == 0 and "wrote 2 rows" in res.stdout
    assert pq.read_table(out).to_pydict() == {"run": [7, 8], "n": [120, 90]}
    res = run_cli("sql", "SELEC 1", "--server", served)
    assert res.returncode == 1 and "syntax error" in res.stderr and "Traceback" not in res.stderr


def test_get_resume_continues_a_download_that_was_killed(tmp_path: Path) -> None:
    """`lclstream get` killed mid-download keeps what it received; `--resume` fetches only
    the rest, and the file equals one downloaded in one go."""
    root = tmp_path / "data"
    generate_lcls2_run(root / LCLS2_EXP / f"{LCLS2_EXP}_Run0004.h5", 4, n_events=1200, seed=4)
    server = subprocess.Popen([*LCLSTREAM, "serve", "--data", str(root), "--port", "0",
                               "--batch-bytes", "128KiB"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=cli_env())
    try:
        location = wait_for_location(server)
        out, whole = tmp_path / "run4.arrow", tmp_path / "whole.arrow"
        args = ["get", LCLS2_EXP, "4", "-c", "gmd/energy,pnccd/image", "--server", location]
        assert run_cli(*args, "-o", str(whole)).returncode == 0
        state = tmp_path / f".{out.name}.partial" / "state.json"

        def kept() -> int:  # the batches the partial download holds (its state is atomic)
            if not state.exists():
                return 0
            return sum(n for e in json.loads(state.read_text())["endpoints"]
                       for _, n in e["segments"])

        getter = subprocess.Popen([*LCLSTREAM, *args, "-o", str(out), "-q"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env())
        while getter.poll() is None and kept() < 3:  # a few batches in
            time.sleep(0.01)
        getter.send_signal(signal.SIGKILL)
        getter.wait()
        assert not out.exists() and kept() >= 3

        other = run_cli(*args[:4], "gmd/energy", *args[5:], "-o", str(out), "--resume")
        assert other.returncode == 2 and "another request" in other.stderr

        resumed = run_cli(*args, "-o", str(out), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert "wrote 1200 events" in resumed.stdout
        assert ipc.open_file(out).read_all().equals(ipc.open_file(whole).read_all())
        assert sorted(p.name for p in tmp_path.iterdir()) == ["data", out.name, whole.name]
    finally:
        interrupt(server)
