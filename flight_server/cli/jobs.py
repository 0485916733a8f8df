"""`lclstream submit | jobs | job | cancel`: data-request jobs from the command line."""

from __future__ import annotations

import argparse
import json

from flight_server.cli.common import DEFAULT_SERVER, event_slice


def register(sub: argparse._SubParsersAction, client_arguments) -> None:
    s = sub.add_parser("submit", help="submit a data request as a job that produces into a "
                       "live stream (and, at the end, a run)")
    s.add_argument("experiment")
    s.add_argument("runs", help="run numbers, comma-separated: 12,13,14")
    s.add_argument("--into", required=True, metavar="EXPERIMENT/STREAM",
                   help="the live stream the results go into")
    s.add_argument("-c", "--columns", help="comma-separated columns (default: all)")
    s.add_argument("-t", "--table", help="one of the runs' other tables (a European XFEL "
                   "detector source, an NXmx run's 'config')")
    s.add_argument("--source", choices=["xtc2"], help="the raw runs (xtc2, through psana) "
                   "where smalldata HDF5 files of the same numbers are the default")
    s.add_argument("-e", "--events", type=event_slice, help="START:STOP[:STEP]")
    s.add_argument("--filter", help="keep events where this holds: 'gmd/energy > 0.5'")
    s.add_argument("--processing", help="processing steps, a JSON list: "
                   '\'[{"step": "roi", "column": "pnccd/image", "y": [0, 64], "x": [0, 64]}]\'')
    s.add_argument("--no-end-run", action="store_true",
                   help="leave the stream live when the job completes (default: it becomes "
                   "the next run of EXPERIMENT)")
    s.add_argument("--key", help="idempotency key: submitting again with it returns the job")
    s.add_argument("--wait", action="store_true", help="wait, with a progress bar, until the "
                   "job has finished")
    _common(s, client_arguments, cmd_submit)

    m = sub.add_parser("mirror", help="copy runs, or follow a live stream, of another site's "
                       "server into this one (--server), as jobs that run here")
    m.add_argument("source", metavar="SOURCE_URL", help="the other site's server, e.g. "
                   "grpc+tls://flight.slac.stanford.edu:8815")
    m.add_argument("experiment", help="the experiment there")
    m.add_argument("what", metavar="RUNS|live/STREAM", help="run numbers, comma-separated "
                   "(12,13), or live/STREAM to follow a live stream until it ends")
    m.add_argument("--into", required=True, metavar="EXPERIMENT[/STREAM]",
                   help="the experiment here the runs become runs of (keeping their numbers "
                   "where free); for a live stream, the stream here (default: same name)")
    m.add_argument("--source-token", help="a token for SOURCE_URL (default: yours for it, "
                   "narrowed there to reading EXPERIMENT for --source-ttl)")
    m.add_argument("--source-tls-ca", help="PEM file of the CA that signed SOURCE_URL's "
                   "certificate (default: the system's)")
    m.add_argument("--source-ttl", type=int, default=24 * 3600, metavar="SECONDS",
                   help="lifetime of the narrowed token (default: a day)")
    m.add_argument("--no-end-run", action="store_true",
                   help="leave the copy a live stream here (default: it becomes a run)")
    m.add_argument("--key", help="idempotency key: mirroring again with it returns the jobs")
    m.add_argument("--wait", action="store_true", help="wait, with a progress bar, until the "
                   "jobs have finished")
    _common(m, client_arguments, cmd_mirror)

    ls = sub.add_parser("jobs", help="list your jobs, newest first")
    ls.add_argument("--state", choices=["queued", "running", "completed", "failed",
                                        "cancelled"])
    ls.add_argument("--limit", type=int, default=50)
    _common(ls, client_arguments, cmd_jobs)

    one = sub.add_parser("job", help="a job's status, progress and history")
    one.add_argument("id")
    one.add_argument("--json", action="store_true", help="print the status as JSON")
    _common(one, client_arguments, cmd_job)

    c = sub.add_parser("cancel", help="cancel a job (its stream keeps what was produced)")
    c.add_argument("id")
    _common(c, client_arguments, cmd_cancel)


def _common(p: argparse.ArgumentParser, client_arguments, func) -> None:
    p.add_argument("--server", default=DEFAULT_SERVER)
    client_arguments(p)
    p.set_defaults(func=func)


def _connect(args: argparse.Namespace):
    from clients import connect

    return connect(args.server, token=args.token, tls_root_certs=args.tls_ca,
                   cert_chain=args.tls_cert, private_key=args.tls_key)


