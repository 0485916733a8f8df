"""Raw LCLS-II runs (xtc2 files) served through psana's own detector interfaces.

Columns are what a psana user calls: `run.Detector("pnccd").raw.calib(evt)` is the column
`pnccd/raw/calib`, its values exactly what that call returns (an interface may slice or
compute), typed as psana hands them over (uint16 stays uint16). The interfaces and their
methods are the ones psana lists in `run.detinfo`; `config` and calibration constants are not
per-event data and are left out. EPICS PVs are `epics/<name>`: at each event, the value of the
latest SlowUpdate at or before it, as in psana's event loop. An event a detector missed is null.

psana's DataSource reads a run sequentially; to serve any event range in parallel, the run is
indexed once from its datagram headers (`xtc2_index`), and each event is put together from its
datagrams with psana's own `Dgram` and `Event`, then handed to the detector interfaces. psana
is an optional dependency (`[psana]` extra): without it, xtc2 runs answer UNIMPLEMENTED.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.errors import RunUnreadable, Unsupported
from flight_server.sources import xtc2_index as xi
from flight_server.sources.columns import TIME_TYPE, Column, Kind, arrow_value_type, run_column
from flight_server.sources.hdf5_reader import pread_exactly, with_nulls, wrap_fixed
from flight_server.sources.layouts import LCLS2_EPOCH, Layout, raw_time_to_ns
from flight_server.sources.run import Reader, Run
from schemas import metadata as md

log = logging.getLogger(__name__)

XTC2 = Layout(name="lcls2-xtc2", event_count_path="", time_path="timestamp",
              time_epoch_unix=LCLS2_EPOCH)
TIMESTAMP = "timestamp"
PSANA_CALL = b"psana.call"  # field metadata: the psana call a column's values come from
NOT_PER_EVENT = {"config"}  # interface methods that take an event but return the configuration
NOT_DATA = {"runinfo", "smdinfo", "chunkinfo", "epicsinfo", "pvdetinfo"}  # detectors of psana's
PROBE_EVENTS = 256  # events read at most to see what each interface method returns
SMALL_CONFIG = 64  # configuration arrays up to this many values go into the schema as values
# xtcdata's Name::DataType, in order (CHARSTR = 10)
XTC_TYPES = [np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16, np.int32, np.int64,
             np.float32, np.float64]
XTC_CHARSTR = 10

_psana_lock = threading.Lock()


def psana() -> SimpleNamespace:
    """psana's modules the source uses, imported once; Unsupported when psana is absent."""
    with _psana_lock:
        if not hasattr(psana, "modules"):
            # psana picks MPI unless told otherwise; a server process is not an MPI job
            os.environ.setdefault("PS_PARALLEL", "none")
            try:
                from psana import dgram
                from psana.dgrammanager import DgramManager
                from psana.event import Event
                from psana.psexp.envstore_manager import EnvStoreManager
                from psana.psexp.run import _enumerate_attrs  # what builds `run.detinfo`
                from psana.psexp.run_ctx import RunCtx
            except ImportError as exc:
                psana.modules = exc
            else:
                psana.modules = SimpleNamespace(
                    Dgram=dgram.Dgram, DgramManager=DgramManager, Event=Event,
                    EnvStoreManager=EnvStoreManager, detinfo=_enumerate_attrs, RunCtx=RunCtx)
        if isinstance(psana.modules, ImportError):
            raise Unsupported(
                "psana is not installed on this server, so raw xtc2 runs cannot be read "
                f"({psana.modules}); install it with `pip install 'lclstream-flight[psana]'` "
                "(see README, 'Raw runs (xtc2)')")
        return psana.modules


def preload() -> None:
    """Import psana now (half a second), so the first xtc2 request does not wait for it; a
    server calls this on a thread of its own at start. Without psana, nothing happens."""
    try:
        psana()
    except Unsupported:
        pass


@dataclass(frozen=True)
class Interface:
    """A detector interface (`run.Detector(det).<name>`) and the streams its datagrams are in."""

    detector: str
    name: str
    impl: Any
    streams: tuple[int, ...]


@dataclass(frozen=True)
class Method:
    """What a column is read from: an interface method, or an EPICS PV's time line."""

    interface: Interface | None = None
    attr: tuple[str, ...] = ()  # the method's attribute chain on the interface
    pv: str | None = None  # EPICS: the variable's name


