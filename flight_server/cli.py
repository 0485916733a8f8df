"""`lclstream serve | demo | generate | ls | get | sql | produce | streams`."""

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

from flight_server import cli_security, config

if TYPE_CHECKING:
    from flight_server.server import LclstreamServer

DEFAULT_SERVER = os.environ.get("LCLSTREAM_SERVER", "grpc://127.0.0.1:8815")


def _size(text: str) -> int:
    """'4MiB', '256M', '1GiB' or a plain byte count."""
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _events(text: str | None) -> slice | None:
    if not text:
        return None
    parts = [int(p) if p else None for p in text.split(":")]
    if not 1 <= len(parts) <= 3:
        raise argparse.ArgumentTypeError("events must be START:STOP[:STEP]")
    return slice(*parts) if len(parts) > 1 else slice(parts[0], parts[0] + 1)


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
    c.sql('SELECT run, count(*), avg("gmd/energy") FROM tmox42619.events GROUP BY run')

Live stream: a simulated acquisition sends {{rate}} events/s to {{experiment}}/{{stream}}
(keeping the last {{retention}} on disk). Subscribe from Python:

    for batch in c.subscribe("{{experiment}}", "{{stream}}", from_="latest"):
        print(batch.num_rows, batch.column("gmd/energy"))

SQL tools (ADBC, JDBC, Polars, Pandas): Flight SQL at {{location}}; see README "SQL and BI tools"
Walkthroughs: notebooks/01_quickstart.ipynb, 02_sql.ipynb, 03_live.ipynb (a live monitor)
Command line: .venv/bin/lclstream ls | streams (live streams: rate, size, consumer lag)
Stop with Ctrl-C.
"""


def cmd_serve(args: argparse.Namespace) -> int:
    settings = config.load(args.config, {
        "data": args.data, "host": args.host, "port": args.port,
        "batch_bytes": args.batch_bytes, "partition_bytes": args.partition_bytes,
        "auth": False if args.no_auth else None, "state_dir": args.state_dir,
        "tls_cert": args.tls_cert, "tls_key": args.tls_key, "tls_client_ca": args.tls_client_ca,
        "audit_log": args.audit_log, "log_file": args.log_file,
    })
    return _serve(settings)


DEMO_USER, DEMO_TOKEN_TTL = "demo", 7 * 86400


def _demo_credentials(server: LclstreamServer, location: str) -> dict[str, str]:
    """A demo user (for password logins) and a week-long read-all token kept in the keyring, so
    that notebooks connect without a login step."""
    import secrets

    from clients import credentials
    from flight_server.grants import Grants
    from flight_server.state import write_private
    from flight_server.users import UsersFile

    if server.security.minter is None:
        return {"credentials": "Authentication is OFF."}
    grants = Grants.build(read=["*"])
    password_file = server.settings.state_path() / "demo-password"
    users = UsersFile(server.settings.users_path())
    if DEMO_USER not in users.users() or not password_file.exists():
        write_private(password_file, secrets.token_urlsafe(12).encode())
        users.add(DEMO_USER, password_file.read_text(), grants)
    token = server.security.minter.mint(DEMO_USER, grants, DEMO_TOKEN_TTL)
    try:
        credentials.store_token(location, token)
        kept = f"Token (read all, 7 days) kept in {credentials.keyring_description()}:"
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
        from flight_server.simulator import event_schema

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

        from flight_server.grants import Grants

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
        from flight_server.simulator import produce

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
    elif args.layout == "bench":
        paths = [generator.generate_bench_run(out / args.experiment / f"run_{args.run}.h5",
                                              _size(args.size), seed=args.seed)]
    else:
        make = {"lcls2": generator.generate_lcls2_run, "lcls1": generator.generate_lcls1_run,
                "cxi": generator.generate_cxi_run}[args.layout]
        suffix = "cxi" if args.layout == "cxi" else "h5"
        path = out / args.experiment / f"{args.experiment}_Run{args.run:04d}.{suffix}"
        paths = [make(path, args.run, n_events=args.events, seed=args.seed)]
    for p in paths:
        print(p)
    return 0


def _client_options(args: argparse.Namespace) -> dict:
    return {"token": args.token, "tls_root_certs": args.tls_ca, "cert_chain": args.tls_cert,
            "private_key": args.tls_key}


def cmd_ls(args: argparse.Namespace) -> int:
    from clients import connect

    with connect(args.server, **_client_options(args)) as client:
        if args.experiment is None:
            for name in client.experiments():
                print(name)
        else:
            import polars as pl

            with pl.Config(tbl_rows=-1, tbl_hide_dataframe_shape=True):
                print(client.runs(args.experiment))
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from clients import connect
    from clients.export import write_stream

    columns = [c for c in args.columns.split(",") if c] if args.columns else None
    with connect(args.server, **_client_options(args)) as client:
        info = client.plan(args.experiment, args.run, columns, args.events)
        written = write_stream(client, info, Path(args.output), progress=not args.quiet)
    print(f"wrote {written} events to {args.output}")
    return 0


def cmd_sql(args: argparse.Namespace) -> int:
    import polars as pl

    from clients import connect, to_polars

    with connect(args.server, **_client_options(args)) as client:
        table = client.sql(args.query)
    if args.output:
        from clients.export import write_batches

        write_batches(table.schema, table.to_batches(), Path(args.output))
        print(f"wrote {table.num_rows} rows to {args.output}")
        return 0
    with pl.Config(tbl_rows=args.max_rows, tbl_hide_dataframe_shape=False, fmt_str_lengths=60):
        print(to_polars(table))
    return 0


def _progress_line(summary: dict) -> str:
    seconds = max(summary["seconds"], 1e-9)
    return (f"{summary['experiment']}/{summary['stream']}: {summary['events']} events sent, "
            f"{summary['rate']:.1f} events/s, {summary['bytes'] / seconds / 1e6:.1f} MB/s")


def cmd_produce(args: argparse.Namespace) -> int:
    import pyarrow.flight as flight

    from clients import connect
    from flight_server.simulator import produce

    def report(summary: dict) -> None:
        if not args.quiet:
            print(_progress_line(summary), flush=True)

    what = "forever (Ctrl-C stops)" if args.events is None else f"{args.events} events"
    print(f"producing simulated events to {args.experiment}/{args.stream} at {args.server}: "
          f"{args.rate:g} events/s, {what}", flush=True)
    with connect(args.server, **_client_options(args)) as client:
        try:
            summary = produce(client, args.experiment, args.stream, rate=args.rate,
                              events=args.events, batch_events=args.batch_events,
                              end_run=args.end_run, progress=report,
                              retention_bytes=args.retention_bytes, seed=args.seed)
        except flight.FlightUnauthorizedError as exc:
            print(f"error: not allowed to produce to {args.experiment}/{args.stream}: "
                  f"{_brief(exc)}. Producing needs the `write` grant on the experiment (on the "
                  f"server: `lclstream token create --sub NAME --write {args.experiment}`, then "
                  "--token or $LCLSTREAM_TOKEN)", file=sys.stderr)
            return 1
    print(f"sent {summary['events']} events in {summary['seconds']:.1f} s "
          f"({summary['rate']:.1f} events/s)"
          + (f"; stream ended as run {summary['run']} of {args.experiment}"
             if summary["run"] is not None else ""), flush=True)
    return 130 if summary["stopped"] and args.events is not None and \
        summary["events"] < args.events else 0


def streams_frame(rows: list[dict]):
    """The `streams` action's answer as a table: a row per stream, its groups' lag in text."""
    import polars as pl

    def groups(row: dict) -> str:
        return "; ".join(f"{g['group']}: lag {g['lag']} ({g['members']} member"
                         f"{'' if g['members'] == 1 else 's'})" for g in row.get("groups", []))

    schema = {"experiment": pl.String, "stream": pl.String, "live": pl.Boolean,
              "run": pl.Int64, "events": pl.Int64, "events/s": pl.Float64, "MB/s": pl.Float64,
              "bytes_on_disk": pl.Int64, "producers": pl.Int64, "consumers": pl.Int64,
              "groups": pl.String}
    return pl.DataFrame([{
        "experiment": r["experiment"], "stream": r["stream"], "live": r["live"],
        "run": r.get("run"), "events": r["events"], "events/s": r["events_per_s"],
        "MB/s": round(r["bytes_per_s"] / 1e6, 2), "bytes_on_disk": r["bytes_on_disk"],
        "producers": r["producers"], "consumers": r["consumers"], "groups": groups(r),
    } for r in rows], schema=schema).sort("experiment", "stream")


def cmd_streams(args: argparse.Namespace) -> int:
    import polars as pl

    from clients import connect

    with connect(args.server, **_client_options(args)) as client:
        rows = client.streams(args.experiment or "*")
    if not rows:
        print(f"no live streams{'' if args.experiment is None else ' in ' + args.experiment}")
        return 0
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True,
                   fmt_str_lengths=80, tbl_width_chars=200):
        print(streams_frame(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lclstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve every run under a data directory")
    s.add_argument("--data", type=Path, help="data root: DATA/<experiment>/**/<run file>")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8815; 0 picks a free one)")
    s.add_argument("--config", type=Path, help="TOML settings file")
    s.add_argument("--batch-bytes", type=_size, help="bytes per streamed batch (default 4MiB)")
    s.add_argument("--partition-bytes", type=_size,
                   help="bytes per endpoint of a large run (default 256MiB)")
    s.add_argument("--no-auth", action="store_true",
                   help="serve without authentication (loopback addresses only)")
    s.add_argument("--state-dir", type=Path,
                   help="server secrets and users file (default DATA/.lclstream)")
    s.add_argument("--tls-cert", type=Path, help="server certificate (PEM): serve grpc+tls")
    s.add_argument("--tls-key", type=Path, help="server certificate's private key (PEM)")
    s.add_argument("--tls-client-ca", type=Path,
                   help="require client certificates signed by this CA (mutual TLS)")
    s.add_argument("--audit-log", type=Path,
                   help="also write audit lines to this file (rotated like --log-file)")
    s.add_argument("--log-file", type=Path,
                   help="also write the server's log to this file, rotated by size "
                        "(log_max_bytes, default 64 MiB; log_backups files kept, default 5)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="generate demo data (once) and serve it")
    d.add_argument("--data", type=Path, help="where to write the demo data (default demo-data)")
    d.add_argument("--host")
    d.add_argument("--port", type=int)
    d.add_argument("--config", type=Path)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="write synthetic runs in the facility layouts")
    g.add_argument("--data", default="demo-data")
    g.add_argument("--layout", choices=["demo", "lcls2", "lcls1", "cxi", "bench"],
                   default="demo")
    g.add_argument("--experiment", default="tmox42619")
    g.add_argument("--run", type=int, default=1)
    g.add_argument("--events", type=int, default=240)
    g.add_argument("--size", default="1GiB", help="bench layout: file size")
    g.add_argument("--seed", type=int, default=42)
    g.set_defaults(func=cmd_generate)

    ls = sub.add_parser("ls", help="list experiments, or the runs of one")
    ls.add_argument("experiment", nargs="?")
    ls.add_argument("--server", default=DEFAULT_SERVER)
    _client_arguments(ls)
    ls.set_defaults(func=cmd_ls)

    get = sub.add_parser("get", help="download a run to Parquet or Arrow IPC")
    get.add_argument("experiment")
    get.add_argument("run", type=int)
    get.add_argument("-c", "--columns", help="comma-separated columns (default: all)")
    get.add_argument("-e", "--events", type=_events, help="START:STOP[:STEP]")
    get.add_argument("-o", "--output", required=True, help="FILE.parquet or FILE.arrow")
    get.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    get.add_argument("--server", default=DEFAULT_SERVER)
    _client_arguments(get)
    get.set_defaults(func=cmd_get)

    q = sub.add_parser("sql", help="run a SQL query (SELECT over <experiment>.events / .runs)")
    q.add_argument("query", help='e.g. \'SELECT run, avg("gmd/energy") FROM tmox42619.events '
                   'GROUP BY run\'')
    q.add_argument("--server", default=DEFAULT_SERVER)
    q.add_argument("-o", "--output", help="write the result to FILE.parquet or FILE.arrow")
    q.add_argument("--max-rows", type=int, default=40, help="rows to print (default 40)")
    _client_arguments(q)
    q.set_defaults(func=cmd_sql)

    pr = sub.add_parser("produce", help="send simulated demo events to a live stream "
                        "(needs the write grant)")
    pr.add_argument("experiment")
    pr.add_argument("stream", help="the live stream's name; created by its first batch")
    pr.add_argument("--rate", type=float, default=120.0, help="events per second (default 120)")
    pr.add_argument("--events", type=int, help="stop after N events (default: until Ctrl-C)")
    pr.add_argument("--batch-events", type=int, default=1,
                    help="events per batch sent (default 1)")
    pr.add_argument("--end-run", action="store_true",
                    help="at the end (or on Ctrl-C), end the stream: it becomes the "
                    "experiment's next run")
    pr.add_argument("--retention-bytes", type=_size, default=_size("1GiB"),
                    help="keep at most this much of the stream on disk (default 1GiB)")
    pr.add_argument("--seed", type=int, help="seed of the simulated values (default: random)")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    pr.add_argument("--server", default=DEFAULT_SERVER)
    _client_arguments(pr)
    pr.set_defaults(func=cmd_produce)

    st = sub.add_parser("streams", help="list live streams: rate, size, consumer groups' lag")
    st.add_argument("experiment", nargs="?", help="an experiment name or glob (default: all)")
    st.add_argument("--server", default=DEFAULT_SERVER)
    _client_arguments(st)
    st.set_defaults(func=cmd_streams)

    cli_security.register(sub)
    return p


def _client_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="bearer token (default: $LCLSTREAM_TOKEN, else the keyring "
                   "entry `lclstream login` stored)")
    cli_security.add_tls_client_options(p)


def main(argv: list[str] | None = None) -> int:
    import pyarrow as pa
    import pyarrow.flight as flight

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except flight.FlightUnavailableError as exc:
        server = getattr(args, "server", None) or getattr(args, "location", "?")
        print(f"error: cannot reach a server at {server}; is one running, and do its TLS "
              "settings match? (start one with `make demo` or `lclstream serve`, or pass "
              f"--server)\n  ({_brief(exc)})", file=sys.stderr)
        return 1
    except (OSError, ValueError, LookupError, pa.ArrowException) as exc:
        print(f"error: {_brief(exc)}", file=sys.stderr)
        return 1


def _brief(exc: BaseException) -> str:
    """The message without pyarrow's transport detail."""
    return str(exc).split(". Detail:", 1)[0].split(". gRPC client debug context", 1)[0]


if __name__ == "__main__":
    sys.exit(main())
