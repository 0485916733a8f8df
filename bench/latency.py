"""Time to first batch: how long an interactive user waits before data starts to arrive.

Measured from the DoGet call to the first RecordBatch in hand, after which the stream is
cancelled, so the figure is the server's start-up cost per request (ticket parsing, opening the
file, reading and sending the first batch), not the run's size. Also measured with the
GetFlightInfo round trip before it (what a client that plans each read pays), and for one
scalar column, whose first batch is a few KiB, so that the fixed cost per request shows apart
from the cost of the first batch's size. Every case is run against the in-memory reference
server too, which shows the floor set by gRPC and the batch size, and against our server started
with `--no-auth`, which shows what authentication adds (the server checks the bench's token on
every call); the cases take turns request by request so that drifts in the machine's state hit
all of them alike. Last, back-to-back DoAction "whoami" calls, the smallest authenticated RPC,
with and without auth give the per-call cost of authentication in microseconds.
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
from bench.reference_server import columns_ticket
from clients import Client

NAME = "latency"
TARGET_P50 = 0.005
TARGET_AUTH_RATIO = 1.10  # authentication may add at most 10% to time to first batch
WARMUP = 3
GAP = 0.05  # idle time after each request, so the next one meets a server that has wound down
SCALAR = "gmd/energy"
ROUNDS, CALLS = 20, 100  # whoami: rounds taking turns between the servers, calls per round


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


def our_cases(name: str, client: Client, raw: flight.FlightClient, proc: psutil.Process,
              br: BenchRun) -> list[Case]:
    full = client.plan(br.experiment, br.number).endpoints[0].ticket
    scalar = client.plan(br.experiment, br.number, [SCALAR]).endpoints[0].ticket
    return [
        Case(f"{name}: DoGet, all columns", raw, lambda: full, proc),
        Case(f"{name}: GetFlightInfo + DoGet, all columns", raw,
             lambda: client.plan(br.experiment, br.number).endpoints[0].ticket, proc),
        Case(f"{name}: DoGet, {SCALAR} only", raw, lambda: scalar, proc),
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


def whoami_seconds(client: flight.FlightClient) -> float:
    """Seconds per DoAction "whoami" over CALLS calls back to back."""
    action = flight.Action("whoami", b"")
    t0 = time.perf_counter()
    for _ in range(CALLS):
        list(client.do_action(action))
    return (time.perf_counter() - t0) / CALLS


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f} us"


def run(args: argparse.Namespace) -> list[Result]:
    section(f"latency: time to first batch, {args.requests} requests per case, loopback")
    br = bench_run(args.size)
    warm_cache(br.path)

    with (
        reference_server(br) as ref,
        our_server() as ours,
        our_server("lclstream-no-auth", auth=False) as bare,
    ):
        client, raw = ours.client(), ours.flight_client()
        bare_client, bare_raw = bare.client(), bare.flight_client()
        ref_raw = ref.flight_client()
        try:
            auth = our_cases("lclstream", client, raw, psutil.Process(ours.pid), br)
            no_auth = our_cases("lclstream --no-auth", bare_client, bare_raw,
                                psutil.Process(bare.pid), br)
            refs = reference_cases(ref_raw, psutil.Process(ref.pid))
            cases = auth + no_auth + refs
            for i in range(WARMUP + args.requests):
                for case in cases:
                    seconds, cpu = case.request()
                    if i >= WARMUP:
                        case.seconds.append(seconds)
                        case.server_cpu.append(cpu)
            per_call: dict[str, list[float]] = {"auth": [], "no-auth": []}
            for i in range(1 + ROUNDS):  # round 0 warms up
                for key, c in (("auth", raw), ("no-auth", bare_raw)):
                    seconds = whoami_seconds(c)
                    if i:
                        per_call[key].append(seconds)
        finally:
            for c in (client, raw, bare_client, bare_raw, ref_raw):
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

    whoami = {k: median(v) for k, v in per_call.items()}
    print(f"\n  authentication overhead: p50 with auth / p50 with --no-auth; DoAction whoami: "
          f"median of {ROUNDS} x {CALLS} calls back to back")
    rows = [[a.label.removeprefix("lclstream: "), ms(a.p(50)), ms(b.p(50)),
             f"{a.p(50) / b.p(50):.2f}"] for a, b in zip(auth, no_auth, strict=True)]
    rows.append(["DoAction whoami, per call", us(whoami["auth"]), us(whoami["no-auth"]),
                 f"{whoami['auth'] / whoami['no-auth']:.2f}"])
    print_table(["case", "auth", "no-auth", "ratio"], rows, right=(1, 2, 3))

    doget, plan_doget, scalar = auth
    ref_doget, _, ref_scalar = refs
    ok = doget.p(50) < TARGET_P50
    verdict_line("DoGet time to first batch, p50", ms(doget.p(50)), f"< {ms(TARGET_P50)}", ok)
    results = [
        Result(NAME, "DoGet -> first batch p50 (all columns)", ms(doget.p(50)),
               f"< {ms(TARGET_P50)}", ok),
        Result(NAME, "reference DoGet -> first batch p50", ms(ref_doget.p(50))),
        Result(NAME, "GetFlightInfo + DoGet -> first batch p50", ms(plan_doget.p(50))),
        Result(NAME, f"DoGet -> first batch p50, {SCALAR} only (reference)",
               f"{ms(scalar.p(50))} ({ms(ref_scalar.p(50))})"),
    ]
    for what, a, b in (("DoGet", doget, no_auth[0]),
                       ("GetFlightInfo + DoGet", plan_doget, no_auth[1])):
        ratio = a.p(50) / b.p(50)
        ok = ratio < TARGET_AUTH_RATIO
        verdict_line(f"auth/no-auth, {what} p50", f"{ratio:.2f}", f"< {TARGET_AUTH_RATIO:.2f}",
                     ok)
        results.append(Result(NAME, f"auth/no-auth {what} -> first batch p50",
                              f"{ms(a.p(50))}/{ms(b.p(50))} = {ratio:.2f}",
                              f"< {TARGET_AUTH_RATIO:.2f}", ok))
    results.append(Result(NAME, "DoAction whoami per call, auth/no-auth",
                          f"{us(whoami['auth'])}/{us(whoami['no-auth'])} "
                          f"(+{us(whoami['auth'] - whoami['no-auth'])})"))
    return results
