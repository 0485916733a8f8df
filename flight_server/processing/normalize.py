"""normalize: divide each event's array by a number of the same event (pulse energy, incident
flux), so that shots of different intensity can be compared or averaged.

`{"step": "normalize", "column": C, "by": SCALAR_COLUMN}`. The result is float32 (float64 when
the array is float64, which is not narrowed); the division itself is done in float64. An event
whose divisor is zero, NaN, infinite or null (the file's missing value) has no meaningful
result, so the event is null: an honest gap rather than inf or NaN pixels to be found later.
When both columns have units the result's are "array-units/divisor-units".
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.processing.base import (
    ArrayLayout,
    Params,
    Step,
    StepError,
    describe_type,
    null_events,
    processed_field,
    shown,
)
from schemas import metadata as md


class Normalize(Step):
    name = "normalize"

    def __init__(self, column: str, input_field: pa.Field, output_field: pa.Field,
                 layout: ArrayLayout, out_layout: ArrayLayout, by: pa.Field) -> None:
        super().__init__(column, input_field, output_field)
        self.layout, self.out_layout, self.by = layout, out_layout, by

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Normalize:
        p = Params(cls.name, params, ("column", "by"))
        _, field, layout = p.array_column(schema)
        _, by = p.column(schema, "by")
        if not (pa.types.is_integer(by.type) or pa.types.is_floating(by.type)):
            raise p.error("by", f"{shown(by.name)} is a {describe_type(by.type)} column, "
                          "but normalize divides by a numeric scalar column (one number per event)")
        out_dtype = np.dtype(np.float64 if layout.dtype == np.float64 else np.float32)
        out_layout = layout.with_(value_type=pa.from_numpy_dtype(out_dtype))
        meta = {}
        units, by_units = ((f.metadata or {}).get(md.UNITS) for f in (field, by))
        if by_units:
            meta[md.UNITS] = (units or b"1") + b"/" + by_units
        note = (f"normalize by {by.name} ({layout.dtype}->{out_dtype}; null where {by.name} is "
                "0, NaN, infinite or null)")
        out = processed_field(field, out_layout.arrow_type(), note, meta, nullable=True)
        return cls(field.name, field, out, layout, out_layout, by)

    def inputs(self) -> set[str]:
        return {self.column, self.by.name}

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        by = batch.column(self.by.name) if self.by.name in batch.schema.names else None
        if by is None or not by.type.equals(self.by.type):
            raise StepError(f"normalize: the input's column {self.by.name!r} is not the "
                            f"{self.by.type} the step was built for")
        divisor = np.array(by.to_numpy(zero_copy_only=False), dtype=np.float64)  # small copy
        bad = ~np.isfinite(divisor) | (divisor == 0)
        if by.null_count:
            bad |= by.is_null().to_numpy(zero_copy_only=False)
        divisor[bad] = np.nan  # no division-by-zero warnings; those events are null anyway
        null = null_events(column)
        null = bad if null is None else null | bad
        values = self.layout.view(column)
        out = allocate(values.shape, self.out_layout.dtype)
        np.divide(values, divisor.reshape(-1, *(1,) * self.layout.ndim), out=out,
                  casting="same_kind")
        return self.out_layout.build(out, null)
