"""A content digest of a table that arrives as record batches, computed alike by the server that
holds a run (the `digest` action) and by whoever copied it (a mirror), to compare the two.

It must not depend on where the batches were cut: a transfer that broke off and resumed cuts
them elsewhere than an unbroken one. So each column is hashed as one sequence, fed batch after
batch: its values' bytes (fixed-width values straight from the Arrow buffer, without a copy),
the lengths of variable-length values, the positions of its nulls, each into a SHA-256 of its
own; nested types (lists, tensors, structs) hash their children the same way. The digest is the
SHA-256 of the column names and types and of those hashes in order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ACTION = "digest"


@dataclass(frozen=True)
class RunDigest:
    sha256: str
    events: int

    def to_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "events": self.events}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RunDigest:
        return cls(str(doc["sha256"]), int(doc["events"]))


class Digest:
    """Fed every batch in order (cut anywhere); `result()` at the end."""

    def __init__(self, schema: pa.Schema) -> None:
        # names and types only: schema metadata (compression, run numbers) may differ
        self._names = [f"{field.name}\x00{field.type}" for field in schema]
        self._hashes: dict[str, Any] = {}
        self._seen: dict[str, int] = {}  # values fed per part: where the next nulls are
        self.events = 0

    def update(self, batch: pa.RecordBatch) -> None:
        for i, column in enumerate(batch.columns):
            self._feed(str(i), column)
        self.events += batch.num_rows

    def result(self) -> RunDigest:
        total = hashlib.sha256()
        for name in self._names:
            total.update(name.encode() + b"\x00")
        for key in sorted(self._hashes):
            total.update(key.encode() + b"\x00" + self._hashes[key].digest())
        return RunDigest(total.hexdigest(), self.events)

    # -- one column, recursively ---------------------------------------------------------------

    def _hash(self, key: str) -> Any:
        if key not in self._hashes:
            self._hashes[key] = hashlib.sha256()
        return self._hashes[key]

    def _feed(self, key: str, array: pa.Array) -> None:
        if isinstance(array.type, pa.BaseExtensionType):  # a tensor: its fixed-size-list storage
            array = array.storage
        kind = array.type
        if not len(array):
            return
        at = self._seen.get(key, 0)
        self._seen[key] = at + len(array)
        if array.null_count:
            nulls = np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False)) + at
            self._hash(key + "/nulls").update(nulls.astype(np.int64).tobytes())
        if pa.types.is_dictionary(kind):
            self._feed(key, array.dictionary_decode())
        elif pa.types.is_boolean(kind):
            values = array.fill_null(False).to_numpy(zero_copy_only=False)
            self._hash(key).update(values.astype(np.uint8).tobytes())
        elif pa.types.is_fixed_size_list(kind):
            self._feed(key + "/item", array.flatten())
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
            self._lengths(key, pc.list_value_length(array))
            self._feed(key + "/item", array.flatten())
        elif pa.types.is_struct(kind):
            for i, child in enumerate(array.flatten()):
                self._feed(f"{key}/{i}", child)
        elif _variable_width(kind):
            self._lengths(key, pc.binary_length(array))
            self._hash(key).update(b"".join(v for v in array.fill_null(b"").to_pylist())
                                   if pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
                                   else "".join(array.fill_null("").to_pylist()).encode())
        elif pa.types.is_null(kind):
            pass  # the length says it all
        elif kind.bit_width % 8 == 0:  # numbers, times, fixed-size binary: the buffer itself
            width = kind.bit_width // 8
            self._hash(key).update(array.buffers()[1][array.offset * width:
                                                      (array.offset + len(array)) * width])
        else:
            raise TypeError(f"no digest for Arrow type {kind}")

    def _lengths(self, key: str, lengths: pa.Array) -> None:
        values = lengths.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        self._hash(key + "/lengths").update(values.tobytes())


def _variable_width(kind: pa.DataType) -> bool:
    return (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or pa.types.is_binary(kind) or pa.types.is_large_binary(kind))
