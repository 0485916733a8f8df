"""Bridges: facility ZMQ streams into live streams, against a plain ZMQ loop decoding the same
messages.

For each format `lclstream bridge` reads (lclstreamer-hdf5, dectris-stream2 with and without
bitshuffle-LZ4, karabo-bridge), a sender process pre-builds the messages (1 MiB frames, one an
event) as the facility's software writes them and sends them as fast as the receiver takes them:
a PUSH socket that sends everything at once, or for karabo-bridge a REP socket that answers each
request with the next message (as `karabo_bridge`'s servers and simulator do; the bridge's
default socket for it is REQ). Contenders, taking turns, each a fresh process connecting to the
sender's socket, as in production:

- *reference*: a plain loop (LOOP_SCRIPT) that receives each message on a PULL (REQ) socket and
  decodes it with the same format's `decode()`, then drops it: the work any consumer pays;
- *ours*: `lclstream bridge FORMAT --connect ... --into bench/STREAM --messages N` into our
  server (authentication on, fresh data root), timed until it prints that it stopped, i.e. every
  event acknowledged (durable: the server's fsync policy);
- *sink*, for information: the same bridge into `bench/reference_server.py --live`, which acks
  every batch at once and keeps nothing: the bridge's own cost without our storage.

Each contender first receives a few messages (WARM_MESSAGES, and a DECTRIS series' start), and
the sender waits until it and its server are idle (imports done, the stream opened, the first
batches acknowledged) before it sends the timed ones: a bridge runs for hours, so its start-up is
not what is measured. Times run from the first timed message to the last message decoded
(reference) or the bridge's stop line (ours: every event acknowledged), on the system-wide
monotonic clock; CPU is that of the contender's process (and of its server) over the same span.
Target: ours / reference >= 0.8 in events/s for the 1 MiB frames. Beside them, lclstreamer
messages of 1000 small events (277 B each: four scalars and 64 float32), events/s of ours
beside the loop's.

Only columns a live stream stores are sent: numbers, arrays of numbers (a stream refuses a batch
with a boolean or text column, or a float `timestamp`; see `lclstreamer_small` and `karabo`).
Our server writes into a fresh data root, removed at the end (about 8 GiB in a full run), one
stream a format for all its rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import psutil

from bench import SET_FOR_CLIENT
from bench.common import (
    LOGS,
    ROOT,
    ClientProcess,
    Result,
    ServerProcess,
    cpu_seconds,
    fmt_bytes,
    kept,
    median,
    print_table,
    reference_server,
    section,
    verdict_line,
)
from bench.live import LiveServer, fresh_dir

NAME = "bridges"
EXPERIMENT = "bench"
TARGET = 0.8  # ours / reference, events/s of 1 MiB frames
FRAME = (512, 1024)  # uint16: 1 MiB an event
POOL = 16  # distinct frames, cycled
SMALL_EVENTS = 1000  # events a small-event message
SMALL_VALUES = 64  # float32 values an event, beside four scalars
SINK_STREAM = "bridges"  # every round's stream in the in-memory sink
ROUND_TIMEOUT = 180.0  # seconds a contender may take for one round
WARM_MESSAGES = 8  # data messages each contender receives before it idles and the timed ones
IDLE_S, IDLE_CPU = 0.3, 0.01  # idle: at most 10 ms of CPU in 300 ms (10 ms: psutil's tick)
BACKGROUND = 0.3  # photons a pixel on average: dectris frames ~80 % zeros, bslz4 ratio ~8


@dataclass(frozen=True)
class Case:
    key: str  # stream names and the sender's builder
    label: str
    fmt: str  # as `lclstream bridge FORMAT` names it
    sender: str  # the sender's socket: "PUSH" or "REP"
    messages: int  # data messages a round
    events_per_message: int = 1
    frames: bool = True  # 1 MiB frames (the target) or small events (informational)


def cases(quick: bool) -> list[Case]:
    n = 64 if quick else 384  # 384 MiB: below the bridge's default queue (512 MiB), no drops
    small = 16 if quick else 100
    return [
        Case("lclstreamer", "lclstreamer-hdf5, 1 frame a message", "lclstreamer-hdf5", "PUSH", n),
        Case("dectris-bslz4", "dectris-stream2, bslz4", "dectris-stream2", "PUSH", n),
        Case("dectris-raw", "dectris-stream2, uncompressed", "dectris-stream2", "PUSH", n),
        Case("karabo", "karabo-bridge (REQ/REP)", "karabo-bridge", "REP", n),
        Case("lclstreamer-small", f"lclstreamer-hdf5, {SMALL_EVENTS} small events a message",
             "lclstreamer-hdf5", "PUSH", small, SMALL_EVENTS, frames=False),
    ]


# -- messages (built in the sender process) --------------------------------------------------


def dense_frames(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (POOL, *FRAME), dtype=np.uint16)


def sparse_frames(seed: int) -> np.ndarray:
    """Photon-counting frames as an Eiger sees them: Poisson background (mostly zeros), ~40
    Bragg spots, and a cross of module gaps at the type's maximum, as DECTRIS marks them."""
    rng = np.random.default_rng(seed)
    frames = rng.poisson(BACKGROUND, (POOL, *FRAME)).astype(np.uint16)
    yy, xx = np.mgrid[-3:4, -3:4]
    spot = np.exp(-(yy**2 + xx**2) / 2.0)
    for f in frames:
        for y, x, amp in zip(rng.integers(4, FRAME[0] - 4, 40), rng.integers(4, FRAME[1] - 4, 40),
                             rng.integers(50, 5000, 40), strict=True):
            f[y - 3:y + 4, x - 3:x + 4] += (amp * spot).astype(np.uint16)
        f[FRAME[0] // 2 - 1:FRAME[0] // 2 + 1, :] = 0xFFFF
        f[:, FRAME[1] // 2 - 1:FRAME[1] // 2 + 1] = 0xFFFF
    return frames


LCLS2_EPOCH_NS = 631152000 * 10**9  # 1990-01-01


def raw_times(first: int, n: int) -> np.ndarray:
    """LCLS2 raw times (seconds since 1990 << 32 | ns) of events at 120 Hz: psana's
    `timestamp`, an integer (a live stream refuses a float `timestamp`)."""
    ns = 1_700_000_000 * 10**9 - LCLS2_EPOCH_NS + np.arange(first, first + n) * 8_333_333
    return (ns // 10**9) << 32 | ns % 10**9


def lclstreamer_frames(n: int) -> tuple[list, list, list]:
    """The seed's HDF5 messages (no compression, its default), one 512x1024 uint16 frame each."""
    from tests.live.bridges.messages import lclstreamer_message

    frames = dense_frames(1)
    data = [[lclstreamer_message({"timestamp": raw_times(i, 1).astype(np.uint64),
                                  "pulseenergy": np.array([1.0 + i % 100 / 100]),
                                  "fiducial": np.array([i], np.int32),
                                  "data/data": frames[i % POOL][None]})] for i in range(n)]
    return [], data, []


def lclstreamer_small(n: int) -> tuple[list, list, list]:
    """The seed's HDF5 messages of SMALL_EVENTS events: timestamp (uint64), pulse energy
    (float64), fiducial (int32), hit (uint8: a stream stores no bool) and SMALL_VALUES float32
    (peaks): 277 bytes an event."""
    from tests.live.bridges.messages import lclstreamer_message

    rng = np.random.default_rng(2)
    data = []
    for i in range(n):
        first = i * SMALL_EVENTS
        data.append([lclstreamer_message({
            "timestamp": raw_times(first, SMALL_EVENTS).astype(np.uint64),
            "pulseenergy": rng.random(SMALL_EVENTS),
            "fiducial": np.arange(first, first + SMALL_EVENTS, dtype=np.int32),
            "hit": (rng.random(SMALL_EVENTS) > 0.5).astype(np.uint8),
            "peaks": rng.random((SMALL_EVENTS, SMALL_VALUES)).astype(np.float32),
        })])
    return [], data, []


def dectris(n: int, compression: str | None) -> tuple[list, list, list]:
    """A Stream V2 series as the detector sends it: start (with its pixel mask and flatfield),
    n images of one channel, end."""
    from tests.live.bridges import dectris_messages as dm

    channels = ("threshold_1",)
    frames = sparse_frames(3)
    unique = "BENCH0000000000000000000001"
    start = dm.encode(dm.start_message(FRAME, "uint16", channels, n, compression, 1, unique))
    images = [[dm.encode(dm.image_message(i, {channels[0]: frames[i % POOL]}, compression, 1,
                                          unique))] for i in range(n)]
    return [[start]], images, [[dm.encode(dm.end_message(1, unique))]]


KARABO_DETECTOR = "SPB_IRDA_JF4M/DET/JNGFR01:daqOutput"  # a JUNGFRAU module: 512x1024 uint16
KARABO_MOTOR = "SPB_IRU_MOTORS/MOTOR/X"


def karabo(n: int) -> tuple[list, list, list]:
    """karabo_bridge's own serializer (protocol 2.2): a JUNGFRAU module's train (one memory
    cell: `data.adc` 1x512x1024 uint16, and its per-cell arrays) and a motor's numbers. No
    text or booleans (a motor's `state`, `isMoving`): a live stream stores numbers only, and
    refuses a batch with such a column."""
    from karabo_bridge import serialize

    frames = dense_frames(4)
    data = []
    for i in range(n):
        tid = 10_000_000_000 + i
        ts = 1.7e9 + i / 10
        sec, frac = f"{ts:.6f}".split(".")
        train = {
            KARABO_DETECTOR: {"data.adc": frames[i % POOL][None],
                              "data.frameNumber": np.array([i], np.uint64),
                              "data.memoryCell": np.zeros(1, np.uint8),
                              "data.timestamp": np.array([ts]),
                              "header.pulseCount": 1},
            KARABO_MOTOR: {"actualPosition": 1.5 + i * 1e-3, "encoderPosition": i},
        }
        meta = {src: {"source": src, "timestamp": ts, "timestamp.sec": sec,
                      "timestamp.frac": frac.ljust(18, "0"), "timestamp.tid": tid}
                for src in train}
        data.append(serialize(train, meta, protocol_version="2.2"))
    return [], data, []


BUILDERS: dict[str, Callable[[int], tuple[list, list, list]]] = {
    "lclstreamer": lclstreamer_frames,
    "lclstreamer-small": lclstreamer_small,
    "dectris-bslz4": lambda n: dectris(n, "bslz4"),
    "dectris-raw": lambda n: dectris(n, None),
    "karabo": karabo,
}


def _nbytes(parts: list) -> int:
    return sum(memoryview(p).nbytes for p in parts)


# -- the sender (a client process) -----------------------------------------------------------

_messages: dict[str, list] = {}  # in the sender: head, data and tail messages (parts each)


def task_build(key: str, n: int) -> dict[str, Any]:
    """Build the case's messages (what went before is dropped); their sizes."""
    _messages.clear()
    t0 = time.perf_counter()
    head, data, tail = BUILDERS[key](n)
    _messages.update(head=head, data=data, tail=tail)
    wire = [_nbytes(m) for m in data]
    return {"seconds": time.perf_counter() - t0, "data_bytes": sum(wire),
            "control_bytes": sum(_nbytes(m) for m in head + tail),
            "control": len(head) + len(tail), "message_bytes": median(wire)}


def task_open(kind: str) -> str:
    """A socket of `kind` bound on a free loopback port, kept for `task_send`; its endpoint."""
    import zmq

    ctx = kept("zmq", zmq.Context)
    sock = ctx.socket(getattr(zmq, kind))
    sock.setsockopt(zmq.LINGER, 60_000)  # a PUSH's last messages still go after close()
    sock.bind("tcp://127.0.0.1:*")
    _messages["socket"] = sock
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def wait_idle(procs: list[psutil.Process], timeout: float = 60.0) -> float:
    """Wait until each process has used at most IDLE_CPU CPU seconds over IDLE_S seconds (done
    with what it was sent: decoded, sent, acknowledged, stored); the seconds waited."""
    t_start = now = time.monotonic()
    since, last = now, [cpu_seconds(p) for p in procs]
    while now - t_start < timeout:
        time.sleep(0.05)
        now = time.monotonic()
        cpu = [cpu_seconds(p) for p in procs]
        if any(c - c0 > IDLE_CPU for c, c0 in zip(cpu, last, strict=True)):
            since, last = now, cpu  # busy: the quiet window starts again
        elif now - since >= IDLE_S:
            return now - t_start
    raise RuntimeError(f"the receiver was still busy {timeout:.0f} s after its warm-up messages")


def task_send(count: int, warm: int, pids: list[int],
              timeout: float = ROUND_TIMEOUT) -> tuple[int, list[float], float]:
    """Send the head and `warm` data messages, wait until the processes `pids` (the receiver,
    its server) are idle, then send `count` data messages and the tail; each as fast as the
    peer takes them (PUSH all at once, REP one per request), once a peer is there. The monotonic
    ns of the first timed message, the CPU seconds of `pids` then, and the seconds waited."""
    import zmq

    sock = _messages.pop("socket")
    data = _messages["data"]
    first = _messages["head"] + data[:warm]
    timed = data[warm:warm + count] + _messages["tail"]
    push = sock.socket_type == zmq.PUSH
    procs = [psutil.Process(p) for p in pids]
    t0, cpu0, waited = 0, [], 0.0
    try:
        if push and not sock.poll(timeout * 1000, zmq.POLLOUT):  # writable once a peer is there
            raise RuntimeError(f"no receiver connected in {timeout:.0f} s")
        for i, m in enumerate(first + timed):
            if i == len(first):
                # the receiver warms up: imports (pyarrow's first pa.array imports pandas:
                # 0.3 s), first batch, stream opened, the bridge's linger
                waited = wait_idle(procs)
            if not push:
                if not sock.poll(timeout * 1000, zmq.POLLIN):
                    raise RuntimeError(f"no request in {timeout:.0f} s")
                sock.recv()
            if i == len(first):
                cpu0 = [cpu_seconds(p) for p in procs]
                t0 = time.monotonic_ns()
            sock.send_multipart(m, copy=False)
        return t0, cpu0, waited
    finally:
        sock.close()


# -- the contenders (fresh processes) --------------------------------------------------------

# The reference: receive and decode each message with the format's decoder, as the bridge's
# receiver and decoder do, nothing else. One JSON line out.
LOOP_SCRIPT = """
import json, sys, time
import zmq
from flight_server.live.bridges.bridge import make_format
fmt_name, endpoint, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fmt = make_format(fmt_name)
sock = zmq.Context.instance().socket(getattr(zmq, fmt.socket_type))
sock.setsockopt(zmq.RCVHWM, 1000)  # as the bridge's receiver
sock.setsockopt(zmq.LINGER, 0)
sock.connect(endpoint)
request = fmt.request()
events = nbytes = bad = 0
for _ in range(n):
    if request is not None:
        sock.send(request)
    frames = sock.recv_multipart(copy=False)
    try:
        decoded = fmt.decode([f.buffer for f in frames])
    except ValueError:
        bad += 1
        continue
    if decoded.batch is not None:
        events += decoded.batch.num_rows
        nbytes += decoded.batch.nbytes
    del decoded, frames
end = time.monotonic_ns()
print(json.dumps({"end_ns": end, "cpu": time.process_time(), "events": events,
                  "bytes": nbytes, "bad": bad}), flush=True)
sock.close(0)
"""

SUMMARY = re.compile(r"(\d+) messages received .* (\d+) events sent in (\d+) batches, (\d+) "
                     r"messages dropped \(queue full\), (\d+) not .*, (\d+) events refused")


def consumer_env(token: str | None) -> dict[str, str]:
    """The environment of a production process: without the bench client's settings (see
    bench/__init__.py), with the bench's token for the bridge."""
    env = {k: v for k, v in os.environ.items() if k not in SET_FOR_CLIENT}
    env.pop("LCLSTREAM_TOKEN", None)
    if token:
        env["LCLSTREAM_TOKEN"] = token
    return env


@dataclass
class Outcome:
    end_ns: int  # monotonic ns: the last message decoded, or the bridge stopped (all acked)
    cpu: float  # CPU seconds of the contender's process so far
    server_cpu: float | None  # of the server it sent to, so far
    events: int
    nbytes: int  # Arrow bytes of the decoded rows (reference only)
    problem: str | None  # why the round is not complete (events missing, dropped, ...)


def watchdog(proc: subprocess.Popen) -> threading.Timer:
    timer = threading.Timer(ROUND_TIMEOUT, lambda: proc.poll() is None and proc.kill())
    timer.daemon = True
    timer.start()
    return timer


Started = Callable[[list[int]], None]  # told the pids to watch once the contender runs


def run_loop(case: Case, endpoint: str, n: int, started: Started) -> Outcome:
    log = LOGS / f"bridges-loop-{case.key}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", LOOP_SCRIPT, case.fmt, endpoint, str(n)],
                                cwd=ROOT, env=consumer_env(None), stdout=subprocess.PIPE,
                                stderr=err, text=True)
        timer = watchdog(proc)
        try:
            started([proc.pid])
            out, _ = proc.communicate()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode:
        raise RuntimeError(f"the reference loop exited with status {proc.returncode}; log {log}:"
                           f"\n{log.read_text(errors='replace')[-2000:]}")
    got = json.loads(out.strip().splitlines()[-1])
    problem = f"{got['bad']} messages not decoded" if got["bad"] else None
    return Outcome(got["end_ns"], got["cpu"], None, got["events"], got["bytes"], problem)


def run_bridge(case: Case, endpoint: str, n: int, started: Started, server: ServerProcess,
               stream: str, label: str) -> Outcome:
    """`lclstream bridge` until it has received `n` messages and stopped (every event acked);
    its stop line is read as it is printed, the CPU of the bridge and the server taken then."""
    log = LOGS / f"bridges-{label}-{case.key}.log"
    args = [sys.executable, "-m", "flight_server.cli", "bridge", case.fmt, "--connect", endpoint,
            "--into", f"{EXPERIMENT}/{stream}", "--messages", str(n), "--server",
            server.location]
    srv = psutil.Process(server.pid)
    end: tuple[int, float, float] | None = None
    summary = ""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=consumer_env(server.token),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        timer = watchdog(proc)
        try:
            me = psutil.Process(proc.pid)
            started([proc.pid, server.pid])
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("bridge stopped "):
                    now = time.monotonic_ns()
                    # the process is alive, or a zombie not yet reaped: its times are there
                    with contextlib.suppress(psutil.Error):
                        end = (now, cpu_seconds(me), cpu_seconds(srv))
                    summary = line
                out.write(line)
            rc = proc.wait()
        finally:
            timer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if rc or end is None:
        raise RuntimeError(f"the bridge ({label}) exited with status {rc}; log {log}:\n"
                           f"{log.read_text(errors='replace')[-2000:]}")
    match = SUMMARY.search(summary)
    if match is None:
        raise RuntimeError(f"the bridge's summary line is not understood: {summary!r}")
    received, events, _batches, dropped, bad, refused = map(int, match.groups())
    problem = None
    if dropped or bad or refused or received != n:
        problem = f"{received} received, {dropped} dropped, {bad} bad, {refused} refused"
    return Outcome(end[0], end[1], end[2], events, 0, problem)


Run = Callable[[str, int, Started, str], Outcome]  # (endpoint, messages, started, stream)


@dataclass
class Contender:
    label: str
    run: Run
    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warm_s: list[float] = field(default_factory=list)  # from the warm-up messages to idle

    def events_per_s(self, events: int, best: bool = False) -> float:
        if not self.seconds:
            return 0.0
        return events / (min(self.seconds) if best else median(self.seconds))


def measure(sender: ClientProcess, case: Case, c: Contender, stream: str) -> Outcome:
    """One round: the sender's socket bound, the contender started, the sender told to send
    once it runs; the time and CPU from the first timed message to the contender's end."""
    endpoint = sender.call(task_open, case.sender)
    n = WARM_MESSAGES + case.messages + (2 if case.fmt == "dectris-stream2" else 0)  # + start, end

    def started(pids: list[int]) -> None:
        sender.start(task_send, case.messages, WARM_MESSAGES, pids)

    outcome = c.run(endpoint, n, started, stream)  # should it fail, the caller replaces the sender
    t0, cpu0, waited = sender.result()
    c.warm_s.append(waited)
    expected = (WARM_MESSAGES + case.messages) * case.events_per_message
    if outcome.events != expected and outcome.problem is None:
        outcome.problem = f"{outcome.events} events of {expected}"
    c.seconds.append((outcome.end_ns - t0) / 1e9)
    c.cpu.append(outcome.cpu - cpu0[0])
    if outcome.server_cpu is not None:
        c.server_cpu.append(outcome.server_cpu - cpu0[1])
    if outcome.problem:
        c.problems.append(outcome.problem)
    return outcome


def stored_events(server: LiveServer, stream: str) -> tuple[int, int]:
    """(events, dropped upstream) our server lists for the stream."""
    with server.client() as client:
        for s in client.streams(EXPERIMENT):
            if s["stream"] == stream:
                return s["events"], s["dropped_upstream"]
    return 0, 0


def bench_case(case: Case, reps: int, sender: ClientProcess, ours: LiveServer,
               sink: ServerProcess) -> tuple[list[Result], dict[str, float]]:
    built = sender.call(task_build, case.key, WARM_MESSAGES + case.messages)
    events = case.messages * case.events_per_message
    wire = built["data_bytes"]
    size = fmt_bytes(built["message_bytes"])
    section(f"bridges: {case.label}, {case.messages} messages of {size} ({events:,} events)")
    extra = (f", plus {built['control']} control messages of {fmt_bytes(built['control_bytes'])}"
             if built["control"] else "")
    print(f"  {fmt_bytes(wire)} on the wire{extra}; built in {built['seconds']:.1f} s by the "
          f"sender", flush=True)

    def bridge_into(server: ServerProcess, label: str) -> Run:
        return lambda endpoint, n, started, stream: run_bridge(case, endpoint, n, started,
                                                               server, stream, label)

    contenders = [
        Contender("reference: ZMQ loop, receive + decode",
                  lambda endpoint, n, started, _: run_loop(case, endpoint, n, started)),
        Contender("lclstream bridge -> our server", bridge_into(ours, "ours")),
        Contender("lclstream bridge -> in-memory sink (reference server)",
                  bridge_into(sink, "sink")),
    ]
    ref, mine, into_sink = contenders
    per_event = 0.0  # Arrow bytes of a decoded event
    # One stream of ours a format, for all its rounds (as a bridge feeds one stream for hours),
    # one for everything in the sink: each server keeps the last 256 MiB of every stream in
    # memory, and a stream a round would fill the page cache's memory with them.
    stream = f"bridge-{case.key}"
    expected = (WARM_MESSAGES + case.messages) * case.events_per_message
    for _ in range(reps):
        for c in contenders:
            if c is mine:
                before, _ = stored_events(ours, stream)
            outcome = measure(sender, case, c, SINK_STREAM if c is into_sink else stream)
            if c is ref:
                per_event = outcome.nbytes / max(1, outcome.events)
            if c is mine:
                stored, dropped = stored_events(ours, stream)
                if stored - before != expected or dropped:
                    c.problems.append(f"the server lists {stored - before} new events of "
                                      f"{expected}, {dropped} dropped upstream")

    print(f"  {reps} rounds, taking turns; each contender a fresh process that receives "
          f"{WARM_MESSAGES} messages first and, once it (and its server) idled "
          f"{IDLE_S * 1e3:.0f} ms, the {case.messages} timed ones; events/s over the median "
          f"round; MB/s of decoded rows (Arrow bytes, {fmt_bytes(per_event)} an event); CPU = "
          f"CPU seconds per GB decoded; warm-up = seconds from the first messages to idle",
          flush=True)
    decoded = per_event * events
    rows = []
    gb = decoded / 1e9
    for c in contenders:
        rate = c.events_per_s(events)
        rows.append([c.label, f"{c.events_per_s(events, best=True):,.0f}", f"{rate:,.0f}",
                     f"{rate / ref.events_per_s(events):.2f}",
                     f"{rate * decoded / events / 1e6:,.0f}", f"{median(c.cpu) / gb:.2f}",
                     f"{median(c.server_cpu) / gb:.2f}" if c.server_cpu else "-",
                     f"{median(c.warm_s):.2f}", "yes" if not c.problems else "NO"])
    print_table(["contender", "best ev/s", "median ev/s", "/ref", "MB/s", "CPU/GB",
                 "server CPU/GB", "warm-up s", "all events"], rows, right=(1, 2, 3, 4, 5, 6, 7))
    for c in contenders:
        for problem in sorted(set(c.problems)):
            print(f"  {c.label}: {problem}")
    if mine.cpu and mine.server_cpu:
        # With the bridge and the server on the same cores, their CPU bounds the rate.
        per_event_cpu = (median(mine.cpu) + median(mine.server_cpu)) / events
        ceiling = (os.cpu_count() or 1) / per_event_cpu
        print(f"  ours: bridge + server spend {per_event_cpu * 1e3:.2f} CPU-ms an event (the loop "
              f"{median(ref.cpu) / events * 1e3:.2f}): at most {ceiling:,.0f} events/s on "
              f"{os.cpu_count()} cores; ours reached {mine.events_per_s(events) / ceiling:.2f} of "
              f"that")
    ratio = mine.events_per_s(events) / ref.events_per_s(events)
    sink_ratio = into_sink.events_per_s(events) / ref.events_per_s(events)
    figures = f"{mine.events_per_s(events):,.0f}/{ref.events_per_s(events):,.0f} = {ratio:.2f}"
    complete = not mine.problems and not ref.problems
    if case.frames:
        ok = ratio >= TARGET and complete
        verdict_line(f"{case.key}: ours/loop (events/s)", f"{ratio:.2f}", f">= {TARGET}", ok)
        result = Result(NAME, f"{case.label}: ours/loop (events/s)", figures, f">= {TARGET}", ok)
    else:
        print(f"  events/s: ours {mine.events_per_s(events):,.0f}, the plain loop "
              f"{ref.events_per_s(events):,.0f} ({ratio:.2f}){'' if complete else '  INCOMPLETE'}")
        result = Result(NAME, f"{case.label}: ours/loop (events/s)", figures, "",
                        None if complete else False)
    return [result], {case.key: sink_ratio}


def run(args: argparse.Namespace) -> list[Result]:
    results: list[Result] = []
    sink_ratios: dict[str, float] = {}
    reps = min(args.reps, 2) if args.quick else args.reps  # 45 fresh processes a round
    with contextlib.ExitStack() as stack:
        ours = stack.enter_context(LiveServer(
            "lclstream-bridges", stack.enter_context(fresh_dir("bridges")), "interval"))
        sink = stack.enter_context(reference_server(live=True, name="bridges-sink"))
        sender = stack.enter_context(ClientProcess("bridge-sender", timeout=ROUND_TIMEOUT + 60))
        sender.ready()
        for case in cases(args.quick):
            try:
                got, ratios = bench_case(case, reps, sender, ours, sink)
                results += got
                sink_ratios.update(ratios)
            except Exception as exc:  # one broken format must not hide the others' figures
                print(f"  bridges {case.key} failed: {type(exc).__name__}: {exc}",
                      file=sys.stderr)
                results.append(Result(NAME, f"{case.label}", f"error: {type(exc).__name__}",
                                      "completes", False))
                # the sender may still wait for a receiver: a new one
                sender.close()
                sender = stack.enter_context(ClientProcess("bridge-sender",
                                                           timeout=ROUND_TIMEOUT + 60))
                sender.ready()
    if sink_ratios:
        results.append(Result(NAME, "bridge into in-memory sink / loop (events/s)",
                              ", ".join(f"{k} {v:.2f}" for k, v in sink_ratios.items())))
    return results
