"""Experiments and runs discovered under the data root.

Layout on disk: DATA_ROOT/<experiment>/**/<file>, with the run number taken from the file name
(`tmox42619_Run0007.h5`, `r0007.h5`, `run_7.cxi`). The tree is rescanned whenever a listing is
asked for, so files that appear or disappear are seen without a restart; a described run is
cached until its file's size or modification time changes.

Names sent by clients are only ever used as keys into what the scan found, never joined into a
path, so no request can open a file outside the data root.

A run belongs to the experiment whose tree holds the file it resolves to: a symbolic link is
served when it points within its own experiment's tree (a `latest` link, say), and refused when
it points into another experiment's or out of the data root, since readers of one experiment
would otherwise read another's run. Each refused link is logged once.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flight_server.errors import InvalidArgument, NotFound, close_matches, listing
from flight_server.sources import Run, describe
from schemas.json_input import excerpt

log = logging.getLogger(__name__)

RUN_FILE = re.compile(r"(?:^|[_\-.])(?:run|r)[_\-]?0*(\d+)\.(?:h5|hdf5|cxi)$", re.IGNORECASE)
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


Visible = Callable[[str], bool]


def everyone(experiment: str) -> bool:
    return True


@dataclass(frozen=True)
class ScannedFile:
    """A run's file as the last scan found it (a described `sources.Run` is cached against it:
    a changed size or mtime means the file changed)."""

    experiment: str
    number: int
    path: Path
    size: int
    mtime_ns: int


def run_number(filename: str) -> int | None:
    match = RUN_FILE.search(filename)
    return int(match.group(1)) if match else None


def check_experiment_name(name: str) -> None:
    """Refuse names that could only be path tricks, with a message saying what is valid."""
    if not EXPERIMENT_NAME.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid experiment name {excerpt(name)}: use letters, digits, '_', '-' and '.' "
            "(no '/', '..', NUL or absolute paths)"
        )


class Catalog:
    def __init__(self, root: Path, max_open_runs: int = 128) -> None:
        self.root = Path(root).resolve()
        self.max_open_runs = max_open_runs  # described runs kept, each with an open file handle
        self._lock = threading.Lock()
        self._files: dict[str, dict[int, ScannedFile]] = {}
        self._runs: OrderedDict[Path, tuple[ScannedFile, Run]] = OrderedDict()
        self._refused_links: set[Path] = set()  # logged once each, not at every scan

    # -- discovery ---------------------------------------------------------------------------

    def scan(self) -> dict[str, dict[int, ScannedFile]]:
        """Rescan the whole tree; returns experiment -> run number -> file."""
        found: dict[str, dict[int, ScannedFile]] = {}
        if self.root.is_dir():
            for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False) and EXPERIMENT_NAME.match(entry.name):
                    found[entry.name] = self._scan_experiment(entry.name)
        with self._lock:
            self._files = found
            live = {f.path for runs in found.values() for f in runs.values()}
            for path in [p for p in self._runs if p not in live]:
                self._runs.pop(path)[1].retire()
        return found

    def experiments(self) -> list[str]:
        """Experiment names under the root, without walking their trees."""
        if not self.root.is_dir():
            return []
        return sorted(e.name for e in os.scandir(self.root)
                      if e.is_dir(follow_symlinks=False) and EXPERIMENT_NAME.match(e.name))

    def scan_experiment(self, experiment: str) -> dict[int, ScannedFile]:
        """Rescan one experiment's tree: what a request that names it needs, at a fraction of
        the cost of `scan` on a large data root."""
        top = self.root / experiment
        runs = self._scan_experiment(experiment) \
            if top.is_dir() and not top.is_symlink() else {}
        live = {f.path for f in runs.values()}
        with self._lock:
            if runs or experiment in self._files:
                self._files[experiment] = runs
            for path in [p for p in self._runs if p.is_relative_to(top) and p not in live]:
                self._runs.pop(path)[1].retire()
        return runs

    def _scan_experiment(self, experiment: str) -> dict[int, ScannedFile]:
        runs: dict[int, ScannedFile] = {}
        top = self.root / experiment
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                number = run_number(name)
                if number is None:
                    continue
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                    if path.is_symlink() and not path.resolve().is_relative_to(top):
                        self._refuse_link(path, experiment)
                        continue
                except OSError:
                    continue  # vanished while scanning, or a dangling link
                if number in runs:
                    log.warning("run %d of %s: %s shadows %s", number, experiment,
                                runs[number].path, path)
                    continue
                runs[number] = ScannedFile(experiment, number, path, st.st_size, st.st_mtime_ns)
        return runs

    def _refuse_link(self, path: Path, experiment: str) -> None:
        with self._lock:
            if path in self._refused_links:
                return
            self._refused_links.add(path)
        log.warning("not serving %s: a link to a file outside experiment %s's tree (%s)",
                    path, experiment, os.path.realpath(path))

    def run_files(self, experiment: str, visible: Visible = everyone) -> dict[int, ScannedFile]:
        """`visible` limits the experiments an error message may name to the caller's own."""
        check_experiment_name(experiment)
        files = self.scan()
        if experiment not in files:
            shown = [e for e in files if visible(e)]
            raise NotFound(
                f"no experiment '{experiment}'.{close_matches(experiment, shown)} "
                f"Experiments: {listing(shown)}"
            )
        return files[experiment]

    # -- runs --------------------------------------------------------------------------------

    def run(self, experiment: str, number: int, visible: Visible = everyone) -> Run:
        """The described run; rescans when it is not known yet or its file changed."""
        check_experiment_name(experiment)
        with self._lock:
            known = self._files.get(experiment, {}).get(number)
        rf = self._fresh(known) if known else None
        if rf is None:
            files = self.run_files(experiment, visible)
            rf = files.get(number)
            if rf is None:
                raise NotFound(
                    f"experiment '{experiment}' has no run {number}. Runs: {listing(sorted(files))}"
                )
        with self._lock:
            cached = self._runs.get(rf.path)
            if cached and cached[0] == rf:
                self._runs.move_to_end(rf.path)
                return cached[1]
        run = describe(rf.path, experiment, number)
        with self._lock:
            old = self._runs.pop(rf.path, None)
            if old is not None:
                old[1].retire()  # the file changed: streams still on the old handle finish
            self._runs[rf.path] = (rf, run)
            while len(self._runs) > self.max_open_runs:
                self._runs.popitem(last=False)[1][1].retire()
        return run

    def close(self) -> None:
        """Close every file handle (once their streams end)."""
        with self._lock:
            for _, run in self._runs.values():
                run.retire()
            self._runs.clear()

    @staticmethod
    def _fresh(rf: ScannedFile) -> ScannedFile | None:
        """The same file with its current size and mtime, or None if it is gone."""
        try:
            st = rf.path.stat()
        except OSError:
            return None
        return ScannedFile(rf.experiment, rf.number, rf.path, st.st_size, st.st_mtime_ns)
