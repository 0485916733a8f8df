"""Every durable writer survives being killed mid-write: the file then holds its old content or
its new content, never a torn mix, and readers (json, h5py, the server's own loaders) read it.

Each writer runs in a child process that kills itself with SIGKILL at the exact moment under
test, found with a Python audit hook (no patching): just before the rename that publishes the
new content ("before": the old content must remain), or just after it, when the directory is
opened to be synced ("after": the new content must be there).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import pytest

# The child: run SETUP (writes the old content), arm the hook for TARGET, run UPDATE.
CHILD = """
import os, signal, sys
from pathlib import Path
target, when = Path(sys.argv[1]).resolve(), sys.argv[2]
{setup}
def kill_at(event, args):
    if when == "before" and event in ("os.rename", "os.link") and Path(args[1]) == target:
        os.kill(os.getpid(), signal.SIGKILL)
    if when == "after" and event == "open" and isinstance(args[0], str) \\
            and Path(args[0]) == target.parent:
        os.kill(os.getpid(), signal.SIGKILL)
sys.addaudithook(kill_at)
{update}
"""

WRITERS = {
    "consumer group commits": (
        "groups/g.json",
        """
        from flight_server.live.groups import Group
        Group("g", target, 0, [(0, 10)]).save()
        """,
        """
        Group("g", target, 0, [(0, 20)]).save()
        """),
    "live stream state": (
        "stream/stream.json",
        """
        from flight_server.config import LiveSettings
        from flight_server.live.stream import Stream
        stream = Stream("exp", "s", target.parent, LiveSettings())
        stream.set_retention({"bytes": 1000})
        """,
        """
        stream.set_retention({"bytes": 2000})
        """),
    "run file of an ended stream": (
        "exp_Run0001.h5",
        """
        import pyarrow as pa
        from flight_server.live.run_writer import write_run
        def events(n):
            return pa.record_batch({"gmd/energy": pa.array([0.5] * n)})
        write_run(target, events(1).schema, [(events(3), 1)])
        """,
        """
        write_run(target, events(1).schema, [(events(7), 1)])
        """),
    "users file": (
        "state/users.json",
        """
        from flight_server.security.grants import Grants
        from flight_server.security.users import UsersFile
        UsersFile(target).add("alice", "correct horse battery", Grants.build(read=["a"]))
        """,
        """
        UsersFile(target).add("bob", "correct horse battery", Grants.build(read=["b"]))
        """),
    "server keys": (
        "state/ticket.key",
        """
        from flight_server.security.keys import write_private
        write_private(target, b"old key")
        """,
        """
        write_private(target, b"new key")
        """),
    "generated runs": (
        "gen/exp_Run0002.h5",
        """
        from flight_server.generator import generate_lcls2_run
        generate_lcls2_run(target, 2, n_events=4, seed=1)
        """,
        """
        generate_lcls2_run(target, 2, n_events=9, seed=1)
        """),
}


def content(path: Path) -> object:
    """What a reader of this kind of file sees; it must be readable, whatever it holds."""
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".h5":
        with h5py.File(path, "r", locking=False) as f:
            return len(f["gmd/energy"])
    return path.read_bytes()


def run_child(tmp_path: Path, name: str, when: str) -> tuple[Path, int]:
    relative, setup, update = WRITERS[name]
    target = tmp_path / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    script = CHILD.format(setup=textwrap.dedent(setup), update=textwrap.dedent(update))
    done = subprocess.run([sys.executable, "-c", script, str(target), when],
                          capture_output=True, text=True, timeout=120)
    return target, done.returncode


def expected(tmp_path: Path, name: str) -> tuple[object, object]:
    """(old, new) content, from an uninterrupted run."""
    target, code = run_child(tmp_path / "reference", name, "never")
    assert code == 0
    return None, content(target)


@pytest.mark.parametrize("name", list(WRITERS))
def test_killed_before_the_rename_the_old_content_stays(tmp_path: Path, name: str) -> None:
    target, code = run_child(tmp_path, name, "before")
    assert code == -signal.SIGKILL, "the child must die at the rename"
    old = {"consumer group commits": {"base": 0, "committed": [[0, 10]]},
           "live stream state": {"retention": {"bytes": 1000}},
           "run file of an ended stream": 3, "server keys": b"old key",
           "generated runs": 4}
    seen = content(target)
    if name == "users file":
        assert set(seen["users"]) == {"alice"}
    else:
        assert seen == old[name]
    # what the crash left is hidden and matches no run file; the next write still succeeds
    leftovers = [p.name for p in target.parent.iterdir() if p != target and p.is_file()]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers


@pytest.mark.parametrize("name", list(WRITERS))
def test_killed_after_the_rename_the_new_content_is_there(tmp_path: Path, name: str) -> None:
    _, new = expected(tmp_path, name)
    target, code = run_child(tmp_path, name, "after")
    assert code == -signal.SIGKILL, "the child must die syncing the directory"
    if name == "users file":
        assert set(content(target)["users"]) == {"alice", "bob"}
    else:
        assert content(target) == new


# The child: record, in order, every fsync (by the path of its descriptor) and every rename.
TRACE = """
import json, os, sys
from pathlib import Path
target = Path(sys.argv[1]).resolve()
{setup}
trace = []
real_fsync = os.fsync
def fsync(fd):
    trace.append(["fsync", os.readlink(f"/proc/self/fd/{{fd}}")])
    return real_fsync(fd)
os.fsync = fsync
def renames(event, args):
    if event in ("os.rename", "os.link"):
        trace.append([event, str(args[0]), str(args[1])])
sys.addaudithook(renames)
{update}
print(json.dumps(trace))
"""


@pytest.mark.parametrize("name", list(WRITERS))
def test_the_new_content_and_its_name_are_synced(tmp_path: Path, name: str) -> None:
    """What a power cut would test: the new file is synced before it is renamed into place,
    and its directory after, so an acknowledged commit survives (these two writers skipped
    both before)."""
    relative, setup, update = WRITERS[name]
    target = (tmp_path / relative)
    target.parent.mkdir(parents=True, exist_ok=True)
    script = TRACE.format(setup=textwrap.dedent(setup), update=textwrap.dedent(update))
    done = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True,
                          text=True, timeout=120, check=True)
    trace = json.loads(done.stdout.strip().splitlines()[-1])
    published = [i for i, t in enumerate(trace)
                 if t[0] in ("os.rename", "os.link") and Path(t[2]) == target.resolve()]
    assert published, trace
    at = published[-1]
    temporary = trace[at][1]
    assert ["fsync", temporary] in trace[:at], "the content is synced before the rename"
    assert ["fsync", str(target.parent.resolve())] in trace[at + 1:], \
        "the directory is synced after the rename"
