"""pad: bring every frame to one fixed size with a channel axis, as the input of a peak-finding
network expects (its convolutions want a size such as a multiple of 2**depth, and frames from
different detectors differ).

`{"step": "pad", "column": C, "height": H, "width": W, "value": 0}`. Each of the frame's last
two axes is padded with `value` or cropped, keeping the frame centred; when the difference is
odd the extra row or column is added (or removed) at the end, i.e. at the bottom or right. The
result is a tensor of shape [C, H, W]: a 3-D column keeps its first axis as the channels, a
2-D frame gets C = 1. `value` must fit the column's type.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.processing.base import (
    ArrayLayout,
    Params,
    Step,
    fill_scalar,
    null_events,
    processed_field,
    shown,
)

MAX_SIDE = 32768
MAX_VALUES = 2**31 - 1


def centre(size: int, target: int) -> tuple[slice, slice]:
    """(source, destination) slices of one axis padded or cropped to `target`, centred."""
    if target >= size:
        start = (target - size) // 2
        return slice(0, size), slice(start, start + size)
    start = (size - target) // 2
    return slice(start, start + target), slice(0, target)


class Pad(Step):
    name = "pad"

    def __init__(self, column: str, input_field: pa.Field, output_field: pa.Field,
                 layout: ArrayLayout, out_layout: ArrayLayout, value: np.ndarray) -> None:
        super().__init__(column, input_field, output_field)
        self.layout, self.out_layout, self.value = layout, out_layout, value
        (_, h, w), (_, height, width) = self.frames_shape, out_layout.shape
        (self.src_y, self.dst_y), (self.src_x, self.dst_x) = centre(h, height), centre(w, width)
        self.fill = height > h or width > w

    @property
    def frames_shape(self) -> tuple[int, ...]:
        """The input's per-event shape as [C, H, W]."""
        shape = self.layout.shape
        return (1, *shape) if len(shape) == 2 else shape

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Pad:
        p = Params(cls.name, params, ("column", "height", "width"), {"value": 0})
        _, field, layout = p.array_column(schema, bools=True, bfloat16=True)
        if layout.ndim not in (2, 3):
            raise p.error("column", f"{shown(field.name)} has per-event shape "
                          f"{list(layout.shape)}; pad takes frames: tensors of shape [H, W] or "
                          "[C, H, W]")
        side = f"a positive integer up to {MAX_SIDE}"
        height = p.integer("height", side, maximum=MAX_SIDE)
        width = p.integer("width", side, maximum=MAX_SIDE)
        value = fill_scalar(p, "value", layout)
        channels = 1 if layout.ndim == 2 else layout.shape[0]
        if channels * height * width > MAX_VALUES:  # Arrow's fixed-size lists count in int32
            raise p.error("height", f"and 'width' make {channels * height * width} values per "
                          f"event; at most {MAX_VALUES} fit one event")
        out_layout = layout.with_(shape=(channels, height, width))
        note = (f"pad to [{channels},{height},{width}] centred (from {list(layout.shape)}; "
                f"fill {shown(p.raw('value'))})")
        return cls(field.name, field, processed_field(field, out_layout.arrow_type(), note),
                   layout, out_layout, value)

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        values = self.layout.view(column).reshape(-1, *self.frames_shape)
        out = allocate((len(column), *self.out_layout.shape), values.dtype)
        if self.fill:
            out.fill(self.value)
        out[:, :, self.dst_y, self.dst_x] = values[:, :, self.src_y, self.src_x]
        return self.out_layout.build(out, null_events(column))
