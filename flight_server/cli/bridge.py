"""`lclstream bridge FORMAT`: a facility's ZMQ stream into one of our live streams."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable

from flight_server.cli.common import DEFAULT_SERVER, brief
from flight_server.config import parse_size

PROGRESS_EVERY_S = 10.0


def register(sub: argparse._SubParsersAction,
             client_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    from flight_server.live.bridges.bridge import FORMATS, SOCKET_TYPES

    b = sub.add_parser("bridge", help="turn a facility ZMQ stream (lclstreamer, DECTRIS, "
                       "karabo-bridge) into a live stream (needs the write grant)")
    b.add_argument("format", choices=sorted(FORMATS))
    where = b.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", metavar="ENDPOINT",
                       help="connect to the sender, e.g. tcp://daq-host:9999")
    where.add_argument("--bind", metavar="ENDPOINT",
                       help="let senders connect here, e.g. tcp://*:9999")
    b.add_argument("--into", required=True, metavar="EXPERIMENT/STREAM")
    b.add_argument("--socket", type=str.upper, choices=SOCKET_TYPES,
                   help="ZMQ socket type (default: the format's: PULL; REQ for karabo-bridge)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--batch-events", type=int, help="send every N events")
    size.add_argument("--batch-bytes", type=parse_size, default=parse_size("4MiB"),
                      help="send every B bytes (default 4MiB); whatever arrived is sent after "
                      "--linger seconds without a message")
    b.add_argument("--linger", type=float, default=0.2,
                   help="seconds without a message after which what arrived is sent")
    b.add_argument("--queue-messages", type=int, default=1000,
                   help="messages held while the server is slower than the sender; more are "
                   "dropped and counted (default 1000)")
    b.add_argument("--queue-bytes", type=parse_size, default=parse_size("512MiB"),
                   help="bytes held likewise (default 512MiB)")
    b.add_argument("--producer-id", help="stable producer id: a restarted bridge's resends "
                   "are recognised (default: a new one)")
    b.add_argument("--messages", type=int, help="stop after N messages (default: until Ctrl-C)")
    b.add_argument("--server", default=DEFAULT_SERVER)
    client_arguments(b)
    b.set_defaults(func=cmd_bridge)


def cmd_bridge(args: argparse.Namespace) -> int:
    import pyarrow.flight as flight

    from clients import connect
    from flight_server.cli.data import _client_options
    from flight_server.live.bridges.bridge import Bridge, Queue, make_format

    experiment, _, stream = args.into.partition("/")
    if not experiment or not stream:
        print(f"error: --into is EXPERIMENT/STREAM, e.g. mfx101/eiger; got {args.into!r}",
              file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    fmt = make_format(args.format)
    endpoint, bind = (args.bind, True) if args.bind else (args.connect, False)
    with connect(args.server, **_client_options(args)) as client:
        producer = client.producer(experiment, stream, producer_id=args.producer_id)
        bridge = Bridge(fmt, producer, endpoint, bind=bind, socket_type=args.socket,
                        batch_events=args.batch_events,
                        batch_bytes=args.batch_bytes if args.batch_events is None else 1 << 62,
                        linger=args.linger,
                        queue=Queue(max_messages=args.queue_messages, max_bytes=args.queue_bytes))
        signal.signal(signal.SIGTERM, lambda *_: bridge.stop())
        progress = threading.Thread(target=_report, args=(bridge,), daemon=True)
        print(f"bridging {args.format} from {endpoint} ({'bound' if bind else 'connected'}, "
              f"{bridge.socket_type}) into {experiment}/{stream} at {args.server}; Ctrl-C stops",
              flush=True)
        started = time.monotonic()
        progress.start()
        try:
            stats = bridge.run(max_messages=args.messages)
            producer.close()
        except KeyboardInterrupt:
            bridge.stop()
            stats = bridge.stats
            producer.close()
        except flight.FlightUnauthorizedError as exc:
            print(f"error: not allowed to write {experiment}/{stream}: {brief(exc)}",
                  file=sys.stderr)
            return 1
    seconds = time.monotonic() - started
    print(f"bridge stopped after {seconds:.1f} s: {stats.summary(args.format)}", flush=True)
    for reason, count in stats.bad_reasons.items():
        print(f"  {count} x not {args.format}: {reason}", flush=True)
    if stats.last_error:
        print(f"  the stream refused events: {stats.last_error}", flush=True)
    return 0 if not stats.refused else 1


def _report(bridge) -> None:
    while not bridge._stop.wait(PROGRESS_EVERY_S):
        s = bridge.stats
        print(f"  {s.received} messages, {s.events} events sent, {s.dropped} dropped, "
              f"{s.bad} bad, queue {len(bridge.queue)}", flush=True)