def _runs(text: str) -> list[int]:
    try:
        return [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise ValueError(f"runs must be numbers separated by commas, e.g. 12,13; "
                         f"got {text!r}") from None


def cmd_submit(args: argparse.Namespace) -> int:
    experiment, sep, stream = args.into.partition("/")
    if not sep or not experiment or not stream:
        raise ValueError(f"--into is EXPERIMENT/STREAM, e.g. cxilu9218/hits; got {args.into!r}")
    try:
        processing = json.loads(args.processing) if args.processing else None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--processing is not JSON: {exc}") from None
    columns = [c for c in args.columns.split(",") if c] if args.columns else None
    with _connect(args) as client:
        job = client.submit(args.experiment, _runs(args.runs), columns, args.events,
                            filter=args.filter, processing=processing,
                            into=(experiment, stream), end_run=not args.no_end_run,
                            key=args.key, table=args.table, source=args.source)
        print(f"job {job.id} {job.last['state']}: results into {experiment}/{stream}",
              flush=True)
        if args.wait:
            status = job.wait()
            print(_outcome(status))
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    from clients.jobs import JobFailed

    kind, _, stream = args.what.partition("/")
    if kind == "live":
        if not stream:
            raise ValueError("a live stream is live/STREAM, e.g. live/daq")
        runs, what = None, f"live stream {stream}"
    else:
        try:
            runs, what = _runs(args.what), f"runs {args.what}"
        except ValueError:
            raise ValueError(f"give run numbers separated by commas (12,13), or live/STREAM "
                             f"to follow a live stream; got {args.what!r}") from None
    with _connect(args) as client:
        mirrors = client.mirror(args.source, args.experiment, runs, stream=stream or None,
                                into=args.into, source_token=args.source_token,
                                source_tls_root_certs=args.source_tls_ca,
                                source_ttl=args.source_ttl, end_run=not args.no_end_run,
                                key=args.key)
        print(f"mirroring {what} of {args.experiment} from {args.source}:", flush=True)
        for job in mirrors:
            print(f"job {job.id} {job.last['state']}: into {job.into[0]}/{job.into[1]}",
                  flush=True)
        failed = 0
        if args.wait:
            for job in mirrors:
                try:
                    print(_outcome(job.wait()))
                except JobFailed as exc:
                    print(exc)
                    failed += 1
    return 1 if failed else 0


def _outcome(status: dict) -> str:
    run = f"; run {status['run']}" if status["run"] is not None else ""
    p = status["progress"]
    return f"job {status['job']} {status['state']}: {p['events']} events{run}"


def _frame(rows: list[dict]):
    import polars as pl

    schema = {"job": pl.String, "state": pl.String, "owner": pl.String, "into": pl.String,
              "events": pl.Int64, "of": pl.Int64, "run": pl.Int64, "created": pl.String,
              "error": pl.String}
    return pl.DataFrame([{
        "job": r["job"], "state": r["state"], "owner": r["owner"],
        "into": f"{r['into']['experiment']}/{r['into']['stream']}",
        "events": r["progress"]["events"], "of": r["progress"]["events_total"],
        "run": r["run"], "created": r["created"], "error": r["error"],
    } for r in rows], schema=schema)


def cmd_jobs(args: argparse.Namespace) -> int:
    import polars as pl

    with _connect(args) as client:
        rows = client.jobs(args.state, args.limit)
    if not rows:
        print("no jobs")
        return 0
    with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_hide_dataframe_shape=True,
                   fmt_str_lengths=80, tbl_width_chars=200):
        print(_frame(rows))
    return 0


def _describe(status: dict) -> str:
    p = status["progress"]
    lines = [f"job {status['job']} ({status['owner']}): {status['state']}",
             f"  into {status['into']['experiment']}/{status['into']['stream']}"
             + (f", run {status['run']}" if status["run"] is not None else ""),
             f"  progress: {p['events']} of {p['events_total']} source events, "
             f"{p['bytes']} bytes produced"]
    if status.get("waiting"):
        lines.append(f"  waiting: {status['waiting']}")
    if status["error"]:
        lines.append(f"  error: {status['error']}")
    lines += [f"  {t['at']}  {t['state']:<9}  {t['reason']}" for t in status["transitions"]]
    return "\n".join(lines)


def cmd_job(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        status = client.job(args.id).last
    print(json.dumps(status, indent=1) if args.json else _describe(status))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _connect(args) as client:
        status = client.job(args.id).cancel()
    print(_describe(status))
    return 0
