"""`python -m bench`: throughput, latency, memory, SQL, processing, live streams, jobs, other
facilities' formats (NXmx, European XFEL), raw LCLS-II runs (xtc2, through psana), bridges and
the wire between sites (compression through a shaped link, resuming) of the server against their
targets.

The verdicts are informational (the exit status is 0 whatever they say): the figures depend on
the machine, and a regression is for a person to judge from the summary table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from bench import (
    bridges,
    cluster,
    formats,
    jobs,
    latency,
    live,
    memory,
    processing,
    sql,
    throughput,
    wire,
    xtc2,
)
from bench.common import (
    Result,
    environment,
    fmt_bytes,
    machine_load,
    print_table,
    section,
)
from flight_server.config import parse_size

BENCHMARKS: dict[str, Callable[[argparse.Namespace], list[Result]]] = {
    throughput.NAME: throughput.run,
    latency.NAME: latency.run,
    memory.NAME: memory.run,
    sql.NAME: sql.run,
    processing.NAME: processing.run,
    live.NAME: live.run,
    jobs.NAME: jobs.run,
    formats.NXMX: formats.run_nxmx,
    formats.EUXFEL: formats.run_euxfel,
    xtc2.NAME: xtc2.run,
    bridges.NAME: bridges.run,
    wire.NAME: wire.run,
    cluster.NAME: cluster.run,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--size", type=parse_size, default=None,
                   help="run size for throughput and latency, the size of sql's large "
                        "result, of the nxmx series and of the xtc2 run (default 1GiB)")
    p.add_argument("--big-size", type=parse_size, default=None,
                   help="run size for the memory benchmark (default 4GiB)")
    p.add_argument("--only", choices=list(BENCHMARKS), help="run only this benchmark")
    p.add_argument("--reps", type=int, default=None,
                   help="throughput and sql repetitions per contender (default 5)")
    p.add_argument("--requests", type=int, default=None,
                   help="time-to-first-batch requests per case, and sql small queries "
                        "(default 50)")
    p.add_argument("--events", type=int, default=None,
                   help="events the sql benchmark aggregates over (default 10000000)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 128MiB / 256MiB runs, 3 repetitions, 10 requests, "
                        "1000000 events")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Defaults depend on --quick; explicit options win over both."""
    args = build_parser().parse_args(argv)
    quick = {"size": 128 * 2**20, "big_size": 256 * 2**20, "reps": 3, "requests": 10,
             "events": 1_000_000}
    full = {"size": 2**30, "big_size": 4 * 2**30, "reps": 5, "requests": 50,
            "events": 10_000_000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.reps < 3 or args.requests < 1 or args.events < 4:
        build_parser().error("--reps must be at least 3, --requests at least 1 and --events "
                             "at least 4")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"lclstream benchmarks: {environment()}")
    print(f"  --size {fmt_bytes(args.size)}, --big-size {fmt_bytes(args.big_size)}, "
          f"{args.reps} repetitions, {args.requests} requests, {args.events:,} events")
    print(f"  before: {machine_load()}")
    t0 = time.perf_counter()
    results: list[Result] = []
    for name, bench in BENCHMARKS.items():
        if args.only and name != args.only:
            continue
        try:
            results += bench(args)
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            print(f"  {name} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            results.append(Result(name, "benchmark run", f"error: {type(exc).__name__}",
                                  "completes", False))

    print(f"\n  after: {machine_load()}")
    section(f"summary ({time.perf_counter() - t0:.0f} s)")
    print_table(["benchmark", "metric", "value", "target", "verdict"],
                [[r.bench, r.metric, r.value, r.target or "-", r.verdict] for r in results],
                right=(2,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
