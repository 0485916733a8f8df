"""The content digest a mirror compares with its source: equal for equal tables however their
batches were cut (a resumed transfer cuts them elsewhere), different for any changed value,
null, length or column type."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from schemas.digest import Digest


def table() -> pa.Table:
    rng = np.random.default_rng(3)
    n = 50
    tensor = pa.FixedShapeTensorArray.from_numpy_ndarray(
        rng.integers(0, 60000, (n, 4, 3), dtype=np.uint16))
    ragged = pa.array([list(range(i % 5)) if i % 7 else None for i in range(n)],
                      pa.list_(pa.float32()))
    return pa.table({
        "energy": pa.array(rng.normal(size=n)),
        "code": pa.array([i if i % 4 else None for i in range(n)], pa.int64()),
        "flag": pa.array([bool(i % 3) if i % 11 else None for i in range(n)]),
        "time": pa.array(np.arange(n) * 1000, pa.timestamp("ns", tz="UTC")),
        "wave": pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=n * 8),
                                                           pa.float32()), 8),
        "frame": tensor,
        "hits": ragged,
        "name": pa.array([f"shot-{i}" if i % 6 else None for i in range(n)]),
        "pos": pa.StructArray.from_arrays([pa.array(np.arange(n, dtype=np.int32)),
                                           pa.array(np.arange(n, dtype=np.float64))],
                                          names=["x", "y"]),
    })


def digest(t: pa.Table, cuts: list[int]) -> tuple[str, int]:
    summed = Digest(t.schema)
    edges = [0, *cuts, t.num_rows]
    for lo, hi in zip(edges, edges[1:], strict=False):
        for batch in t.slice(lo, hi - lo).to_batches():
            summed.update(batch)
    result = summed.result()
    return result.sha256, result.events


def test_equal_however_the_batches_are_cut_or_sent() -> None:
    t = table()
    whole = digest(t, [])
    assert digest(t, [1, 17, 18, 40]) == whole
    assert digest(t, [25]) == whole
    # through Arrow IPC, as a Flight stream carries it (compressed, too)
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.ipc.new_stream(sink, t.schema, options=options) as writer:
        for lo in range(0, t.num_rows, 7):
            writer.write_table(t.slice(lo, 7))
    received = pa.ipc.open_stream(sink.getvalue()).read_all()
    assert received.column("frame").chunk(0).offset == 0
    assert digest(received, []) == whole
    assert whole[1] == t.num_rows


@pytest.mark.parametrize("change", [
    lambda t: t.set_column(0, "energy", pa.array(np.r_[t["energy"].to_numpy()[:-1], 0.5])),
    lambda t: t.set_column(1, "code", pa.array(range(t.num_rows), pa.int64())),  # nulls gone
    lambda t: t.set_column(6, "hits", pa.array([[0.0]] * t.num_rows, pa.list_(pa.float32()))),
    lambda t: t.set_column(7, "name", pa.array(["shot"] * t.num_rows)),
    lambda t: t.cast(t.schema.set(0, pa.field("energy", pa.float32()))),
    lambda t: t.slice(0, t.num_rows - 1),
])
def test_any_change_changes_it(change) -> None:
    t = table()
    assert digest(change(t), [10]) != digest(t, [10])