@dataclass
class Xtc2Run(Run):
    streams: list[xi.StreamIndex] = field(default_factory=list)
    events: xi.EventIndex | None = None
    methods: dict[str, Method] = field(default_factory=dict)
    configs: list[Any] = field(default_factory=list)  # each stream's Configure datagram
    names: list[xi.Names] = field(default_factory=list)  # what each stream's Configure declares
    epics: dict[str, tuple[np.ndarray, list]] = field(default_factory=dict)  # pv -> times, values
    ctx: Any = None  # psana's RunCtx, which events carry
    _fds: list[list[int]] = field(default_factory=list)  # per stream, per chunk
    _users: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reader(self) -> Xtc2Reader:
        return Xtc2Reader(self)

    def acquire(self) -> None:
        """Open the run's files if needed and count one more stream using them."""
        with self._lock:
            if not self._fds:
                try:
                    self._fds = [[os.open(p, os.O_RDONLY) for p in s.files.chunks]
                                 for s in self.streams]
                except OSError as exc:
                    self._close()
                    raise RunUnreadable(f"{self.describe()} cannot be opened: {exc}") from None
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._retired and self._users == 0:
                self._close()

    def retire(self) -> None:
        """The catalog no longer serves this description: close once no stream uses it."""
        with self._lock:
            self._retired = True
            if self._users == 0:
                self._close()

    def _close(self) -> None:
        for fds in self._fds:
            for fd in fds:
                os.close(fd)
        self._fds = []  # a retired run's later stream opens them again, and closes them

    def dgram(self, stream: int, position: int, scratch: bool = False) -> Any:
        """The datagram at `position` of a stream's index, parsed by psana. Read here, not by
        psana: a pread that releases the GIL (pool threads read in parallel), and a framing
        check first, since psana abort()s the process on a corrupt Xtc. `scratch`: read into
        this thread's buffer for the stream, reused by its next datagram (no fresh pages to
        fault in per event), so what psana returns from it is valid only until then."""
        s = self.streams[stream]
        chunk = int(s.chunk[position])
        size = int(s.size[position])
        buf = _scratch(stream, size) if scratch else np.empty(size, dtype=np.uint8)
        try:
            pread_exactly(self._fds[stream][chunk], buf, int(s.offset[position]))
        except OSError as exc:
            raise RunUnreadable(f"{s.files.chunks[chunk].name}: {exc}") from None
        xi.check_datagram(memoryview(buf), self.names[stream],
                          f"{s.files.chunks[chunk].name} at byte {int(s.offset[position])}")
        return psana().Dgram(view=buf, config=self.configs[stream], offset=0)

    def event(self, i: int, streams: set[int], scratch: bool = False) -> Any:
        """psana's Event of event i with the datagrams of `streams` (None where a stream missed
        it, or was not asked for), or None if none of them has it. `scratch` as for `dgram`."""
        slots = self.events.slots[:, i]
        dgrams = [self.dgram(s, int(slots[s]), scratch) if s in streams and slots[s] >= 0
                  else None for s in range(len(self.streams))]
        if all(d is None for d in dgrams):
            return None
        return psana().Event(dgrams=dgrams, run=self.ctx)


_scratches = threading.local()


def _scratch(stream: int, size: int) -> np.ndarray:
    """This thread's reusable datagram buffer for a stream, at least `size` bytes."""
    buffers = _scratches.__dict__.setdefault("by_stream", {})
    buf = buffers.get(stream)
    if buf is None or len(buf) < size:
        buf = buffers[stream] = np.empty(max(size, 2 * len(buf) if buf is not None else 0),
                                         dtype=np.uint8)
    return buf[:size]


