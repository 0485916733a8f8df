"""Write a planned request to Parquet or Arrow IPC, batch by batch, atomically.

Memory stays at about one batch whatever the run size, and the destination only ever holds a
complete file: data goes to a temporary file beside it that is renamed when the last batch is in.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from clients.client import Client, progress_bar

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".arrow": "arrow", ".feather": "arrow",
           ".ipc": "arrow"}


def _writer(kind: str, sink: str, schema: pa.Schema):
    if kind == "parquet":
        return pq.ParquetWriter(sink, schema, compression="zstd")
    return ipc.new_file(sink, schema)


def write_stream(client: Client, info: flight.FlightInfo, output: Path,
                 progress: bool = True) -> int:
    """Fetch every endpoint of `info` in order into `output`; returns the events written."""
    bar = progress_bar(info.total_bytes, output.name) if progress else None
    try:
        return write_batches(info.schema, client.batches(info), output, bar)
    finally:
        if bar is not None:
            bar.close()


def write_batches(schema: pa.Schema, batches: Iterable[pa.RecordBatch], output: Path,
                  bar: Any = None) -> int:
    """Write batches to `output` (format from its suffix), atomically; returns the rows."""
    kind = FORMATS.get(output.suffix.lower())
    if kind is None:
        raise ValueError(f"unknown output format '{output.suffix}'; use one of "
                         f"{', '.join(sorted(FORMATS))}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    os.close(fd)
    rows = 0
    try:
        writer = _writer(kind, tmp, schema)
        try:
            for batch in batches:
                writer.write_batch(batch)
                rows += batch.num_rows
                if bar is not None:
                    bar.update(batch.nbytes)
        finally:
            writer.close()
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return rows
