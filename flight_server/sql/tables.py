"""Runs as SQL tables: Arrow sources that DuckDB scans with projection and filter pushdown.

DuckDB's Arrow scan pushes the columns a query needs and its simple filters into a
`pyarrow.dataset.Dataset` by calling `dataset.scanner(columns=..., filter=...)`. `RunSource` is
that entry point for one run: it reads only the named columns, and only the events the filter
can select, through the same read path DoGet uses. A filter that names only `event` costs no I/O
to evaluate; one that names scalar columns reads those first, then the requested (possibly heavy)
columns only over the spans that hold selected events.

An experiment's `events` view is a UNION ALL of its runs, each with its run number as a constant,
so DuckDB folds `WHERE run = 7` before planning: the other runs are never scanned or opened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Executor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from flight_server.sources import Run
from flight_server.sources.columns import Column, Kind, arrow_value_type
from flight_server.sources.streaming import BatchSizing, stream_batches
from schemas.metadata import RUN_COLUMN

EVENT_COLUMN = "event"  # the event's index within its run
SELECTION_BLOCK = 1 << 20  # events whose selection is worked out at once (bounds its memory)
MAX_GAP = 16  # unselected events read rather than starting a new read span


def sql_type(column: Column) -> pa.DataType:
    """The column's type as DuckDB should see it: a per-event array (waveform, frame, tensor)
    becomes a list per dimension, so the shape survives into SQL (`"pnccd/image"[1][5][7]`).
    Lists, not fixed-size lists: DuckDB sizes an ARRAY vector for 2048 rows whatever the batch,
    which is 2 GiB for one vector of 1 MiB frames, where a LIST holds only the rows it has."""
    if column.kind not in (Kind.TENSOR, Kind.LIST):
        return column.field.type
    nested = arrow_value_type(column.dtype)
    for _ in column.shape:
        nested = pa.list_(nested)
    return nested


def to_sql_array(column: Column, array: pa.Array) -> pa.Array:
    """Zero-copy: the values of a fixed-size array column, viewed as one list per dimension."""
    if column.kind not in (Kind.TENSOR, Kind.LIST):
        return array
    storage = array.storage if column.kind is Kind.TENSOR else array
    width = storage.type.list_size
    nested = storage.values.slice(storage.offset * width, len(storage) * width)
    rows = len(storage)
    counts = [rows]
    for size in column.shape[:-1]:
        counts.append(counts[-1] * size)
    for size, count in zip(reversed(column.shape), reversed(counts), strict=True):
        offsets = pa.array(np.arange(0, (count + 1) * size, size, dtype=np.int32))
        nested = pa.ListArray.from_arrays(offsets, nested)
    return nested


class ReadContext:
    """What every scan of one query shares: batch sizing, the read pool, the cancel check."""

    def __init__(self, sizing: BatchSizing, pool: Executor,
                 is_cancelled: Callable[[], bool] = lambda: False) -> None:
        self.sizing = sizing
        self.pool = pool
        self.is_cancelled = is_cancelled


class RunSource(ds.Dataset):
    """One run as a dataset DuckDB can scan. Only `schema` and `scanner` are used by DuckDB; the
    base class is there because DuckDB recognises a dataset by its type."""

    def __init__(self, run: Run, context: ReadContext | None) -> None:  # no super(): not C++
        self.run = run
        self.context = context  # set by each query that scans it: its pool and cancel check
        self.stored = [c for c in run.columns.values() if c.kind is not Kind.RUN]
        self._by_name = {c.name: c for c in self.stored}
        fields = [pa.field(EVENT_COLUMN, pa.int64(), nullable=False)]
        fields += [pa.field(c.name, sql_type(c)) for c in self.stored]
        self._schema = pa.schema(fields)

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    def scanner(self, columns: list[str] | None = None, filter: pc.Expression | None = None,
                **_: object) -> _Scan:
        return _Scan(self, list(self._schema.names) if columns is None else list(columns),
                     filter)


class _Scan:
    def __init__(self, source: RunSource, columns: list[str],
                 predicate: pc.Expression | None) -> None:
        self.source = source
        self.columns = columns
        self.predicate = predicate

    def to_reader(self) -> pa.RecordBatchReader:
        schema = pa.schema([self.source.schema.field(n) for n in self.columns])
        return pa.RecordBatchReader.from_batches(schema, self._batches())

    def _batches(self) -> Iterator[pa.RecordBatch]:
        source, run = self.source, self.source.run
        if self.predicate is None:
            yield from self._read(0, run.num_events, self.columns)
            return
        needed = referenced_fields(self.predicate, source.schema)
        stored_needed = [n for n in needed if n != EVENT_COLUMN]
        wanted = list(dict.fromkeys([*self.columns, *needed]))
        for block in range(0, run.num_events, SELECTION_BLOCK):
            stop = min(block + SELECTION_BLOCK, run.num_events)
            if source.context.is_cancelled():
                return
            selected = self._select(block, stop, stored_needed)
            for first, last in spans(selected, MAX_GAP):
                for batch in self._read(first, last + 1, wanted):
                    kept = pa.Table.from_batches([batch]).filter(self.predicate)
                    if kept.num_rows:
                        yield from kept.select(self.columns).to_batches()

    def _select(self, start: int, stop: int, stored: list[str]) -> np.ndarray:
        """Event indices in [start, stop) the predicate keeps, reading only the columns it names."""
        if not stored:
            table = pa.table({EVENT_COLUMN: np.arange(start, stop, dtype=np.int64)})
            return table.filter(self.predicate).column(EVENT_COLUMN).to_numpy()
        kept = [pa.Table.from_batches([b]).filter(self.predicate).column(EVENT_COLUMN)
                for b in self._read(start, stop, [EVENT_COLUMN, *stored])]
        return np.concatenate([c.to_numpy() for c in kept]) if kept else np.empty(0, np.int64)

    def _read(self, start: int, stop: int, names: list[str]) -> Iterator[pa.RecordBatch]:
        """Events [start, stop) of the named columns, in the source's SQL types."""
        source = self.source
        stored = [source._by_name[n] for n in names if n != EVENT_COLUMN]
        schema = pa.schema([source.schema.field(n) for n in names])
        if start >= stop:
            return
        if not stored:  # only the event index: nothing to read
            step = max(source.context.sizing.batch_bytes // 8, 1)
            for first in range(start, stop, step):
                events = np.arange(first, min(first + step, stop), dtype=np.int64)
                yield pa.record_batch([events], schema=schema)
            return
        offset = start
        for batch, _ in stream_batches(source.run, stored, start, stop, 1,
                                       source.context.sizing, source.context.pool,
                                       source.context.is_cancelled):
            arrays = {c.name: to_sql_array(c, batch.column(i)) for i, c in enumerate(stored)}
            events = np.arange(offset, offset + batch.num_rows, dtype=np.int64)
            offset += batch.num_rows
            yield pa.record_batch([events if n == EVENT_COLUMN else arrays[n] for n in names],
                                  schema=schema)


def spans(selected: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Inclusive (first, last) event spans covering sorted indices, merging small gaps: one read
    of a few unwanted events is cheaper than two reads."""
    if selected.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(selected) > max_gap + 1)
    firsts = np.concatenate([[selected[0]], selected[breaks + 1]])
    lasts = np.concatenate([selected[breaks], [selected[-1]]])
    return list(zip(firsts.tolist(), lasts.tolist(), strict=True))


def referenced_fields(predicate: pc.Expression, schema: pa.Schema) -> list[str]:
    """The columns a pushed-down filter names. pyarrow does not expose an expression's fields,
    so each is found by binding the filter against the schema without it (zero rows: no data)."""
    return list(_referenced(str(predicate), predicate, schema))


def _referenced(key: str, predicate: pc.Expression, schema: pa.Schema) -> tuple[str, ...]:
    cache_key = (key, tuple(schema.names))
    hit = _FIELDS_CACHE.get(cache_key)
    if hit is not None:
        return hit
    empty = schema.empty_table()
    names = []
    for name in schema.names:
        try:
            empty.drop_columns([name]).filter(predicate)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError):
            names.append(name)
    result = tuple(names)
    if len(_FIELDS_CACHE) >= 256:  # filters repeat across the runs of a query; a tiny cache
        _FIELDS_CACHE.clear()
    _FIELDS_CACHE[cache_key] = result
    return result


_FIELDS_CACHE: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}


# -- the runs table --------------------------------------------------------------------------

RUNS_SCHEMA = pa.schema([
    pa.field("run", pa.int32(), nullable=False),
    pa.field("events", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("start_time", pa.timestamp("ns", tz="UTC")),
    pa.field("end_time", pa.timestamp("ns", tz="UTC")),
    pa.field("layout", pa.string(), nullable=False),
    pa.field("columns", pa.list_(pa.string()), nullable=False),
])


def runs_table(runs: list[Run]) -> pa.Table:
    """The experiment's catalogue as a table: one row per run."""
    return pa.table({
        "run": pa.array([r.number for r in runs], pa.int32()),
        "events": pa.array([r.num_events for r in runs], pa.int64()),
        "bytes": pa.array([r.nbytes for r in runs], pa.int64()),
        "start_time": pa.array([r.start_ns for r in runs], pa.timestamp("ns", tz="UTC")),
        "end_time": pa.array([r.end_ns for r in runs], pa.timestamp("ns", tz="UTC")),
        "layout": pa.array([r.layout.name for r in runs], pa.string()),
        "columns": pa.array([[c for c in r.columns if c != RUN_COLUMN] for r in runs],
                            pa.list_(pa.string())),
    }, schema=RUNS_SCHEMA)
