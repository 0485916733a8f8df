"""On the wire: compression through a rate-limited link, loopback with compression off, a
transfer cut short and resumed, and TLS against plaintext.

`--only wire`:

1. **Through a 1 Gbit/s link**: our server (authentication on) in a network namespace of its own,
   reached over a veth pair shaped with `tc qdisc ... tbf rate 1gbit` at both ends, and a client
   process in the root namespace at the other end; GetFlightInfo + DoGet of every endpoint
   (`Client.read`, `parallel=4`) of the demo runs' (`bench-data/demo`, tmox42619, LCLS2 layout)
   detector frames `pnccd/image` (128x128 uint16 with spots on a noisy pedestal) and, apart,
   waveforms `tof/waveforms` (float32 with noise), with `compression="none"`, `"zstd"` and
   `"lz4"`, taking turns. Effective rate = Arrow bytes delivered / wall time; bytes on the wire =
   the `rx_bytes` counter of the client's end of the veth (Ethernet, IP and TCP headers included),
   so the compression ratio is Arrow bytes / wire bytes. Target: zstd >= 2x the uncompressed rate
   for a column that zstd compresses at least 2x. The bench sets the link up (root, `ip`, `tc`)
   and removes it at the end, on an error or Ctrl-C too; where it may not, it says why and
   measures bytes on the wire only, through a counting relay on loopback.
2. **Loopback, compression off**: one DoGet (huge `--partition-bytes`) of the whole `--size` bench
   run from a server on loopback with its default (`auto`: off for a loopback peer) against
   `compression="none"`; target: within 5 % (median GB/s). `"zstd"` and `"lz4"` on loopback
   beside them, for information: why `auto` turns compression off there.
3. **A transfer cut at 90 %**: one DoGet of a bench run of `--size` (at least 256 MiB) through a
   counting relay on loopback that cuts the connection once, after 90 % of the bytes an
   uninterrupted read carries; `Client.read` resumes from the first event it has not received.
   Target: (cut and resumed - uninterrupted) / uninterrupted < 5 % (median seconds), and the
   result equal to the uninterrupted one (rows and a fingerprint of every column). The relay
   also times the stall, from the cut to the first byte of the resumed stream.
4. **TLS**: our server's DoGet over `grpc+tls://` against the same server settings over
   `grpc://`, on loopback (two server processes of one command line, the TLS one with the bench's
   certificate, `bench.common.tls_certs`): `Client.read` (`parallel=4`) of the demo runs'
   `pnccd/image` and of the `--size` bench run (all columns), each transport read by a client
   process of its own, taking turns in alternating order; target: TLS / plaintext >= 0.8 (median
   GB/s). The bare reference Flight server (bench/reference_server.py's, run by
   `python -m bench.wire --reference`, which can give it a certificate) over both beside them,
   for information: what TLS costs Arrow Flight itself on this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa

from bench.common import (
    DATA,
    HUGE_PARTITION,
    ROOT,
    STATE,
    ClientProcess,
    Contender,
    GiB,
    MiB,
    Result,
    ServerProcess,
    TlsServerProcess,
    bench_run,
    bench_token,
    fmt_bytes,
    kept,
    measure_each,
    median,
    our_server,
    print_table,
    section,
    tls_certs,
    verdict_line,
    warm_cache,
)
from tests.wire import CountingRelay  # the tests' relay: counts bytes, cuts connections

NAME = "wire"
LINK_RATE = "1gbit"
TBF = ["tbf", "rate", LINK_RATE, "burst", "256kb", "latency", "50ms"]
CODECS = ("none", "zstd", "lz4")
TARGET_SPEEDUP = 2.0  # zstd / none on the link, for a column zstd compresses at least this much
TARGET_LOOPBACK = 0.05  # |auto / none - 1| on loopback, median GB/s
TARGET_RESUME = 0.05  # (cut and resumed - uninterrupted) / uninterrupted, median seconds
TARGET_TLS = 0.8  # grpc+tls / grpc, median GB/s of the same reads from the same server settings
CUT_AT = 0.9  # of the bytes an uninterrupted read carries
RESUME_MIN_SIZE = 256 * MiB
PARALLEL = 4  # Client.read's endpoints in flight (its default)
COMPRESSION_KEY = b"lclstream.compression"  # schema metadata: what DoGet will use for the caller

DEMO = DATA / "demo"
DEMO_EXPERIMENT = "tmox42619"
FRAMES, WAVEFORMS = "pnccd/image", "tof/waveforms"
NETNS_PREFIX = "lclwire-"


# -- the clients, in a process of their own ----------------------------------------------------


def client_setup(location: str, token: str | None, tls_root_certs: str | None = None) -> None:
    from clients import connect

    kept("client", lambda: connect(location, token, tls_root_certs=tls_root_certs))


def reference_setup(location: str, tls_root_certs: str | None) -> None:
    import pyarrow.flight as flight

    options = {"tls_root_certs": Path(tls_root_certs).read_bytes()} if tls_root_certs else {}
    kept("client", lambda: flight.connect(location, **options))


def fingerprint(table: pa.Table) -> tuple[tuple[str, int, int], ...]:
    """(column, values, their bit patterns summed modulo 2**64) of every column: exact and
    independent of how the rows are cut into batches, so a resumed read can be compared with an
    uninterrupted one; about a second a GiB."""
    out = []
    for name in table.column_names:
        count = total = 0
        for chunk in table.column(name).chunks:
            values = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
            while pa.types.is_fixed_size_list(values.type) or pa.types.is_list(values.type) \
                    or pa.types.is_large_list(values.type):
                values = values.flatten()
            array = values.to_numpy(zero_copy_only=False)
            count += len(array)
            if array.dtype.kind in "biufMm":  # numbers, booleans, times: their bits
                total += int(array.view(f"u{array.itemsize}").sum(dtype=np.uint64))
            else:  # anything else (text): its values' hashes
                total += sum(hash(v) for v in array.tolist()) % 2**64
            total %= 2**64
        out.append((name, count, total))
    return tuple(out)


_last: list[pa.Table] = []  # in a client process: the table of the last read kept for a check


def client_read(experiment: str, runs: int | list[int], columns: list[str] | None,
                compression: str | None, parallel: int, keep: bool) -> dict[str, Any]:
    """`Client.read` (GetFlightInfo, DoGet of every endpoint, resuming a broken stream) into a
    Table: its Arrow bytes, rows and the seconds the read took; with `keep` the table is kept
    for `client_fingerprint`. `compression` None: the server's default."""
    _last.clear()
    t0 = time.perf_counter()
    table = kept("client").read(experiment, runs, columns, parallel=parallel,
                                compression=compression)
    seconds = time.perf_counter() - t0
    if keep:
        _last.append(table)
    return {"nbytes": table.nbytes, "rows": table.num_rows, "seconds": seconds}


