"""`lclstream serve | demo | generate`: run a server (and the demo's data and live acquisition),
its logging, and how it stops on a signal."""

from __future__ import annotations

import argparse
import gc
import logging
import logging.handlers
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from flight_server import config
from flight_server.config import parse_size

if TYPE_CHECKING:
    from flight_server.server import LclstreamServer


def _serve(settings: config.Settings, banner: str | None = None,
           on_start: Callable[[LclstreamServer, str], dict[str, str]] | None = None,
           on_stop: Callable[[], None] | None = None) -> int:
    from flight_server.server import LclstreamServer

    _configure_logging(settings)
    if not settings.data.is_dir():
        print(f"error: data directory {settings.data} does not exist", file=sys.stderr)
        return 2
    server = LclstreamServer(settings)
    # Everything imported and built so far lives as long as the server: keep it out of the
    # collector's full passes, which otherwise pause every thread for tens of milliseconds on
    # a heap this size (a live consumer's latency shows them).
    gc.collect()
    gc.freeze()
    location = settings.location().replace(f":{settings.port}", f":{server.port}")
    extra = on_start(server, location) if on_start else {}
    print(banner.format(location=location, **extra) if banner
          else f"serving {settings.data} at {location}", flush=True)
    if server.metrics_server is not None:
        url = server.metrics_server.url(settings.host)
        print(f"metrics at {url}/metrics, health at {url}/healthz", flush=True)
    return _serve_until_signal(server, on_stop or (lambda: None))


