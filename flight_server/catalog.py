"""Experiments and runs discovered under the data root.

Layout on disk: DATA_ROOT/<experiment>/**/, where a run is
- an HDF5 file with the run number in its name (`tmox42619_Run0007.h5`, `r0007.h5`, `run_7.cxi`);
- an NXmx master file, the number being the one before `_master` (DECTRIS names a series
  `<sample>_<N>_master.h5`; `<name>_master.h5` without a number takes the HDF5 rule on `<name>`,
  and is left out with a warning where that finds none). Its data files are not runs;
- a European XFEL run directory `raw/r<RUN:04d>/` of sequence files (`RAW-R0238-AGIPD00-S00000.h5`),
  together with `proc/r<RUN:04d>/` where there is one (the experiment is the proposal directory);
- an LCLS-II raw run: the stream and chunk files `xtc/<exp>-r<RUN:04d>-s<STREAM>-c<CHUNK>.xtc2`
  of an `xtc` directory (psana's layout; `xtc/smalldata/` holds psana's offsets, not runs).
  Where an HDF5 file has the same run number (the smalldata reduction of that raw run), the
  HDF5 run stays the run's default and the raw one is its source "xtc2".
The tree is rescanned whenever a listing is asked for, so runs that appear or disappear are seen
without a restart; a described run is cached until its files' sizes or modification times change.

Names sent by clients are only ever used as keys into what the scan found, never joined into a
path, so no request can open a file outside the data root.

A run belongs to the experiment whose tree holds the file it resolves to: a symbolic link is
served when it points within its own experiment's tree (a `latest` link, say), and refused when
it points into another experiment's or out of the data root, since readers of one experiment
would otherwise read another's run. Each refused link is logged once.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from flight_server.errors import InvalidArgument, NotFound, close_matches, listing
from flight_server.sources import Run, describe, euxfel, xtc2_index
from schemas.json_input import excerpt

log = logging.getLogger(__name__)

RUN_FILE = re.compile(r"(?:^|[_\-.])(?:run|r)[_\-]?0*(\d+)\.(?:h5|hdf5|cxi)$", re.IGNORECASE)
NXMX_MASTER = re.compile(r"^(.+?)_master\.(?:h5|hdf5|nxs)$", re.IGNORECASE)
NXMX_SERIES = re.compile(r"_0*(\d+)$")  # DECTRIS's `<sample>_<N>` series prefix
NXMX_DATA = re.compile(r"_data_\d{6}\.(?:h5|hdf5|nxs)$", re.IGNORECASE)
XFEL_RUN_DIR = re.compile(r"^r(\d{4,})$")
XFEL_DATA_DIRS = ("raw", "proc")  # raw first: it names the run (proc is merged in, see euxfel)
XTC_DIR = "xtc"  # psana's: <experiment>/xtc/<experiment>-r0007-s000-c000.xtc2
SOURCES = ("xtc2",)  # the request field "source": a run's other form than its default
EXPERIMENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


Visible = Callable[[str], bool]


def everyone(experiment: str) -> bool:
    return True


@dataclass(frozen=True)
class ScannedFile:
    """A run as the last scan found it (a described `sources.Run` is cached against it: a changed
    signature, the sizes and mtimes of its files, means the run changed)."""

    experiment: str
    number: int
    path: Path  # the run's file, or its directory (European XFEL)
    kind: str  # a key of sources.KINDS
    signature: tuple

    @property
    def source(self) -> str:
        """What the request field "source" calls this form of the run."""
        return self.kind


def run_number(filename: str) -> int | None:
    match = RUN_FILE.search(filename)
    return int(match.group(1)) if match else None


def nxmx_run_number(filename: str) -> int | None:
    """The run number of an NXmx master file, None when it is not one."""
    master = NXMX_MASTER.match(filename)
    if master is None:
        return None
    prefix = master.group(1)
    series = NXMX_SERIES.search(prefix)
    if series:
        return int(series.group(1))
    return run_number(prefix + ".h5")


def signature(path: Path, kind: str, within: Path) -> tuple:
    """What changes when the run changes: its files' sizes and mtimes (raises OSError if gone).
    `within`: the experiment's tree, which a run's files never leave."""
    if kind == "euxfel":
        files = [p for d in euxfel.run_dirs(path, within) for p in sorted(d.iterdir())
                 if euxfel.SEQUENCE_FILE.match(p.name)]
    elif kind == "nxmx":
        prefix = NXMX_MASTER.match(path.name).group(1)
        files = [path, *sorted(p for p in path.parent.glob(glob.escape(prefix) + "_data_*")
                               if NXMX_DATA.search(p.name))]
    elif kind == "xtc2":
        files = list(xtc2_index.run_files(path).values())
    else:
        files = [path]
    stats = [p.stat() for p in files]
    return tuple((p.name, st.st_size, st.st_mtime_ns) for p, st in zip(files, stats, strict=True))


def check_experiment_name(name: str) -> None:
    """Refuse names that could only be path tricks, with a message saying what is valid."""
    if not EXPERIMENT_NAME.match(name) or ".." in name:
        raise InvalidArgument(
            f"invalid experiment name {excerpt(name)}: use letters, digits, '_', '-' and '.' "
            "(no '/', '..', NUL or absolute paths)"
        )


class Catalog:
    def __init__(self, root: Path, max_open_runs: int = 128,
                 psana_calibration: bool = False) -> None:
        self.root = Path(root).resolve()
        self.psana_calibration = psana_calibration  # xtc2: constants from the LCLS database
        self.max_open_runs = max_open_runs  # described runs kept, each with an open file handle
        self._lock = threading.Lock()
        self._files: dict[str, dict[int, ScannedFile]] = {}  # each run's default form
        self._sources: dict[str, dict[int, dict[str, ScannedFile]]] = {}  # its other forms
        self._runs: OrderedDict[Path, tuple[ScannedFile, Run]] = OrderedDict()
        self._refused_links: set[Path] = set()  # logged once each, not at every scan

    # -- discovery ---------------------------------------------------------------------------

    def scan(self) -> dict[str, dict[int, ScannedFile]]:
        """Rescan the whole tree; returns experiment -> run number -> file."""
        found: dict[str, dict[int, ScannedFile]] = {}
        sources: dict[str, dict[int, dict[str, ScannedFile]]] = {}
        if self.root.is_dir():
            for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False) and EXPERIMENT_NAME.match(entry.name):
                    found[entry.name], sources[entry.name] = self._scan_experiment(entry.name)
        with self._lock:
            self._files, self._sources = found, sources
            live = {f.path for runs in found.values() for f in runs.values()}
            live |= {f.path for runs in sources.values() for forms in runs.values()
                     for f in forms.values()}
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
        runs, sources = self._scan_experiment(experiment) \
            if top.is_dir() and not top.is_symlink() else ({}, {})
        live = {f.path for f in runs.values()}
        live |= {f.path for forms in sources.values() for f in forms.values()}
        with self._lock:
            if runs or experiment in self._files:
                self._files[experiment] = runs
                self._sources[experiment] = sources
            for path in [p for p in self._runs if p.is_relative_to(top) and p not in live]:
                self._runs.pop(path)[1].retire()
        return runs

    def sources(self, experiment: str) -> dict[int, dict[str, ScannedFile]]:
        """Run number -> source name -> the run in that form, of the runs with a form other
        than their default (as of the last scan)."""
        with self._lock:
            return {n: dict(forms) for n, forms in self._sources.get(experiment, {}).items()}

    def _scan_experiment(self, experiment: str
                         ) -> tuple[dict[int, ScannedFile], dict[int, dict[str, ScannedFile]]]:
        """The experiment's runs in their default form, and the other forms of those that have
        one (a raw xtc2 run beside its smalldata HDF5 file)."""
        runs: dict[int, ScannedFile] = {}
        raw: dict[int, ScannedFile] = {}
        top = self.root / experiment
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            dirnames.sort()
            here = Path(dirpath)
            if here.name == XTC_DIR:
                dirnames.clear()  # smalldata/: psana's offsets into the stream files, not runs
                self._add_xtc2(raw, experiment, here, filenames, top)
                continue
            if self._is_xfel_run(here, filenames):
                dirnames.clear()  # sequence files are parts of this run, never runs themselves
                if here.parent.name == "proc" and (here.parent.parent / "raw" / here.name).is_dir():
                    continue  # merged into the raw run of the same number
                self._add(runs, experiment, int(XFEL_RUN_DIR.match(here.name).group(1)), here,
                          "euxfel", top)
                continue
            for name in sorted(filenames):
                if NXMX_DATA.search(name):
                    continue  # an NXmx data file: part of its master's run
                kind, number = "nxmx", nxmx_run_number(name)
                if number is None and NXMX_MASTER.match(name):
                    log.warning("not serving %s: an NXmx master file with no run number in its "
                                "name (expected <sample>_<N>_master.h5)", here / name)
                    continue
                if number is None:
                    kind, number = "hdf5", run_number(name)
                if number is None or self._outside(here / name, top, experiment):
                    continue
                self._add(runs, experiment, number, here / name, kind, top)
        sources: dict[int, dict[str, ScannedFile]] = {}
        for number, rf in raw.items():
            if runs.setdefault(number, rf) is not rf:
                sources[number] = {"xtc2": rf}
        return runs, sources

    def _add_xtc2(self, runs: dict[int, ScannedFile], experiment: str, here: Path,
                  filenames: list[str], top: Path) -> None:
        """A raw run per run number among the stream files (named by its first file)."""
        for name in sorted(filenames):
            match = xtc2_index.STREAM_FILE.match(name)
            if (match is None or int(match["run"]) in runs
                    or self._outside(here / name, top, experiment)):
                continue
            self._add(runs, experiment, int(match["run"]), here / name, "xtc2", top)

    @staticmethod
    def _is_xfel_run(path: Path, filenames: list[str]) -> bool:
        return (XFEL_RUN_DIR.match(path.name) is not None
                and path.parent.name in XFEL_DATA_DIRS
                and not path.is_symlink()
                and any(euxfel.SEQUENCE_FILE.match(f) for f in filenames))

    @staticmethod
    def _add(runs: dict[int, ScannedFile], experiment: str, number: int, path: Path,
             kind: str, top: Path) -> None:
        if number in runs:
            log.warning("run %d of %s: %s shadows %s", number, experiment, runs[number].path,
                        path)
            return
        try:
            sig = signature(path, kind, top)
        except OSError:
            return  # vanished while scanning, or a dangling link
        runs[number] = ScannedFile(experiment, number, path, kind, sig)

    def _outside(self, path: Path, top: Path, experiment: str) -> bool:
        """Whether a file is not to be served: a link out of its experiment's tree (refused,
        logged once), or gone (vanished while scanning, or a dangling link)."""
        try:
            if path.is_symlink() and not path.resolve().is_relative_to(top):
                self._refuse_link(path, experiment)
                return True
        except OSError:
            return True
        return False

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

    def run(self, experiment: str, number: int, visible: Visible = everyone,
            table: str | None = None, source: str | None = None) -> Run:
        """The described run (or its table of that name); rescans when it is not known yet or
        its files changed. `source`: the run in another form than its default ("xtc2": the
        raw run where a smalldata HDF5 file has the same number)."""
        check_experiment_name(experiment)
        if source is not None and source not in SOURCES:
            raise InvalidArgument(f"unknown source {excerpt(source)}: use one of "
                                  f"{listing(SOURCES)}, or none for the run's default")
        with self._lock:
            known = self._lookup(experiment, number, source)
        rf = self._fresh(known) if known else None
        if rf is None:
            files = self.run_files(experiment, visible)
            if number not in files:
                raise NotFound(
                    f"experiment '{experiment}' has no run {number}. Runs: {listing(sorted(files))}"
                )
            with self._lock:
                rf = self._lookup(experiment, number, source)
            if rf is None:
                raise NotFound(
                    f"run {number} of experiment '{experiment}' has no {source} files (expected "
                    f"{experiment}/xtc/{experiment}-r{number:04d}-s000-c000.xtc2); its form is "
                    f"{files[number].kind}")
        with self._lock:
            cached = self._runs.get(rf.path)
            if cached and cached[0] == rf:
                self._runs.move_to_end(rf.path)
                return cached[1].table(table)
        run = describe(rf.path, experiment, number, rf.kind, self.root / experiment,
                       psana_calibration=self.psana_calibration)
        with self._lock:
            old = self._runs.pop(rf.path, None)
            if old is not None:
                old[1].retire()  # the file changed: streams still on the old handle finish
            self._runs[rf.path] = (rf, run)
            while len(self._runs) > self.max_open_runs:
                self._runs.popitem(last=False)[1][1].retire()
        return run.table(table)

    def _lookup(self, experiment: str, number: int, source: str | None) -> ScannedFile | None:
        default = self._files.get(experiment, {}).get(number)
        if source is None or (default is not None and default.kind == source):
            return default
        return self._sources.get(experiment, {}).get(number, {}).get(source)

    def close(self) -> None:
        """Close every file handle (once their streams end)."""
        with self._lock:
            for _, run in self._runs.values():
                run.retire()
            self._runs.clear()

    def _fresh(self, rf: ScannedFile) -> ScannedFile | None:
        """The same run with its files' current sizes and mtimes, or None if it is gone."""
        try:
            return ScannedFile(rf.experiment, rf.number, rf.path, rf.kind,
                               signature(rf.path, rf.kind, self.root / rf.experiment))
        except OSError:
            return None