def reference_read(keep: bool) -> dict[str, Any]:
    """GetFlightInfo + DoGet of the whole run the reference server holds, as client_read."""
    from bench.throughput import reference_get

    _last.clear()
    t0 = time.perf_counter()
    table = reference_get(kept("client"))
    seconds = time.perf_counter() - t0
    if keep:
        _last.append(table)
    return {"nbytes": table.nbytes, "rows": table.num_rows, "seconds": seconds}


def client_fingerprint() -> tuple[int, tuple[tuple[str, int, int], ...]]:
    """(rows, fingerprint) of the table kept by the last read, which is then dropped."""
    table = _last.pop()
    return table.num_rows, fingerprint(table)


# -- measuring -------------------------------------------------------------------------------


@dataclass
class Reader:
    """A contender whose reads run in a client process: the read's own seconds (taken in the
    process), CPU of that process and of the server, and the bytes each read put on the wire."""

    label: str
    proc: ClientProcess
    server: psutil.Process
    read: tuple  # client_read's arguments, without `keep`
    wire: Callable[[], int]  # bytes towards the client so far
    stats: Contender = field(init=False)
    wire_bytes: list[int] = field(default_factory=list)
    last: dict[str, Any] = field(default_factory=dict)
    check: Any = None  # the fingerprint of its first read
    fn: Callable[..., dict[str, Any]] = client_read  # the read, in the client process

    def __post_init__(self) -> None:
        self.stats = Contender(self.label, lambda: 0, self.server,
                               [psutil.Process(self.proc.process.pid)])

    def measure(self, check: bool = False) -> dict[str, Any]:
        """One read; with `check`, its (rows, fingerprint) as the answer's "fingerprint", taken
        after the read's time and CPU."""
        c = self.stats
        c0, s0 = psutil.Process(self.proc.process.pid).cpu_times(), self.server.cpu_times()
        w0 = self.wire()
        answer = self.proc.call(self.fn, *self.read, check)
        self.wire_bytes.append(self.wire() - w0)
        c1, s1 = psutil.Process(self.proc.process.pid).cpu_times(), self.server.cpu_times()
        if check:
            answer["fingerprint"] = self.proc.call(client_fingerprint)
        c.seconds.append(answer["seconds"])
        c.client_cpu.append(c1.user + c1.system - c0.user - c0.system)
        c.server_cpu.append(s1.user + s1.system - s0.user - s0.system)
        c.nbytes = answer["nbytes"]
        self.last = answer
        return answer

    def reset(self) -> None:
        self.stats.reset()
        self.wire_bytes.clear()

    def cpu_per_gib(self) -> tuple[float, float]:
        per_gib = GiB / self.stats.nbytes
        return median(self.stats.client_cpu) * per_gib, median(self.stats.server_cpu) * per_gib

    def ratio(self) -> float:
        """Arrow bytes / bytes on the wire, median over the reads."""
        return self.stats.nbytes / max(1, median(self.wire_bytes))