def describe(path: Path, experiment: str, number: int, within: Path,
             calibration: bool = False) -> Xtc2Run:
    """Describe the run whose stream files lie beside `path`. `calibration`: fetch calibration
    constants from the LCLS calibration database (psana's default); off, every detector gets
    none, as psana's `skip_calib_load="all"` does where the database cannot be reached."""
    ps = psana()
    streams = [xi.scan_stream(s) for s in xi.run_streams(path)]
    events = xi.build_events(streams)
    names = [_configure_names(s) for s in streams]  # before psana parses them: see dgram()
    first_chunks = [str(s.files.chunks[0]) for s in streams]
    params = SimpleNamespace()
    try:
        manager = ps.DgramManager(first_chunks, config_consumers=[params])
    except Exception as exc:  # psana raises whatever its parser meets
        raise RunUnreadable(f"run {number} of experiment '{experiment}': psana cannot read its "
                            f"Configure transitions ({type(exc).__name__}: {exc})") from None
    configs = list(manager.configs)
    manager.close()
    begin = [int(s.time[k]) for s in streams
             for k in np.flatnonzero(s.transition == xi.BEGIN_RUN)[:1]]
    run = Xtc2Run(experiment=experiment, number=number, path=path, layout=XTC2,
                  num_events=len(events), columns={}, aliases={}, config={},
                  start_ns=None, end_ns=None, streams=streams, events=events, configs=configs,
                  names=names, ctx=ps.RunCtx(experiment, number, begin[0] if begin else 0))
    run.acquire()
    try:
        _describe_columns(run, params, calibration)
    finally:
        run.release()
    if len(events):
        first, last = raw_time_to_ns(events.time[[0, -1]], LCLS2_EPOCH)
        run.start_ns, run.end_ns = int(first), int(last)
    return run


def _configure_names(stream: xi.StreamIndex) -> xi.Names:
    """The Names a stream's Configure declares, its framing and data checked as events' are."""
    path = stream.files.chunks[0]
    buf = np.empty(int(stream.size[0]), dtype=np.uint8)
    with open(path, "rb") as fh:
        pread_exactly(fh.fileno(), buf, 0)
    where = f"{path.name} (Configure)"
    names = xi.names_of(memoryview(buf))
    xi.check_datagram(memoryview(buf), names, where)
    return names


def _describe_columns(run: Xtc2Run, params: SimpleNamespace, calibration: bool) -> None:
    ps = psana()
    interfaces = []
    for (det, name), cls in params.det_classes["normal"].items():
        if det in NOT_DATA:
            continue
        info = params.configinfo_dict[det]
        constants = _calibration(det, info, run) if calibration else {}
        # A new instance, not the one `run.Detector` returns: psana keeps one instance per
        # detector name for the whole process, which two runs read at once would share.
        impl = object.__new__(cls)
        impl.__init__(det, name, info, constants, None, None)
        streams = tuple(k for k, cfg in enumerate(run.configs) if hasattr(cfg.software, det))
        interfaces.append(Interface(det, name, impl, streams))

    methods: dict[str, Method] = {}
    for iface in interfaces:
        for listed in ps.detinfo(iface.impl):
            attr = tuple(listed.split("."))
            if attr[-1] in NOT_PER_EVENT or not _takes_event(iface.impl, attr):
                continue
            methods["/".join((iface.detector, iface.name, *attr))] = Method(iface, attr)

    samples = _probe(run, methods)
    columns = [run_column(), _timestamp_column(), _time_column()]
    for name, method in methods.items():
        col = _method_column(name, method, samples.get(name), run.configs)
        if col is None:
            log.info("%s: %s is not served (no event had a value psana can type)",
                     run.describe(), name)
            continue
        columns.append(col)
    epics = _epics(run, params)
    for pv, (dtype, pv_name) in sorted(epics.items()):
        name = f"epics/{pv}"
        methods[name] = Method(pv=pv)
        columns.append(_epics_column(name, pv, pv_name, dtype))
    run.methods = methods
    run.columns = {c.name: c for c in columns}
    run.config = _run_config(run, params, interfaces, epics)


def _takes_event(impl: Any, attr: tuple[str, ...]) -> bool:
    target = impl
    for part in attr:
        target = getattr(target, part, None)
    if not callable(target):
        return False
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0].name == "evt"


def call(method: Method, event: Any) -> Any:
    """The value of a method for one psana Event (None: the detector missed the event)."""
    iface = method.interface
    if iface.impl._segments(event) is None:
        return None  # psana's test interfaces index the missing segments instead of saying so
    target = iface.impl
    for part in method.attr:
        target = getattr(target, part)
    return target(event)


