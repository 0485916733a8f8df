"""A run described as a table: what every source (one module per layout) hands to planning,
DoGet, SQL and jobs.

A source describes a run once (schema, event count, per-run configuration) and opens a `Reader`
per stream that turns (columns, event range) into one RecordBatch. Some runs hold more than one
table: a European XFEL detector's pulse-resolved frames, an NXmx run's per-run arrays; those are
runs of their own, reached through `table()`.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import pyarrow as pa

from flight_server.errors import NotFound, close_matches, listing
from flight_server.sources.columns import Column
from flight_server.sources.layouts import Layout
from schemas import metadata as md


class Reader:
    """One stream's access to a run; `read` may run on several pool threads at once. A context
    manager: leaving it closes the reader."""

    run: Run

    def read(self, columns: list[Column], start: int, stop: int, step: int = 1
             ) -> pa.RecordBatch:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Run:
    experiment: str
    number: int
    path: Path  # the file (or run directory) the run is read from
    layout: Layout
    num_events: int
    columns: dict[str, Column]  # in schema order, derived columns first
    aliases: dict[str, str]  # other names of a column (a soft link's target) -> column name
    config: dict[str, Any]
    start_ns: int | None
    end_ns: int | None
    table_name: str | None = None  # None for a run's main table

    # -- what a source implements -----------------------------------------------------------

    def reader(self) -> Reader:
        """Open the run for one stream (fails now, not mid-stream, if it cannot be read)."""
        raise NotImplementedError

    def retire(self) -> None:
        """The catalog no longer serves this description: free what it holds once unused."""

    def tables(self) -> list[str]:
        """The names of the run's other tables."""
        return []

    def _table(self, name: str) -> Run | None:
        return None

    # -- common ------------------------------------------------------------------------------

    def table(self, name: str | None) -> Run:
        """The run's table of that name (None: the main table)."""
        if name is None:
            return self
        found = self._table(name)
        if found is None:
            others = self.tables()
            raise NotFound(
                f"run {self.number} of experiment '{self.experiment}' has no table "
                f"'{name}'.{close_matches(name, others)} Tables: {listing(others)}"
            )
        return found

    @property
    def nbytes(self) -> int:
        return int(sum(c.event_bytes for c in self.columns.values()) * self.num_events)

    def resolve(self, names: tuple[str, ...] | list[str] | None) -> list[Column]:
        """Columns by name (None = all), accepting a leading slash and soft-link aliases."""
        if names is None:
            return list(self.columns.values())
        resolved = []
        for raw in names:
            name = raw.lstrip("/")
            name = self.aliases.get(name, name)
            col = self.columns.get(name)
            if col is None:
                raise NotFound(
                    f"{self.describe()} has no column "
                    f"'{raw}'.{close_matches(name, self.columns)} "
                    f"Columns: {listing(self.columns, limit=40)}"
                )
            resolved.append(col)
        return resolved

    def describe(self) -> str:
        where = f"run {self.number} of experiment '{self.experiment}'"
        return where if self.table_name is None else f"table '{self.table_name}' of {where}"

    def schema(self, columns: list[Column] | None = None) -> pa.Schema:
        cols = list(self.columns.values()) if columns is None else columns
        return pa.schema([c.field for c in cols], metadata=self.schema_metadata())

    def schema_metadata(self) -> dict[bytes, bytes]:
        meta = {
            md.EXPERIMENT: self.experiment.encode(),
            md.RUN: str(self.number).encode(),
            md.LAYOUT: self.layout.name.encode(),
            md.EVENTS: str(self.num_events).encode(),
            md.RUN_BYTES: str(self.nbytes).encode(),
            md.CONFIG: json.dumps(self.config, separators=(",", ":")).encode(),
        }
        if self.table_name is not None:
            meta[md.TABLE] = self.table_name.encode()
        tables = self.tables()
        if tables:
            meta[md.TABLES] = json.dumps(tables).encode()
        if self.start_ns is not None and self.end_ns is not None:
            meta[md.START_TIME] = iso_utc(self.start_ns).encode()
            meta[md.END_TIME] = iso_utc(self.end_ns).encode()
        return meta


def iso_utc(ns: int) -> str:
    stamp = dt.datetime.fromtimestamp(ns // 1_000_000_000, tz=dt.UTC)
    return stamp.replace(microsecond=(ns % 1_000_000_000) // 1000).isoformat()
