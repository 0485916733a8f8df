"""`lclstream serve | demo | generate | ls | get | sql | produce | bridge | streams | submit |
jobs | job | cancel | user | token | login | logout | certs`: the parser and the entry point; the
commands live beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flight_server.cli import bridge as cli_bridge
from flight_server.cli import jobs as cli_jobs
from flight_server.cli import security as cli_security
from flight_server.cli.common import DEFAULT_SERVER, brief, event_slice
from flight_server.cli.data import cmd_get, cmd_ls, cmd_produce, cmd_sql, cmd_streams
from flight_server.cli.serve import DemoAcquisition, cmd_demo, cmd_generate, cmd_serve
from flight_server.config import parse_size

__all__ = ["DemoAcquisition", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lclstream", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="serve every run under a data directory")
    s.add_argument("--data", type=Path, help="data root: DATA/<experiment>/**/<run file>")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (default 8815; 0 picks a free one)")
    s.add_argument("--config", type=Path, help="TOML settings file")
    s.add_argument("--batch-bytes", type=parse_size, help="bytes per streamed batch (default 4MiB)")
    s.add_argument("--compression", metavar="auto|none|zstd|lz4[:LEVEL]",
                   help="compression on the wire when a request does not choose (default "
                   "auto: off for loopback clients, zstd for others)")
    s.add_argument("--partition-bytes", type=parse_size,
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
    s.add_argument("--job-workers", type=int,
                   help="worker processes of the embedded Dask cluster jobs run on (default 2)")
    s.add_argument("--dask-scheduler", metavar="ADDRESS",
                   help="run jobs on this Dask scheduler (tcp://host:8786) instead of an "
                   "embedded cluster")
    s.add_argument("--metrics-port", type=int, metavar="PORT",
                   help="serve Prometheus /metrics and /healthz over HTTP on this port of "
                        "--host (0 picks a free one; default: off)")
    s.add_argument("--cluster", action="store_true",
                   help="one of several nodes over the same data root and keys, sharing the "
                        "state at --state-url (README: Running a cluster)")
    s.add_argument("--state-url", metavar="URL",
                   help="the cluster's shared state: postgresql://user@host:5432/db")
    s.add_argument("--advertise", metavar="LOCATION",
                   help="this node's location as clients reach it (grpc+tls://HOST:PORT; "
                        "default: where it listens)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="generate demo data (once) and serve it")
    d.add_argument("--data", type=Path, help="where to write the demo data (default demo-data)")
    d.add_argument("--host")
    d.add_argument("--port", type=int)
    d.add_argument("--config", type=Path)
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate", help="write synthetic runs in the facility layouts")
    g.add_argument("--data", default="demo-data")
    g.add_argument("--layout", choices=["demo", "lcls2", "lcls1", "cxi", "nxmx", "xtc2",
                                        "bench"],
                   default="demo", help="nxmx: a DECTRIS Eiger series, --events frames; xtc2: "
                   "a raw LCLS-II run (needs psana)")
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
    get.add_argument("-e", "--events", type=event_slice, help="START:STOP[:STEP]")
    get.add_argument("-t", "--table", help="one of the run's other tables (a European XFEL "
                     "detector source, an NXmx run's 'config')")
    get.add_argument("--source", choices=["xtc2"], help="the raw run (xtc2, through psana) "
                     "where a smalldata HDF5 file of the same number is the default")
    get.add_argument("--compression", metavar="CODEC[:LEVEL]",
                     help="on the wire: zstd, lz4 or none (default: the server's: off on "
                     "loopback, zstd elsewhere)")
    get.add_argument("-o", "--output", required=True, help="FILE.parquet or FILE.arrow")
    get.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    get.add_argument("--resume", action="store_true", help="continue a download that was cut "
                     "short (what it received is kept in .OUTPUT.partial/ beside the output)")
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
    pr.add_argument("--retention-bytes", type=parse_size, default=parse_size("1GiB"),
                    help="keep at most this much of the stream on disk (default 1GiB)")
    pr.add_argument("--seed", type=int, help="seed of the simulated values (default: random)")
    pr.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    pr.add_argument("--server", default=DEFAULT_SERVER)
    _client_arguments(pr)
    pr.set_defaults(func=cmd_produce)

    cli_bridge.register(sub, _client_arguments)

    st = sub.add_parser("streams", help="list live streams: rate, size, consumer groups' lag")
    st.add_argument("experiment", nargs="?", help="an experiment name or glob (default: all)")
    st.add_argument("--server", default=DEFAULT_SERVER)
    _client_arguments(st)
    st.set_defaults(func=cmd_streams)

    cli_jobs.register(sub, _client_arguments)
    cli_security.register(sub, _client_arguments)
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
              f"--server)\n  ({brief(exc)})", file=sys.stderr)
        return 1
    except (OSError, ValueError, LookupError, pa.ArrowException) as exc:
        print(f"error: {brief(exc)}", file=sys.stderr)
        return 1