def _configure_logging(settings: config.Settings) -> None:
    """stderr, and with `log_file` a file rotated by size: a server runs for months, and one
    that logs a line per call must not fill its disk."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if settings.log_file is not None:
        handlers.append(logging.handlers.RotatingFileHandler(
            settings.log_file, maxBytes=settings.log_max_bytes,
            backupCount=settings.log_backups, encoding="utf-8"))
    logging.basicConfig(level=settings.log_level, handlers=handlers,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


SHUTDOWN_PATIENCE_S = 5.0


def _serve_until_signal(server: LclstreamServer, on_stop: Callable[[], None]) -> int:
    """Serve until SIGINT/SIGTERM, then `on_stop` (the demo's producer), then shut down.

    The signal is caught here rather than by pyarrow's `serve()`, which would shut down at once
    and wait for every open call: live-stream calls are first told to end (`shutdown` does
    that, after syncing every stream). A producer that is connected but idle can still keep
    gRPC waiting: after SHUTDOWN_PATIENCE_S a second Ctrl-C exits without it (nothing is lost:
    everything acknowledged or not is on disk, and the producer resends what was not
    acknowledged)."""
    import signal
    import threading

    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print("stopping ...", flush=True)
    on_stop()
    closer = threading.Thread(target=server.shutdown, name="shutdown", daemon=True)
    closer.start()
    try:
        closer.join(SHUTDOWN_PATIENCE_S)
        if closer.is_alive():
            print("waiting for live-stream producers to disconnect; Ctrl-C again to stop "
                  "now", flush=True)
            closer.join()
    except KeyboardInterrupt:
        print("server stopped (producers cut off)", flush=True)
        os._exit(0)  # the shutdown thread waits for them in gRPC, where it cannot be stopped
    print("server stopped", flush=True)
    return 0


DEMO_BANNER = """\
LCLStream Flight demo: serving {data} at {{location}} (authentication on)

{{credentials}}

From Python (in this repository's .venv):

    from clients import connect
    c = connect("{{location}}")         # finds the token in the keyring
    c.runs("tmox42619")
    df = c.polars("tmox42619", 1, columns=["gmd/energy", "tof/waveforms"])
    raw = c.numpy("tmox42619", 1, "pnccd/raw/calib", source="xtc2")   # run 1 raw, via psana
    c.sql('SELECT run, count(*), avg("gmd/energy") FROM tmox42619.events GROUP BY run')

Live stream: a simulated acquisition sends {{rate}} events/s to {{experiment}}/{{stream}}
(keeping the last {{retention}} on disk). Subscribe from Python:

    for batch in c.subscribe("{{experiment}}", "{{stream}}", from_="latest"):
        print(batch.num_rows, batch.column("gmd/energy"))

SQL tools (ADBC, JDBC, Polars, Pandas): Flight SQL at {{location}}; see README "SQL and BI tools"
Data requests run as jobs on Dask, their results a live stream, then a run:

    job = c.submit("tmox42619", 1, ["gmd/energy"], into=("tmox42619", "energies"))
    job.wait(); job.read()

Other facilities' files: mx31245 is a DECTRIS Eiger NXmx series (bitshuffle-LZ4 frames):

    frames = c.numpy("mx31245", 1, "entry/data/data")   # (180, 512, 512) uint16

Walkthroughs: notebooks/01_quickstart.ipynb, 02_sql.ipynb, 03_live.ipynb (a live monitor),
05_crystallography.ipynb (peaks on CXI and Eiger frames), 07_requests.ipynb (peaks as a job)
Command line: .venv/bin/lclstream ls | streams (live streams: rate, size, consumer lag) | jobs
Stop with Ctrl-C.
"""


def cmd_serve(args: argparse.Namespace) -> int:
    settings = config.load(args.config, {
        "data": args.data, "host": args.host, "port": args.port,
        "batch_bytes": args.batch_bytes, "partition_bytes": args.partition_bytes,
        "auth": False if args.no_auth else None, "state_dir": args.state_dir,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca,
        "audit_log": args.audit_log, "log_file": args.log_file,
        "job_workers": args.job_workers, "dask_scheduler": args.dask_scheduler,
        "compression": args.compression, "metrics_port": args.metrics_port,
        "cluster": True if args.cluster else None, "state_url": args.state_url,
        "advertise": args.advertise,
    })
    return _serve(settings)


DEMO_USER, DEMO_TOKEN_TTL = "demo", 7 * 86400


def _demo_credentials(server: LclstreamServer, location: str) -> dict[str, str]:
    """A demo user (for password logins) and a week-long read-all token kept in the keyring, so
    that notebooks connect without a login step."""
    import secrets

    from clients import credentials
    from flight_server.security.grants import Grants
    from flight_server.security.keys import write_private
    from flight_server.security.users import UsersFile

    if server.security.minter is None:
        return {"credentials": "Authentication is OFF."}
    # write too: the demo's notebooks submit jobs and produce live streams into its experiments
    grants = Grants.build(read=["*"], write=["*"])
    password_file = server.settings.state_path() / "demo-password"
    users = UsersFile(server.settings.users_path())
    if DEMO_USER not in users.users() or not password_file.exists():
        write_private(password_file, secrets.token_urlsafe(12).encode())
        users.add(DEMO_USER, password_file.read_text(), grants)
    token = server.security.minter.mint(DEMO_USER, grants, DEMO_TOKEN_TTL)
    try:
        credentials.store_token(location, token)
        kept = f"Token (read and write all, 7 days) kept in {credentials.keyring_description()}:"
    except Exception as exc:  # no usable keyring: the printed token still works
        kept = f"No keyring ({exc}); export LCLSTREAM_TOKEN with this token:"
    return {"credentials": f"{kept}\n    {token}\nPassword login (ADBC, `lclstream login "
                           f"{location}`): user {DEMO_USER}, password {password_file.read_text()}"}


DEMO_EXPERIMENT, DEMO_STREAM = "tmox42619", "live"
DEMO_LIVE_RATE = 120.0
DEMO_LIVE_RETENTION = 512 << 20  # about two minutes at 120 Hz: the demo never fills the disk


class DemoAcquisition:
    """The demo's live stream: a thread in the server's process sends simulated events to it,
    with a token of its own that may write the demo experiment (the printed token only reads).
    `stop` ends the sending before the server shuts down, since the server waits for open
    calls, this producer's included, to finish."""

    def __init__(self, experiment: str = DEMO_EXPERIMENT, stream: str = DEMO_STREAM,
                 rate: float = DEMO_LIVE_RATE, retention_bytes: int = DEMO_LIVE_RETENTION
                 ) -> None:
        import threading

        self.experiment, self.stream, self.rate = experiment, stream, rate
        self.retention_bytes = retention_bytes
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _free_stream(self, server: LclstreamServer) -> str:
        """The demo stream, or a new name if someone ended it as a run (an ended stream takes
        no more events) or an older version of the simulator left other columns in it."""
        from flight_server.generator.simulator import event_schema

        taken = {s.name for s in server.live.streams.streams()
                 if s.experiment == self.experiment and (s.ended or (
                     s.schema is not None and not s.schema.equals(event_schema())))}
        name, n = self.stream, 1
        while name in taken:
            n += 1
            name = f"{self.stream}-{n}"
        return name

    def start(self, server: LclstreamServer, location: str) -> dict[str, str]:
        import threading

        from flight_server.security.grants import Grants

        self.stream = self._free_stream(server)
        token = None
        if server.security.minter is not None:
            token = server.security.minter.mint(f"{DEMO_USER}-acquisition",
                                                Grants.build(write=[self.experiment]),
                                                DEMO_TOKEN_TTL)
        options = {"tls_root_certs": server.settings.tls_cert} \
            if location.startswith("grpc+tls") else {}
        self._thread = threading.Thread(target=self._run, args=(location, token, options),
                                        name="demo-acquisition", daemon=True)
        self._thread.start()
        return {"experiment": self.experiment, "stream": self.stream, "rate": f"{self.rate:g}",
                "retention": f"{self.retention_bytes / 2**20:.0f} MiB"}

    def _run(self, location: str, token: str | None, options: dict) -> None:
        from clients import connect
        from flight_server.generator.simulator import produce

        try:
            with connect(location, token, **options) as client:
                produce(client, self.experiment, self.stream, rate=self.rate, stop=self._stop,
                        retention_bytes=self.retention_bytes)
        except Exception:
            if not self._stop.is_set():
                logging.getLogger(__name__).exception(
                    "the demo's live stream %s/%s stopped", self.experiment, self.stream)

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    from flight_server.generator import generate_demo

    settings = config.load(args.config, {"data": args.data, "port": args.port,
                                         "host": args.host})
    print(f"preparing demo data in {settings.data} ...", flush=True)
    generate_demo(settings.data)
    acquisition = DemoAcquisition()

    def start(server: LclstreamServer, location: str) -> dict[str, str]:
        return {**_demo_credentials(server, location), **acquisition.start(server, location)}

    return _serve(settings, DEMO_BANNER.format(data=settings.data), start, acquisition.stop)


def cmd_generate(args: argparse.Namespace) -> int:
    from flight_server import generator

    out = Path(args.data)
    if args.layout == "demo":
        paths = generator.generate_demo(out, seed=args.seed)
    elif args.layout == "nxmx":
        paths = [generator.generate_nxmx_series(out / args.experiment, args.run, args.events,
                                                seed=args.seed)]
    elif args.layout == "xtc2":
        paths = generator.generate_xtc2_run(out / args.experiment / "xtc", args.experiment,
                                            args.run, args.events, seed=args.seed)
    elif args.layout == "bench":
        paths = [generator.generate_bench_run(out / args.experiment / f"run_{args.run}.h5",
                                              parse_size(args.size), seed=args.seed)]
    else:
        make = {"lcls2": generator.generate_lcls2_run, "lcls1": generator.generate_lcls1_run,
                "cxi": generator.generate_cxi_run}[args.layout]
        suffix = "cxi" if args.layout == "cxi" else "h5"
        path = out / args.experiment / f"{args.experiment}_Run{args.run:04d}.{suffix}"
        paths = [make(path, args.run, n_events=args.events, seed=args.seed)]
    for p in paths:
        print(p)
    return 0
