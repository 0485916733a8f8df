"""Time to first batch: how long an interactive user waits before data starts to arrive.

Measured from the DoGet call to the first RecordBatch in hand, after which the stream is
cancelled, so the figure is the server's start-up cost per request (ticket parsing, opening the
file, reading and sending the first batch), not the run's size. Also measured with the
GetFlightInfo round trip before it, which is what a client that plans each read pays, and for
the in-memory reference server, which shows the floor set by gRPC and the first batch's size.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow.flight as flight

from bench.common import (
    Result,
    bench_run,
    fmt_bytes,
    median,
    ms,
    our_server,
    percentile,
    print_table,
    reference_server,
    section,
    verdict_line,
    warm_cache,
)
from clients import Client, connect

NAME = "latency"
TARGET_P50 = 0.005
WARMUP = 3
GAP = 0.05  # idle time between requests, so each one meets a server that has wound down


@dataclass(frozen=True)
class FirstBatch:
    seconds: float
    rows: int
    nbytes: int


def first_batch(client: flight.FlightClient, ticket: Callable[[], flight.Ticket]) -> FirstBatch:
    """Time from asking for the ticket (and calling DoGet) to the first batch; then cancel."""
    t0 = time.perf_counter()
    reader = client.do_get(ticket())
    chunk = reader.read_chunk()
    seconds = time.perf_counter() - t0
    reader.cancel()
    return FirstBatch(seconds, chunk.data.num_rows, chunk.data.nbytes)


def sample(client: flight.FlightClient, ticket: Callable[[], flight.Ticket],
           requests: int) -> list[FirstBatch]:
    out = []
    for i in range(WARMUP + requests):
        fb = first_batch(client, ticket)
        if i >= WARMUP:
            out.append(fb)
        time.sleep(GAP)
    return out


def run(args: argparse.Namespace) -> list[Result]:
    section(f"latency: time to first batch, {args.requests} requests per case, loopback")
    br = bench_run(args.size)
    warm_cache(br.path)

    with reference_server(br) as ref, our_server() as ours:
        client: Client = connect(ours.location)
        raw = flight.connect(ours.location)
        ref_raw = flight.connect(ref.location)
        try:
            ticket = client.plan(br.experiment, br.number).endpoints[0].ticket
            ref_descriptor = flight.FlightDescriptor.for_path("all")
            ref_ticket = ref_raw.get_flight_info(ref_descriptor).endpoints[0].ticket
            cases = {
                "lclstream: DoGet": sample(raw, lambda: ticket, args.requests),
                "lclstream: GetFlightInfo + DoGet": sample(
                    raw, lambda: client.plan(br.experiment, br.number).endpoints[0].ticket,
                    args.requests),
                "reference: DoGet": sample(ref_raw, lambda: ref_ticket, args.requests),
                "reference: GetFlightInfo + DoGet": sample(
                    ref_raw, lambda: ref_raw.get_flight_info(ref_descriptor).endpoints[0].ticket,
                    args.requests),
            }
        finally:
            for c in (client, raw, ref_raw):
                c.close()

    rows = []
    for label, samples in cases.items():
        secs = [s.seconds for s in samples]
        rows.append([label, ms(percentile(secs, 50)), ms(percentile(secs, 90)),
                     ms(percentile(secs, 99)), ms(min(secs)),
                     f"{samples[0].rows} ev, {fmt_bytes(samples[0].nbytes)}"])
    print(f"  all columns of {br.path.name}; requests {GAP * 1e3:.0f} ms apart, "
          f"{WARMUP} unmeasured first")
    print_table(["case", "p50", "p90", "p99", "min", "first batch"], rows,
                right=(1, 2, 3, 4))

    ours_p50 = median([s.seconds for s in cases["lclstream: DoGet"]])
    plan_p50 = median([s.seconds for s in cases["lclstream: GetFlightInfo + DoGet"]])
    ref_p50 = median([s.seconds for s in cases["reference: DoGet"]])
    ok = ours_p50 < TARGET_P50
    verdict_line("DoGet time to first batch, p50", ms(ours_p50), f"< {ms(TARGET_P50)}", ok)
    return [
        Result(NAME, "DoGet -> first batch p50", ms(ours_p50), f"< {ms(TARGET_P50)}", ok),
        Result(NAME, "GetFlightInfo + DoGet -> first batch p50", ms(plan_p50)),
        Result(NAME, "reference DoGet -> first batch p50", ms(ref_p50)),
    ]