def take_turns(readers: Sequence[Reader], reps: int, alternate: bool = False) -> None:
    """Round 0 warms up (and checks: every reader's fingerprint), then `reps` rounds, taking
    turns (with `alternate`, in reverse order every other round, so that none always follows
    the same one); round 0 is not counted."""
    for rep in range(reps + 1):
        for r in (readers[::-1] if alternate and rep % 2 else readers):
            r.measure(check=rep == 0)
            if rep == 0:
                r.check = r.last.get("fingerprint")
                r.reset()


def compression_label(client: Any, experiment: str, runs: Any, columns: list[str] | None,
                      compression: str | None = None) -> str:
    """What the plan says DoGet will compress with for this caller."""
    info = client.plan(experiment, runs, columns, compression=compression)
    return (info.schema.metadata or {}).get(COMPRESSION_KEY, b"?").decode()


# -- the shaped link: two network namespaces' worth of veth ---------------------------------------


class LinkUnavailable(Exception):
    """The link cannot be set up here; the message says why."""


def _admin(*args: str, netns: str | None = None) -> None:
    cmd = [*(["ip", "netns", "exec", netns] if netns else []), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise LinkUnavailable(f"`{' '.join(cmd)}` failed: {done.stderr.strip() or done.returncode}")


class ShapedLink:
    """A veth pair between a network namespace of its own (the server's end, `server_addr`) and
    the root namespace (the client's end, `client_addr`), each end's egress shaped by a token
    bucket of `rate`: a link of that rate both ways. Set up on enter, removed on exit (on an
    error, Ctrl-C or SIGTERM too: SIGTERM is turned into SystemExit meanwhile); a namespace that
    an earlier run killed with SIGKILL left behind is removed at the next start. Needs root,
    `ip` and `tc`, else LinkUnavailable says which is missing."""

    def __init__(self, rate: str = LINK_RATE) -> None:
        pid = os.getpid()
        self.rate = rate
        self.netns = f"{NETNS_PREFIX}{pid}"
        self.client_dev, self.server_dev = f"lwc{pid}"[:15], f"lws{pid}"[:15]
        subnet = f"10.213.{pid % 250}"
        self.client_addr, self.server_addr = f"{subnet}.2", f"{subnet}.1"
        self._made = False
        self._sigterm: Any = None

    def __enter__(self) -> ShapedLink:
        if sys.platform != "linux":
            raise LinkUnavailable("network namespaces are Linux's")
        if os.geteuid() != 0:
            raise LinkUnavailable("not root (network namespaces and tc need it)")
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise LinkUnavailable(f"no `{tool}` command (iproute2)")
        remove_stale_namespaces()
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            _admin("ip", "netns", "add", self.netns)
            self._made = True
            _admin("ip", "link", "add", self.client_dev, "type", "veth", "peer", "name",
                   self.server_dev)
            _admin("ip", "link", "set", self.server_dev, "netns", self.netns)
            _admin("ip", "addr", "add", f"{self.client_addr}/30", "dev", self.client_dev)
            _admin("ip", "link", "set", self.client_dev, "up")
            _admin("ip", "addr", "add", f"{self.server_addr}/30", "dev", self.server_dev,
                   netns=self.netns)
            _admin("ip", "link", "set", self.server_dev, "up", netns=self.netns)
            _admin("ip", "link", "set", "lo", "up", netns=self.netns)
            _admin("tc", "qdisc", "add", "dev", self.client_dev, "root", *TBF)
            _admin("tc", "qdisc", "add", "dev", self.server_dev, "root", *TBF, netns=self.netns)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._made:
                self._made = False
                # the namespace takes its end of the veth with it, and the pair goes
                subprocess.run(["ip", "netns", "del", self.netns], capture_output=True,
                               timeout=30)
            if Path(f"/sys/class/net/{self.client_dev}").exists():
                subprocess.run(["ip", "link", "del", self.client_dev], capture_output=True,
                               timeout=30)
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)
                self._sigterm = None

    def wrap(self, args: Sequence[str]) -> list[str]:
        """A command run in the server's namespace (`ip netns exec` execs it: same pid)."""
        return ["ip", "netns", "exec", self.netns, *args]

    def rx_bytes(self) -> int:
        """Bytes the client's end received: what came down the link (frames, headers and all)."""
        return int(Path(f"/sys/class/net/{self.client_dev}/statistics/rx_bytes").read_text())


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def remove_stale_namespaces() -> None:
    """Namespaces of ours whose bench process is gone (killed before it could remove them)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30)
    for line in listed.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        pid = name.removeprefix(NETNS_PREFIX)
        if name.startswith(NETNS_PREFIX) and pid.isdigit() and not psutil.pid_exists(int(pid)):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


# -- 1. through a rate-limited link ------------------------------------------------------------


def demo_runs(quick: bool) -> list[int]:
    from flight_server.generator import generate_demo

    if not (DEMO / DEMO_EXPERIMENT).exists():
        print(f"  generating the demo data in {DEMO.relative_to(ROOT)} ...", flush=True)
    generate_demo(DEMO)
    return [1, 2] if quick else [1, 2, 3, 4]


def demo_server_args(host: str) -> list[str]:
    return ["-m", "flight_server.cli", "serve", "--data", str(DEMO), "--host", host, "--port",
            "0", "--state-dir", str(STATE)]


@contextlib.contextmanager
def link_or_relay() -> Iterator[tuple[ServerProcess, str, Callable[[], int], str]]:
    """(server, the location its client reads from, bytes towards the client so far, what the
    path is): through the shaped link where it can be set up, else through a counting relay on
    loopback (bytes on the wire only; the rates are loopback's)."""
    link = ShapedLink()
    try:
        link.__enter__()
    except LinkUnavailable as exc:
        print(f"  no shaped link: {exc}; measuring bytes on the wire only, through a counting "
              f"relay on loopback (the rates below are loopback's, not a link's)", flush=True)
    else:
        try:
            server = ServerProcess("lclstream-wire-link", demo_server_args(link.server_addr),
                                   token=bench_token())
            server.args = link.wrap(server.args)
            with server:
                yield (server, server.location, link.rx_bytes,
                       f"veth pair, tbf rate {link.rate} each way; server in network namespace "
                       f"{link.netns} at {link.server_addr}, client at {link.client_addr}; "
                       f"wire bytes from {link.client_dev}'s rx_bytes")
        finally:
            link.__exit__()
        return
    server = ServerProcess("lclstream-wire-relay", demo_server_args("127.0.0.1"),
                           token=bench_token())
    with server:
        port = int(server.location.rsplit(":", 1)[1])
        with CountingRelay(port) as relay:
            yield server, relay.location, relay.downstream, \
                "counting relay on loopback, no rate limit; wire bytes counted by the relay"


def link_throughput(args: argparse.Namespace) -> list[Result]:
    section(f"wire: compression through a {LINK_RATE}/s link (demo data, Client.read)")
    runs = demo_runs(args.quick)
    for path in sorted((DEMO / DEMO_EXPERIMENT).rglob("*.h5")):
        warm_cache(path)
    with link_or_relay() as (server, location, wire, what):
        shaped = "veth" in what
        print(f"  {what}", flush=True)
        with server.client() as probe:
            default = compression_label(probe, DEMO_EXPERIMENT, runs, [FRAMES])
        proc = ClientProcess("wire-link-client", client_setup, location, server.token).ready()
        try:
            spid = psutil.Process(server.pid)
            readers = [Reader(f"{column} {codec}", proc, spid,
                              (DEMO_EXPERIMENT, runs, [column], codec, PARALLEL), wire)
                       for column in (FRAMES, WAVEFORMS) for codec in CODECS]
            take_turns(readers, args.reps)
        finally:
            proc.close()

    events = readers[0].last["rows"]
    print(f"  {DEMO_EXPERIMENT} runs {runs[0]}-{runs[-1]}, {events} events, each column read "
          f"whole with Client.read ({PARALLEL} endpoints in flight); {args.reps} rounds after an "
          f"unmeasured one, taking turns; GB/s = 1e9 Arrow bytes/s delivered, median; ratio = "
          f"Arrow bytes / bytes on the wire; link-bound = the uncompressed rate x the ratio "
          f"(what the link alone would allow); CPU = median CPU-s per GiB of the client process "
          f"and the server, cores = the server's CPU-s per second of the read; the server's "
          f"default for this client: {default}")
    by = {r.label: r for r in readers}
    rows = []
    for column in (FRAMES, WAVEFORMS):
        base = by[f"{column} none"]
        for codec in CODECS:
            r = by[f"{column} {codec}"]
            cpu = r.cpu_per_gib()
            bound = base.stats.median() * r.ratio() / base.ratio()
            rows.append([column, codec, fmt_bytes(r.stats.nbytes), fmt_bytes(median(r.wire_bytes)),
                         f"{r.ratio():.2f}", f"{r.stats.best():.3f}", f"{r.stats.median():.3f}",
                         f"{r.stats.median() / base.stats.median():.2f}",
                         f"{bound:.3f}" if shaped else "-", f"{cpu[0]:.2f}", f"{cpu[1]:.2f}",
                         f"{median(r.stats.server_cpu) / median(r.stats.seconds):.2f}"])
    print_table(["column", "codec", "Arrow bytes", "wire bytes", "ratio", "best GB/s",
                 "median GB/s", "/none", "link-bound", "client CPU", "server CPU",
                 "server cores"], rows, right=tuple(range(2, 12)))

    results = []
    for column in (FRAMES, WAVEFORMS):
        base, zstd = by[f"{column} none"], by[f"{column} zstd"]
        same = all(by[f"{column} {codec}"].check == base.check for codec in CODECS)
        print(f"  {column}: the same table with every codec (rows and a fingerprint): {same}")
        speedup = zstd.stats.median() / base.stats.median()
        compresses = zstd.ratio() >= TARGET_SPEEDUP
        ok = (speedup >= TARGET_SPEEDUP and same) if shaped and compresses else None
        if not same:
            ok = False
        if not compresses:
            print(f"  {column}: zstd carries it {zstd.ratio():.2f}x smaller, under "
                  f"{TARGET_SPEEDUP:.0f}x: the target is for data that compresses that well")
        verdict_line(f"{column}: zstd / none (median GB/s)",
                     f"{speedup:.2f}" if shaped else "no link",
                     f">= {TARGET_SPEEDUP:.0f}" if compresses and shaped else "-", ok)
        results.append(Result(
            NAME, f"{column}: zstd / none through the {LINK_RATE} link (median GB/s)"
            if shaped else f"{column}: zstd / none via relay, no link (median GB/s)",
            f"{zstd.stats.median():.3f}/{base.stats.median():.3f} = {speedup:.2f}",
            f">= {TARGET_SPEEDUP:.0f}" if compresses and shaped else "", ok))
        for codec in ("zstd", "lz4"):
            results.append(Result(NAME, f"{column}: {codec} ratio, Arrow / wire bytes",
                                  f"{by[f'{column} {codec}'].ratio():.2f} "
                                  f"(none: {base.ratio():.2f})"))
    return results


# -- 2. loopback, compression off ------------------------------------------------------------


def loopback(args: argparse.Namespace) -> list[Result]:
    section(f"wire: one DoGet of a {fmt_bytes(args.size)} run on loopback, compression off")
    br = bench_run(args.size)
    warm = warm_cache(br.path)
    print(f"  run file {br.path.name}: {fmt_bytes(br.file_bytes)}, page cache warmed "
          f"({warm:.2f} GB/s)", flush=True)
    with our_server("lclstream-wire-loopback", partition_bytes=HUGE_PARTITION) as server:
        with server.client() as probe:
            default = compression_label(probe, br.experiment, br.number, None)
        proc = ClientProcess("wire-loopback-client", client_setup, server.location,
                             server.token).ready()
        try:
            spid = psutil.Process(server.pid)
            readers = [Reader(label, proc, spid, (br.experiment, br.number, None, codec, 1),
                              lambda: 0)
                       for label, codec in (("server default (auto)", None),
                                            ("compression='none'", "none"),
                                            ("compression='zstd'", "zstd"),
                                            ("compression='lz4'", "lz4"))]
            # off against off first, on their own: in a trial, the read right after a
            # compressed one (the client's and the server's heaps left otherwise) came out
            # 18 % slower
            take_turns(readers[:2], 2 * args.reps, alternate=True)
            take_turns(readers[2:], args.reps)
        finally:
            proc.close()

    auto, none, *_ = readers
    same = all(r.check == none.check for r in readers)
    print(f"  {2 * args.reps} rounds of auto and none after an unmeasured one, taking turns in "
          f"alternating order, then {args.reps} of zstd and lz4; "
          f"{fmt_bytes(none.stats.nbytes)} a read (Arrow buffers), all columns, 1 endpoint; "
          f"CPU = median CPU-s per GiB; the plan says the server default means: {default}")
    rows = []
    for r in readers:
        cpu = r.cpu_per_gib()
        spread = (max(r.stats.seconds) - min(r.stats.seconds)) / median(r.stats.seconds)
        rows.append([r.label, f"{r.stats.best():.2f}", f"{r.stats.median():.2f}",
                     f"{r.stats.median() / none.stats.median():.2f}", f"{spread * 100:.0f} %",
                     f"{cpu[0]:.2f}", f"{cpu[1]:.2f}"])
    print_table(["contender", "best GB/s", "median GB/s", "/none", "spread", "client CPU",
                 "server CPU"], rows, right=(1, 2, 3, 4, 5, 6))
    print(f"  spread = (slowest - fastest) / median seconds of a contender's reads; the same "
          f"table from every contender (rows and a fingerprint): {same}")
    ratio = auto.stats.median() / none.stats.median()
    ok = abs(ratio - 1) <= TARGET_LOOPBACK and default == "none" and same
    verdict_line("loopback: auto / none (median GB/s)", f"{ratio:.3f}",
                 f"1 +- {TARGET_LOOPBACK}", ok)
    results = [Result(NAME, "loopback: server default (auto) / 'none' (median GB/s)",
                      f"{auto.stats.median():.2f}/{none.stats.median():.2f} = {ratio:.3f}",
                      f"1 +- {TARGET_LOOPBACK}", ok)]
    for r in readers[2:]:
        results.append(Result(NAME, f"loopback: {r.label} / 'none' (median GB/s)",
                              f"{r.stats.median():.2f}/{none.stats.median():.2f} = "
                              f"{r.stats.median() / none.stats.median():.2f}"))
    return results


# -- 3. a transfer cut at 90 % --------------------------------------------------------------


def resume(args: argparse.Namespace) -> list[Result]:
    size = max(args.size, RESUME_MIN_SIZE)
    section(f"wire: one DoGet of a {fmt_bytes(size)} run cut at {CUT_AT:.0%} and resumed")
    br = bench_run(size)
    warm_cache(br.path)
    with (
        our_server("lclstream-wire-resume", partition_bytes=HUGE_PARTITION) as server,
        CountingRelay(int(server.location.rsplit(":", 1)[1])) as relay,
    ):
        proc = ClientProcess("wire-resume-client", client_setup, relay.location,
                             server.token).ready()
        try:
            spid = psutil.Process(server.pid)
            read = (br.experiment, br.number, None, None, 1)
            full = Reader("uninterrupted", proc, spid, read, relay.downstream)
            cut = Reader(f"cut at {CUT_AT:.0%}, resumed", proc, spid, read, relay.downstream)
            reference = full.measure(check=True)  # unmeasured: the bytes a read carries
            wire_total = full.wire_bytes[-1]
            full.reset()
            cut_after = int(wire_total * CUT_AT)
            stalls, cuts, same = [], 0, True
            for rep in range(args.reps + 1):  # round 0 warms up and is not counted
                full.measure()
                relay.arm(cut_after)
                before = relay.cuts
                answer = cut.measure(check=True)  # the fingerprint is taken after the clock
                relay.disarm()
                cuts += relay.cuts - before
                if relay.cut_time is not None and relay.resumed_time is not None:
                    stalls.append(relay.resumed_time - relay.cut_time)
                same &= answer["fingerprint"] == reference["fingerprint"]
                if rep == 0:
                    full.reset()
                    cut.reset()
                    stalls.clear()
        finally:
            proc.close()

    t_full, t_cut = median(full.stats.seconds), median(cut.stats.seconds)
    cost = (t_cut - t_full) / t_full
    resent = median(cut.wire_bytes) - median(full.wire_bytes)
    print(f"  through a counting relay on loopback (compression off: the server's default for "
          f"loopback); {fmt_bytes(full.stats.nbytes)} a read (Arrow buffers), "
          f"{fmt_bytes(wire_total)} on the wire; the cut after {fmt_bytes(cut_after)}, mid-"
          f"message; {args.reps} rounds after an unmeasured one, taking turns")
    rows = []
    for r in (full, cut):
        cpu = r.cpu_per_gib()
        rows.append([r.label, f"{median(r.stats.seconds):.3f} s", f"{min(r.stats.seconds):.3f} s",
                     f"{r.stats.median():.2f}", fmt_bytes(median(r.wire_bytes)), f"{cpu[0]:.2f}",
                     f"{cpu[1]:.2f}"])
    print_table(["read", "median", "best", "median GB/s", "wire bytes", "client CPU",
                 "server CPU"], rows, right=(1, 2, 3, 4, 5, 6))
    stall = median(stalls) if stalls else float("nan")
    first = backoff_first()
    print(f"  cuts made: {cuts} in {args.reps + 1} cut reads; from the cut to the first byte of "
          f"the resumed stream: {stall * 1e3:.0f} ms (median), of which the client sleeps "
          f"{first * 1e3:.0f} ms (its back-off before the first retry: "
          f"{first / t_full * 100:.1f} % of an uninterrupted read); bytes sent again: "
          f"{fmt_bytes(resent)}; every resumed result equals the uninterrupted one (rows and a "
          f"fingerprint of every column): {same}")
    ok = cost < TARGET_RESUME and same and cuts == args.reps + 1
    verdict_line("resume: (cut - uninterrupted) / uninterrupted", f"{cost * 100:.1f} %",
                 f"< {TARGET_RESUME * 100:.0f} %", ok)
    return [
        Result(NAME, f"resume after a cut at {CUT_AT:.0%}: extra time (median)",
               f"{t_cut:.3f}/{t_full:.3f} s = +{cost * 100:.1f} %",
               f"< {TARGET_RESUME * 100:.0f} %", ok),
        Result(NAME, "resume: cut to resumed stream, bytes sent again",
               f"{stall * 1e3:.0f} ms, {fmt_bytes(resent)}"),
    ]


def backoff_first() -> float:
    """Seconds `EndpointReader` waits before its first retry (`clients.live.Backoff`'s first)."""
    from clients.live import Backoff

    return float(inspect.signature(Backoff).parameters["first"].default)


# -- 4. TLS against plaintext ----------------------------------------------------------------


def tls_pair(name: str, args: Sequence[str], token: str | None
             ) -> tuple[TlsServerProcess, TlsServerProcess]:
    """Two servers of the same command line, one plaintext, one serving grpc+tls with the
    bench's certificate (`tls_certs`)."""
    certs = tls_certs()
    return (TlsServerProcess(f"{name}-plain", args, token=token),
            TlsServerProcess(f"{name}-tls", [*args, "--tls-cert", str(certs["cert"]),
                                             "--tls-key", str(certs["key"])], token=token))


def tls_turns(servers: tuple[TlsServerProcess, TlsServerProcess], setup: Callable[..., None],
              setup_args: Callable[[TlsServerProcess], tuple], read: tuple,
              fn: Callable[..., dict[str, Any]], rounds: int) -> list[Reader]:
    """Plaintext and TLS readers, each in a client process of its own, `rounds` reads each
    after an unmeasured one (which checks both deliver the same table), taking turns in
    alternating order."""
    procs: list[ClientProcess] = []
    try:
        readers = []
        for server, label in zip(servers, ("grpc", "grpc+tls"), strict=True):
            proc = ClientProcess(f"wire-{server.name}-client", setup,
                                 *setup_args(server)).ready()
            procs.append(proc)
            readers.append(Reader(label, proc, psutil.Process(server.pid), read, lambda: 0,
                                  fn=fn))
        take_turns(readers, rounds, alternate=True)
    finally:
        for proc in procs:
            proc.close()
    return readers


def tls(args: argparse.Namespace) -> list[Result]:
    section("wire: DoGet over grpc+tls against plaintext grpc (loopback, same server settings)")
    runs = demo_runs(args.quick)
    br = bench_run(args.size)
    for path in [*sorted((DEMO / DEMO_EXPERIMENT).rglob("*.h5")), br.path]:
        warm_cache(path)
    token = bench_token()
    rounds = 2 * args.reps
    ours = our_server("wire-tls").args[1:]  # the bench data root, default settings
    cases = [("demo frames", f"{FRAMES} of demo runs {runs[0]}-{runs[-1]}",
              demo_server_args("127.0.0.1"), (DEMO_EXPERIMENT, runs, [FRAMES], None, PARALLEL)),
             ("bench run", f"bench run {fmt_bytes(args.size)}, all columns", ours,
              (br.experiment, br.number, None, None, PARALLEL))]
    measured = []  # (short name, what, [plain, tls] readers, the compression both used)
    for short, what, server_args, read in cases:
        plain, secure = tls_pair("wire-tls", server_args, token)
        with plain, secure:
            labels = []
            for server in (plain, secure):
                with server.client() as probe:
                    labels.append(compression_label(probe, *read[:3]))
            readers = tls_turns((plain, secure), client_setup,
                                lambda s: (s.location, s.token, s.tls_root_certs), read,
                                client_read, rounds)
        measured.append((short, what, readers, "/".join(sorted(set(labels)))))
    ref_args = ["-m", "bench.wire", "--reference", str(br.path), br.experiment, str(br.number)]
    plain, secure = tls_pair("wire-tls-reference", ref_args, None)
    with plain, secure:
        readers = tls_turns((plain, secure), reference_setup,
                            lambda s: (s.location, s.tls_root_certs), (), reference_read,
                            rounds)
    measured.append(("reference", f"reference (bare Flight, in memory): bench run "
                     f"{fmt_bytes(args.size)}", readers, "none"))

    print(f"  each read in a client process of its own per server (connection kept); ours: "
          f"Client.read ({PARALLEL} endpoints in flight, server default compression: the plan "
          f"says which); the reference: GetFlightInfo + DoGet of its one endpoint; TLS 1.3 "
          f"with the bench's certificate (`lclstream certs make`); {rounds} rounds after an "
          f"unmeasured one, taking turns in alternating order; GB/s = 1e9 Arrow bytes/s, "
          f"median; CPU = median CPU-s per GiB of the client process and of the server")
    rows, results = [], []
    for _, what, (plain, secure), codec in measured:
        for r in (plain, secure):
            cpu = r.cpu_per_gib()
            rows.append([what, r.label, codec, fmt_bytes(r.stats.nbytes), f"{r.stats.best():.2f}",
                         f"{r.stats.median():.2f}",
                         f"{r.stats.median() / plain.stats.median():.2f}", f"{cpu[0]:.2f}",
                         f"{cpu[1]:.2f}", f"{cpu[0] + cpu[1]:.2f}"])
    print_table(["read", "transport", "compression", "Arrow bytes", "best GB/s", "median GB/s",
                 "/grpc", "client CPU", "server CPU", "CPU total"], rows,
                right=tuple(range(3, 10)))
    for short, what, (plain, secure), _ in measured:
        ratio = secure.stats.median() / plain.stats.median()
        same = secure.check == plain.check
        reference = short == "reference"
        ok = None if reference else ratio >= TARGET_TLS and same
        if not same:
            print(f"  {what}: grpc+tls delivered another table than grpc (rows and a "
                  f"fingerprint)")
        verdict_line(f"TLS {short}: tls / grpc (median GB/s)", f"{ratio:.2f}",
                     "-" if reference else f">= {TARGET_TLS}", ok)
        results.append(Result(NAME, f"grpc+tls / grpc, {what} (median GB/s)",
                              f"{secure.stats.median():.2f}/{plain.stats.median():.2f} = "
                              f"{ratio:.2f}", "" if reference else f">= {TARGET_TLS}", ok))
    return results


def serve_reference(argv: Sequence[str]) -> int:
    """`python -m bench.wire --reference RUN.h5 EXPERIMENT RUN [--tls-cert PEM --tls-key PEM]`:
    bench/reference_server.py's bare Flight server holding the run in memory, over grpc+tls
    when given a certificate (that server takes none), on a free loopback port."""
    import pyarrow.flight as flight

    from bench.reference_server import HeldRun, ReferenceServer, load_table
    from flight_server.config import Settings
    from flight_server.sources import describe
    from flight_server.sources.streaming import BatchSizing

    p = argparse.ArgumentParser(prog="python -m bench.wire --reference")
    p.add_argument("file", type=Path)
    p.add_argument("experiment")
    p.add_argument("run", type=int)
    p.add_argument("--tls-cert", type=Path)
    p.add_argument("--tls-key", type=Path)
    args = p.parse_args(argv)
    defaults = Settings()
    sizing = BatchSizing(defaults.batch_bytes, defaults.first_batch_bytes, defaults.prefetch)
    run = describe(args.file, args.experiment, args.run)
    held = HeldRun(run, load_table(run, sizing), sizing)
    scheme, options = "grpc", {}
    if args.tls_cert is not None:
        scheme = "grpc+tls"
        options["tls_certificates"] = [flight.CertKeyPair(args.tls_cert.read_bytes(),
                                                          args.tls_key.read_bytes())]
    server = ReferenceServer(f"{scheme}://127.0.0.1:0", held, **options)
    print(f"serving {args.file} (in memory) at {scheme}://127.0.0.1:{server.port}", flush=True)
    server.serve()
    return 0


def run(args: argparse.Namespace) -> list[Result]:
    return measure_each(NAME, (link_throughput, loopback, resume, tls), args)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--reference"]:
        sys.exit("usage: python -m bench.wire --reference RUN.h5 EXPERIMENT RUN [--tls-cert "
                 "PEM --tls-key PEM] (the benchmark itself: python -m bench --only wire)")
    sys.exit(serve_reference(sys.argv[2:]))
