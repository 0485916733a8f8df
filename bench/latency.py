"""Time to first batch: how long an interactive user waits before data starts to arrive.

Measured from the DoGet call to the first RecordBatch in hand, after which the stream is
cancelled, so the figure is the server's start-up cost per request (ticket parsing, opening the
file, reading and sending the first batch), not the run's size. Also measured with the
GetFlightInfo round trip before it (what a client that plans each read pays), and for one
scalar column, whose first batch is a few KiB, so that the fixed cost per request shows apart
from the cost of the first batch's size. Every case is run against the in-memory reference
server too, which shows the floor set by gRPC and the batch size; the cases take turns request
by request so that drifts in the machine's state hit all of them alike.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import pyarrow.flight as flight

from bench.common import (
    BenchRun,
    Result,
    bench_run,
    cpu_seconds,
    fmt_bytes,
    ms,
    our_server,
    percentile,
    print_table,
    reference_server,
    section,
    verdict_line,
    warm_cache,
)
from bench.reference_server import columns_ticket
from clients import Client, connect

NAME = "latency"
TARGET_P50 = 0.005
WARMUP = 3
GAP = 0.05  # idle time after each request, so the next one meets a server that has wound down
SCALAR = "gmd/energy"


@dataclass
class Case:
    """One kind of request: `ticket` is called inside the timed span (it may plan)."""

    label: str
    client: flight.FlightClient
    ticket: Callable[[], flight.Ticket]
    server: psutil.Process
    seconds: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    first_rows: int = 0
    first_bytes: int = 0

    def request(self) -> tuple[float, float]:
        """(time to first batch, server CPU seconds spent on the request, wind-down included)."""
        cpu0 = cpu_seconds(self.server)
        t0 = time.perf_counter()
        reader = self.client.do_get(self.ticket())
        chunk = reader.read_chunk()
        seconds = time.perf_counter() - t0
        reader.cancel()
        time.sleep(GAP)
        self.first_rows, self.first_bytes = chunk.data.num_rows, chunk.data.nbytes
        return seconds, cpu_seconds(self.server) - cpu0

    def p(self, q: float) -> float:
        return percentile(self.seconds, q)

    def mean_server_cpu(self) -> float:
        """Mean over the requests: the OS counts CPU time in 10 ms ticks, too coarse for one."""
        return sum(self.server_cpu) / len(self.server_cpu)


def our_cases(client: Client, raw: flight.FlightClient, proc: psutil.Process,
              br: BenchRun) -> list[Case]:
    full = client.plan(br.experiment, br.number).endpoints[0].ticket
    scalar = client.plan(br.experiment, br.number, [SCALAR]).endpoints[0].ticket
    return [
        Case("lclstream: DoGet, all columns", raw, lambda: full, proc),
        Case("lclstream: GetFlightInfo + DoGet, all columns", raw,
             lambda: client.plan(br.experiment, br.number).endpoints[0].ticket, proc),
        Case(f"lclstream: DoGet, {SCALAR} only", raw, lambda: scalar, proc),
    ]


def reference_cases(raw: flight.FlightClient, proc: psutil.Process) -> list[Case]:
    def plan(columns: list[str] | None) -> flight.Ticket:
        descriptor = flight.FlightDescriptor.for_command(columns_ticket(columns))
        return raw.get_flight_info(descriptor).endpoints[0].ticket

    full, scalar = plan(None), plan([SCALAR])
    return [
        Case("reference: DoGet, all columns", raw, lambda: full, proc),
        Case("reference: GetFlightInfo + DoGet, all columns", raw, lambda: plan(None), proc),
        Case(f"reference: DoGet, {SCALAR} only", raw, lambda: scalar, proc),
    ]


def run(args: argparse.Namespace) -> list[Result]:
    section(f"latency: time to first batch, {args.requests} requests per case, loopback")
    br = bench_run(args.size)
    warm_cache(br.path)

    with reference_server(br) as ref, our_server() as ours:
        client = connect(ours.location)
        raw = flight.connect(ours.location)
        ref_raw = flight.connect(ref.location)
        try:
            cases = our_cases(client, raw, psutil.Process(ours.pid), br)
            cases += reference_cases(ref_raw, psutil.Process(ref.pid))
            for i in range(WARMUP + args.requests):
                for case in cases:
                    seconds, cpu = case.request()
                    if i >= WARMUP:
                        case.seconds.append(seconds)
                        case.server_cpu.append(cpu)
        finally:
            for c in (client, raw, ref_raw):
                c.close()

    print(f"  {br.path.name}; each request followed by {GAP * 1e3:.0f} ms idle; cases take "
          f"turns; {WARMUP} rounds unmeasured first")
    rows = [[c.label, ms(c.p(50)), ms(c.p(90)), ms(c.p(99)), ms(min(c.seconds)),
             f"{c.first_rows} ev, {fmt_bytes(c.first_bytes)}", ms(c.mean_server_cpu())]
            for c in cases]
    print_table(["case", "p50", "p90", "p99", "min", "first batch", "server CPU/req"], rows,
                right=(1, 2, 3, 4, 6))
    print("  server CPU/req: mean CPU time of the server process per request, including work it "
          "does after the cancel")

    doget, plan_doget, scalar, ref_doget, _, ref_scalar = cases
    ok = doget.p(50) < TARGET_P50
    verdict_line("DoGet time to first batch, p50", ms(doget.p(50)), f"< {ms(TARGET_P50)}", ok)
    return [
        Result(NAME, "DoGet -> first batch p50 (all columns)", ms(doget.p(50)),
               f"< {ms(TARGET_P50)}", ok),
        Result(NAME, "reference DoGet -> first batch p50", ms(ref_doget.p(50))),
        Result(NAME, "GetFlightInfo + DoGet -> first batch p50", ms(plan_doget.p(50))),
        Result(NAME, f"DoGet -> first batch p50, {SCALAR} only (reference)",
               f"{ms(scalar.p(50))} ({ms(ref_scalar.p(50))})"),
    ]
