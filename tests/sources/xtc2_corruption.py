"""`python -m tests.sources.xtc2_corruption RUN_FILE CASES`: corrupt one event datagram of a
copy of an xtc2 run in CASES ways and read the whole run each time, printing one JSON line per
case: "ok" (the bytes hit were data values) or the error. Runs in a process of its own, since a
corruption that reached psana's parser would abort() it: the caller's test sees that exit."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from flight_server.catalog import Catalog
from flight_server.errors import RunUnreadable
from flight_server.sources import xtc2_index as xi


def corrupt(path: Path, case: int) -> None:
    """Garble the Xtc headers, shapes or data of one L1Accept datagram, differently per case."""
    index = xi.scan_stream(xi.run_streams(path)[0])
    rng = np.random.default_rng(case)
    k = int(rng.choice(index.l1()))
    at, size = int(index.offset[k]), int(index.size[k])
    data = bytearray(path.read_bytes())
    head = xi.TRANSITION_BYTES + xi.XTC_HEADER_BYTES
    if case % 3 == 0:  # a few bytes among the headers and shapes
        spots = rng.integers(head, min(size, 400), 8)
    elif case % 3 == 1:  # bit flips anywhere in the payload
        spots = rng.integers(head, size, 16)
    else:  # a whole span after the top header
        spots = np.arange(head, min(size, head + int(rng.integers(8, 300))))
    for j in spots:
        data[at + int(j)] ^= int(rng.integers(1, 256))
    path.write_bytes(bytes(data))


def main(run_file: Path, cases: int) -> None:
    match = xi.STREAM_FILE.match(run_file.name)
    experiment, number = run_file.parent.parent.name, int(match["run"])
    for case in range(cases):
        with tempfile.TemporaryDirectory() as tmp:
            xtc = Path(tmp) / experiment / "xtc"
            xtc.mkdir(parents=True)
            for f in xi.run_files(run_file).values():
                shutil.copy(f, xtc / f.name)
            corrupt(xtc / run_file.name, case)
            try:
                run = Catalog(Path(tmp)).run(experiment, number)
                with run.reader() as reader:
                    reader.read(run.resolve(None), 0, run.num_events)
                outcome = "ok"
            except RunUnreadable as exc:
                outcome = f"RunUnreadable: {exc}"
            print(json.dumps({"case": case, "outcome": outcome}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
