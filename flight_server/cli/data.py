"""`lclstream ls | get | sql | produce | streams`: the client commands, through `clients`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flight_server.cli.common import brief


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
    from clients.export import PartialMismatch, download

    columns = [c for c in args.columns.split(",") if c] if args.columns else None
    shape = {"table": args.table, "source": args.source, "compression": args.compression}
    with connect(args.server, **_client_options(args)) as client:
        request = client.request(args.experiment, args.run, columns, args.events, **shape)
        info = client.plan(args.experiment, args.run, columns, args.events, **shape)
        try:
            written = download(client, info, request.encode(), Path(args.output),
                               resume=args.resume, progress=not args.quiet)
        except PartialMismatch as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted: the same command with --resume continues the download",
                  file=sys.stderr)
            return 130
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
    from flight_server.generator.simulator import produce

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
                  f"{brief(exc)}. Producing needs the `write` grant on the experiment (on the "
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
              "dropped": pl.Int64, "groups": pl.String}
    return pl.DataFrame([{
        "experiment": r["experiment"], "stream": r["stream"], "live": r["live"],
        "run": r.get("run"), "events": r["events"], "events/s": r["events_per_s"],
        "MB/s": round(r["bytes_per_s"] / 1e6, 2), "bytes_on_disk": r["bytes_on_disk"],
        "producers": r["producers"], "consumers": r["consumers"],
        "dropped": r.get("dropped_upstream", 0), "groups": groups(r),
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
