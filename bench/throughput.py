"""DoGet throughput: a whole run from HDF5 into a client-side Table, against the same table
streamed from memory by a bare Flight server.

The reference isolates what Arrow Flight itself costs on this machine, so the ratio ours /
reference is the share of the transport's speed the server keeps despite reading HDF5 and
running Python on the path. h5py `read_direct` of the same datasets is what the disk (page
cache) alone delivers to a local process. All contenders read a page-cache-warm file, take turns
within each repetition, and run once unmeasured first (client and server allocators warm up).
"""

from __future__ import annotations

import argparse

import h5py
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight

from bench.common import (
    HUGE_PARTITION,
    BenchRun,
    Contender,
    GiB,
    Result,
    bench_run,
    fmt_bytes,
    median,
    our_server,
    print_table,
    reference_server,
    section,
    verdict_line,
    warm_cache,
)
from bench.reference_server import columns_ticket
from clients import Client

NAME = "throughput"
TARGET_RATIO = 0.9
DATASETS = ("timestamp", "gmd/energy", "epix/image", "tof/waveforms")


class H5pyReader:
    """Every dataset of the run read with `read_direct` into numpy arrays allocated (and
    touched) once: the page cache's speed into a local process, without page faults."""

    def __init__(self, run: BenchRun) -> None:
        self.file = h5py.File(run.path, "r", locking=False)
        self.out = {}
        for name in DATASETS:
            ds = self.file[name]
            self.out[name] = np.ones(ds.shape, dtype=ds.dtype)

    def read(self) -> int:
        for name, out in self.out.items():
            self.file[name].read_direct(out)
        return sum(out.nbytes for out in self.out.values())

    def close(self) -> None:
        self.file.close()


def one_stream(client: Client, raw: flight.FlightClient, run: BenchRun) -> pa.Table:
    """GetFlightInfo, then a single DoGet of the whole run (the server plans one endpoint),
    read with `read_all` exactly as the reference is."""
    info = client.plan(run.experiment, run.number)
    if len(info.endpoints) != 1:
        raise RuntimeError(f"expected one endpoint, the plan has {len(info.endpoints)}")
    return raw.do_get(info.endpoints[0].ticket).read_all()


def reference_get(client: flight.FlightClient) -> pa.Table:
    info = client.get_flight_info(flight.FlightDescriptor.for_command(columns_ticket(None)))
    return client.do_get(info.endpoints[0].ticket).read_all()


def run(args: argparse.Namespace) -> list[Result]:
    section(f"throughput: DoGet of a {fmt_bytes(args.size)} run into a pyarrow.Table")
    br = bench_run(args.size)
    warm = warm_cache(br.path)
    print(f"  run file {br.path.name}: {fmt_bytes(br.file_bytes)}, page cache warmed "
          f"({warm:.2f} GB/s)")

    with (
        reference_server(br) as ref,
        our_server("lclstream-1-endpoint", partition_bytes=HUGE_PARTITION) as single,
        our_server("lclstream") as multi,
    ):
        ref_client = ref.flight_client()
        single_client = single.client()
        single_raw = single.flight_client()
        multi_client = multi.client()
        local = H5pyReader(br)
        try:
            endpoints = len(multi_client.plan(br.experiment, br.number).endpoints)
            reference = reference_get(ref_client)
            same = {
                "1 stream": one_stream(single_client, single_raw, br).equals(reference),
                "parallel": multi_client.read(br.experiment, br.number).equals(reference),
            }
            del reference
            contenders = [
                Contender("reference: in-memory Flight server, 1 DoGet",
                          lambda: reference_get(ref_client).nbytes, psutil.Process(ref.pid)),
                Contender("lclstream: 1 DoGet stream",
                          lambda: one_stream(single_client, single_raw, br).nbytes,
                          psutil.Process(single.pid)),
                Contender(f"lclstream: Client.read, {endpoints} endpoints, parallel=4",
                          lambda: multi_client.read(br.experiment, br.number, parallel=4).nbytes,
                          psutil.Process(multi.pid)),
                Contender("h5py read_direct into numpy (local, no network)", local.read),
            ]
            me = psutil.Process()
            for rep in range(args.reps + 1):  # repetition 0 warms up and is not counted
                for c in contenders:
                    if rep == 1:
                        c.reset()
                    c.measure(me)
        finally:
            for cl in (ref_client, single_client, single_raw, multi_client, local):
                cl.close()

    ref_c, single_c, par_c, h5_c = contenders
    print(f"  {args.reps} repetitions each, taking turns; {fmt_bytes(ref_c.nbytes)} per read "
          f"(Arrow buffers); GB/s = 1e9 bytes/s; CPU = median CPU seconds per GiB read")
    rows = []
    for c in contenders:
        per_gib = GiB / c.nbytes
        rows.append([c.label, f"{c.best():.2f}", f"{c.median():.2f}",
                     f"{c.best() / ref_c.best():.2f}", f"{c.median() / ref_c.median():.2f}",
                     f"{median(c.client_cpu) * per_gib:.2f}",
                     f"{median(c.server_cpu) * per_gib:.2f}" if c.server else "-"])
    print_table(["contender", "best GB/s", "median GB/s", "/ref best", "/ref median",
                 "client CPU", "server CPU"], rows, right=(1, 2, 3, 4, 5, 6))
    print(f"  same table as the reference: 1 stream {same['1 stream']}, "
          f"parallel {same['parallel']}")

    results = []
    for key, c in (("1 stream", single_c), ("parallel", par_c)):
        ratio = c.median() / ref_c.median()
        ok = ratio >= TARGET_RATIO and same[key]
        verdict_line(f"ours/reference, {key} (median)", f"{ratio:.2f}",
                     f">= {TARGET_RATIO}", ok)
        results.append(Result(NAME, f"ours/reference, {key} (median GB/s)",
                              f"{c.median():.2f}/{ref_c.median():.2f} = {ratio:.2f}",
                              f">= {TARGET_RATIO}", ok))
    results.append(Result(NAME, "h5py read_direct (median GB/s)", f"{h5_c.median():.2f}"))
    return results
