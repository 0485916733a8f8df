"""Write a planned request to Parquet or Arrow IPC, batch by batch, atomically.

Memory stays at about one batch whatever the run size, and the destination only ever holds a
complete file: data goes to a temporary file beside it that is renamed when the last batch is in.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
    kind = FORMATS.get(output.suffix.lower())
    if kind is None:
        raise ValueError(f"unknown output format '{output.suffix}'; use one of "
                         f"{', '.join(sorted(FORMATS))}")
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".part", dir=output.parent)
    os.close(fd)
    bar = progress_bar(info.total_bytes, output.name) if progress else None
    rows = 0
    try:
        writer = _writer(kind, tmp, info.schema)
        try:
            for batch in client.batches(info):
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
    finally:
        if bar is not None:
            bar.close()
    return rows