def _probe(run: Xtc2Run, methods: dict[str, Method]) -> dict[str, list]:
    """Values of each method on the first events that have them (up to PROBE_EVENTS events),
    enough to type the columns; a method that raises is left out."""
    samples: dict[str, list] = {name: [] for name in methods}
    broken: set[str] = set()
    streams = set(range(len(run.streams)))
    for i in range(min(len(run.events), PROBE_EVENTS)):
        if all(len(v) >= 2 or k in broken for k, v in samples.items()):
            break
        event = run.event(i, streams)
        if event is None:
            continue
        for name, method in methods.items():
            if name in broken or len(samples[name]) >= 2:
                continue
            try:
                value = call(method, event)
            except Exception as exc:  # an interface psana cannot serve without what it lacks
                log.info("%s: %s raised %s: %s; not served", run.describe(), name,
                         type(exc).__name__, exc)
                broken.add(name)
                continue
            if value is not None:
                samples[name].append(value)
    return {k: v for k, v in samples.items() if k not in broken}


def _declared(configs: list[Any], method: Method) -> tuple[int, int] | None:
    """The xtc type and rank psana's configuration declares for a field of the same name."""
    iface = method.interface
    for cfg in configs:
        segments = getattr(getattr(cfg, "software", None), iface.detector, None)
        if not segments:
            continue
        names = getattr(next(iter(segments.values())), iface.name, None)
        declared = getattr(names, method.attr[-1], None)
        if declared is not None and hasattr(declared, "_type"):
            return int(declared._type), int(declared._rank)
    return None


def _dtype_of(value: Any, declared: tuple[int, int] | None) -> np.dtype | None:
    if isinstance(value, str):
        return np.dtype(object)
    if isinstance(value, np.ndarray | np.generic):
        return value.dtype.newbyteorder("=") if value.dtype.kind in "biuf" else None
    if isinstance(value, bool):
        return np.dtype(bool)
    if isinstance(value, int | float):
        # psana hands stored scalars over as Python numbers; the stored type is the column's
        if declared is not None and declared[1] == 0 and declared[0] < len(XTC_TYPES):
            return np.dtype(XTC_TYPES[declared[0]])
        return np.dtype(np.int64 if isinstance(value, int) else np.float64)
    return None


def _method_column(name: str, method: Method, samples: list | None,
                   configs: list[Any]) -> Column | None:
    if not samples:
        return None
    dtype = _dtype_of(samples[0], _declared(configs, method))
    if dtype is None:
        return None
    shape = tuple(np.shape(samples[0]))
    if any(np.shape(v) != shape for v in samples[1:]):
        return None  # not one shape per event: no fixed Arrow type fits
    iface = method.interface
    call_text = f"run.Detector({iface.detector!r}).{iface.name}.{'.'.join(method.attr)}(evt)"
    meta = {PSANA_CALL: call_text.encode(), md.DETECTOR: iface.detector.encode()}
    return _column(name, dtype, shape, meta)


def _column(name: str, dtype: np.dtype, shape: tuple[int, ...],
            meta: dict[bytes, bytes]) -> Column:
    if dtype.kind == "O":
        arrow, kind, nbytes = pa.string(), Kind.SCALAR, 32.0
    else:
        value = arrow_value_type(dtype)
        if not shape:
            arrow, kind = value, Kind.SCALAR
        elif len(shape) == 1:
            arrow, kind = pa.list_(value, shape[0]), Kind.LIST
        else:
            arrow, kind = pa.fixed_shape_tensor(value, list(shape)), Kind.TENSOR
        nbytes = dtype.itemsize * float(np.prod(shape, dtype=np.int64)) + 0.125
    return Column(name, kind, pa.field(name, arrow, metadata=meta), path=name, dtype=dtype,
                  shape=shape, event_bytes=nbytes)


def _timestamp_column() -> Column:
    meta = {md.DERIVED: b"the event's raw LCLS-II time stamp: (seconds since 1990) << 32 | ns"}
    return Column(TIMESTAMP, Kind.SCALAR, pa.field(TIMESTAMP, pa.uint64(), metadata=meta),
                  path=TIMESTAMP, dtype=np.dtype(np.uint64), event_bytes=8.0)


def _time_column() -> Column:
    meta = {md.DERIVED: b"timestamp as UTC: seconds since 1990-01-01 << 32 | nanoseconds"}
    return Column(md.TIME_COLUMN, Kind.TIME, pa.field(md.TIME_COLUMN, TIME_TYPE, metadata=meta),
                  path=TIMESTAMP, event_bytes=8.0)


