"""The notebooks run top to bottom against a real server, as a user would run them."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from flight_server.generator import generate_demo
from tests.helpers import start_server

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory):
    # The demo's data without `lclstream demo`'s acquisition: 03_live.ipynb, which may write
    # with the session's token, runs a short acquisition of its own and ends it as a run.
    root = tmp_path_factory.mktemp("demo")
    generate_demo(root, n_runs=2, events_per_run=600)
    srv = start_server(root)
    yield f"grpc://127.0.0.1:{srv.port}"
    srv.shutdown()


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_executes(name: str, demo_server: str, monkeypatch) -> None:
    monkeypatch.setenv("LCLSTREAM_SERVER", demo_server)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in nb.cells for o in c.get("outputs", [])), "the plots should render"
