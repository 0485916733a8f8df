"""Arrow data sent by clients (DoPut), checked in full before anything reads or stores it.

Arrow's IPC reader checks a message's framing, not its contents: a batch whose list offsets point
past its values, or whose string views reach beyond their data buffer, reads back as a batch like
any other, and the first kernel that follows those offsets reads (and may send back) whatever
memory lies there, or crashes the process. So every batch a client sends gets Arrow's full
validation (`RecordBatch.validate(full=True)`: offsets, view ranges, UTF-8, dictionary indexes,
union type codes) and its schema an allow-list of types, before it is bound to a query, appended
to a log or handed to any kernel. A violation is INVALID_ARGUMENT and nothing is kept.

Full validation costs nothing per value for fixed-width data (detector frames, waveforms): it
walks offsets and views only, which is what must be checked.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa

from flight_server.errors import InvalidArgument
from schemas.json_input import excerpt

TypeCheck = Callable[[pa.DataType], bool]


def is_scalar_parameter(t: pa.DataType) -> bool:
    """A type a SQL parameter may have: a single value DuckDB binds as a literal."""
    return (pa.types.is_null(t) or pa.types.is_boolean(t) or pa.types.is_integer(t)
            or pa.types.is_floating(t) or pa.types.is_decimal(t) or pa.types.is_string(t)
            or pa.types.is_large_string(t) or pa.types.is_string_view(t)
            or pa.types.is_binary(t) or pa.types.is_large_binary(t)
            or pa.types.is_binary_view(t) or pa.types.is_date(t) or pa.types.is_time(t)
            or pa.types.is_timestamp(t) or pa.types.is_duration(t))


def check_types(schema: pa.Schema, allowed: TypeCheck, what: str, accepted: str) -> None:
    """Refuse a schema with a column whose type `allowed` does not accept, naming it."""
    for field in schema:
        if not allowed(field.type):
            raise InvalidArgument(f"{what}: column {excerpt(field.name)} is {field.type}, which "
                                  f"is not accepted here; {accepted}")


def validated(batch: pa.RecordBatch, what: str) -> pa.RecordBatch:
    """The batch, once Arrow's full validation finds it consistent."""
    try:
        batch.validate(full=True)
    except (pa.ArrowInvalid, pa.ArrowIndexError, pa.ArrowTypeError) as exc:
        raise InvalidArgument(f"{what} is not valid Arrow data ({excerpt(str(exc), 200)}); "
                              "nothing was stored") from None
    return batch


def read_validated(reader: object, what: str,
                   max_bytes: int) -> pa.Table:
    """Every batch of a DoPut, validated, at most `max_bytes` in all."""
    batches, total = [], 0
    while True:
        try:
            chunk = reader.read_chunk()
        except StopIteration:
            break
        if chunk.data is None:
            continue
        total += chunk.data.get_total_buffer_size()  # buffer sizes: no offsets followed
        if total > max_bytes:
            raise InvalidArgument(f"{what} exceed {max_bytes // 1024} KiB; nothing was stored")
        batches.append(validated(chunk.data, what))
    return pa.Table.from_batches(batches, schema=reader.schema)