def _epics_column(name: str, pv: str, pv_name: str | None, dtype: np.dtype) -> Column:
    meta = {PSANA_CALL: f"run.Detector({pv!r})(evt)".encode(), md.DETECTOR: b"epics",
            md.DERIVED: b"the latest SlowUpdate at or before the event (null before the first)"}
    if pv_name:
        meta[b"epics.pv"] = pv_name.encode()
    return _column(name, dtype, (), meta)


def _epics(run: Xtc2Run, params: SimpleNamespace) -> dict[str, tuple[np.dtype, str | None]]:
    """Every EPICS variable: its type, and PV name; fills `run.epics` with its time line."""
    ps = psana()
    store = ps.EnvStoreManager(run.configs).stores["epics"]
    found: dict[str, tuple[np.dtype, str | None]] = {}
    for var, alg in store.env_info:
        declared = None
        for cfg in run.configs:
            segments = getattr(cfg.software, "epics", None) or {}
            for seg in segments.values():
                v = getattr(getattr(seg, alg, None), var, None)
                if v is not None and hasattr(v, "_type"):
                    declared = (int(v._type), int(v._rank))
        if declared is None or declared[1] != 0:
            continue  # array PVs: not served yet
        dtype = np.dtype(object) if declared[0] == XTC_CHARSTR \
            else np.dtype(XTC_TYPES[declared[0]]) if declared[0] < len(XTC_TYPES) else None
        if dtype is None:
            continue
        found[var] = (dtype, store.epics_mapper.get(var) or None)
        run.epics[var] = (np.zeros(0, np.uint64), [])
    if not found:
        return found
    times: dict[str, list[int]] = {v: [] for v in found}
    values: dict[str, list] = {v: [] for v in found}
    for k, stream in enumerate(run.streams):
        if not hasattr(run.configs[k].software, "epics"):
            continue
        for p in np.flatnonzero(stream.transition == xi.SLOW_UPDATE):
            d = run.dgram(k, int(p))
            for seg in (getattr(d, "epics", None) or {}).values():
                for alg in vars(seg):
                    for var, value in vars(getattr(seg, alg)).items():
                        if var in found:
                            times[var].append(int(stream.time[p]))
                            values[var].append(value)
    for var in found:
        order = np.argsort(np.array(times[var], np.uint64), kind="stable")
        run.epics[var] = (np.array(times[var], np.uint64)[order],
                          [values[var][j] for j in order])
    return found


def _calibration(det: str, info: Any, run: Xtc2Run) -> dict:
    """The detector's calibration constants from the LCLS calibration database, {} (with a
    warning) where it cannot be reached."""
    try:
        from psana.pscalib.calib.MDBWebUtils import calib_constants_all_types

        return calib_constants_all_types(info.uniqueid, exp=run.experiment,
                                         run=run.number) or {}
    except Exception as exc:
        log.warning("%s: no calibration constants for %s (%s: %s)", run.describe(), det,
                    type(exc).__name__, exc)
        return {}


def _run_config(run: Xtc2Run, params: SimpleNamespace, interfaces: list[Interface],
                epics: dict[str, tuple[np.dtype, str | None]]) -> dict[str, Any]:
    detectors: dict[str, Any] = {}
    for iface in interfaces:
        entry = detectors.setdefault(iface.detector, {
            "dettype": params.configinfo_dict[iface.detector].dettype,
            "uniqueid": params.configinfo_dict[iface.detector].uniqueid,
            "streams": list(iface.streams),
            "interfaces": {},
        })
        entry["interfaces"][iface.name] = _jsonable(_configuration(run.configs, iface))
    return {
        "runinfo": {"expt": run.experiment, "runnum": run.number},
        "streams": [[p.name for p in s.files.chunks] for s in run.streams],
        "xtcinfo": [list(x) for x in params.xtc_info],
        "detectors": detectors,
        "epics": {var: pv for var, (_, pv) in epics.items()},
    }


def _configuration(configs: list[Any], iface: Interface) -> dict[str, Any]:
    """The detector's Configure values of this interface, per segment."""
    out: dict[str, Any] = {}
    for cfg in configs:
        for seg, container in (getattr(cfg, iface.detector, None) or {}).items():
            values = getattr(container, iface.name, None)
            if values is not None:
                out[str(seg)] = {k: v for k, v in vars(values).items() if not k.startswith("_")}
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        if value.size <= SMALL_CONFIG and value.dtype.kind in "biuf":
            return value.tolist()
        return {"dtype": str(value.dtype), "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if hasattr(value, "__dict__"):
        return _jsonable({k: v for k, v in vars(value).items() if not k.startswith("_")})
    return str(value)


class Xtc2Reader(Reader):
    """One stream's reads: each event put together from the datagrams of the streams the
    asked-for columns need (a request for `gmd/raw/energy` never reads a pnccd frame)."""

    def __init__(self, run: Xtc2Run) -> None:
        self.run = run
        run.acquire()
        self._closed = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.run.release()

    def read(self, columns: list[Column], start: int, stop: int, step: int = 1
             ) -> pa.RecordBatch:
        run = self.run
        rows = np.arange(start, stop, step)
        n = len(rows)
        stamps = run.events.time[rows]
        wanted = [(c, run.methods.get(c.name)) for c in columns]
        streams = {s for _, m in wanted if m is not None and m.interface is not None
                   for s in m.interface.streams}
        per_event = {c.name: _Values(c, n) for c, m in wanted
                     if m is not None and m.interface is not None}
        if per_event:
            for k, i in enumerate(rows):
                try:  # the datagrams' buffers are reused: each value is copied out at once
                    event = run.event(int(i), streams, scratch=True)
                except Exception as exc:
                    raise self._unreadable(int(i), exc) from None
                if event is None:
                    continue
                for col, method in wanted:
                    if col.name in per_event:
                        per_event[col.name].put(k, self._value(col, method, event, int(i)))
        arrays = []
        for col, method in wanted:
            if col.kind is Kind.RUN:
                arrays.append(pa.array(np.full(n, run.number, dtype=np.int32)))
            elif col.kind is Kind.TIME:
                ns = allocate((n,), np.int64)
                ns[:] = raw_time_to_ns(stamps, LCLS2_EPOCH)
                arrays.append(pa.Array.from_buffers(TIME_TYPE, n, [None, pa.py_buffer(ns)]))
            elif col.name == TIMESTAMP:
                arrays.append(pa.array(stamps, type=pa.uint64()))
            elif method.pv is not None:
                arrays.append(self._epics(col, method.pv, stamps))
            else:
                arrays.append(per_event[col.name].array())
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema([c.field for c in columns]))

    def _value(self, col: Column, method: Method, event: Any, i: int) -> Any:
        try:
            value = call(method, event)
        except Exception as exc:
            raise self._unreadable(i, exc, col.name) from None
        if value is not None and col.dtype.kind != "O" and np.shape(value) != col.shape:
            raise RunUnreadable(
                f"{self.run.describe()}: {col.name} of event {i} has shape {np.shape(value)}, "
                f"where the run's first events had {col.shape}; a column has one shape")
        return value

    def _epics(self, col: Column, pv: str, stamps: np.ndarray) -> pa.Array:
        times, values = self.run.epics[pv]
        at = np.searchsorted(times, stamps, side="right") - 1
        column = _Values(col, len(stamps))
        for k, j in enumerate(at):
            column.put(k, values[j] if j >= 0 else None)
        return column.array()

    def _unreadable(self, i: int, exc: Exception, column: str | None = None) -> RunUnreadable:
        what = f" ({column})" if column else ""
        return RunUnreadable(f"{self.run.describe()}: event {i}{what} cannot be read: "
                             f"{type(exc).__name__}: {exc}")


class _Values:
    """One column of a batch being filled event by event (None: null), straight into the
    buffer Arrow wraps."""

    def __init__(self, col: Column, n: int) -> None:
        self.col = col
        if col.dtype.kind == "O":
            self.texts: list | None = [None] * n
        else:
            self.texts = None
            self.buf = allocate((n, *col.shape), col.dtype)
            self.present = np.zeros(n, dtype=bool)

    def put(self, k: int, value: Any) -> None:
        if self.texts is not None:
            self.texts[k] = value
        elif value is not None:
            self.buf[k] = value
            self.present[k] = True

    def array(self) -> pa.Array:
        if self.texts is not None:
            return pa.array(self.texts, type=pa.string())
        n = len(self.present)
        if self.present.all():
            return wrap_fixed(self.col, self.buf, n)
        self.buf[~self.present] = 0  # deterministic bytes under the nulls
        return with_nulls(wrap_fixed(self.col, self.buf, n), self.present)
