"""Server-side processing: a short chain of steps applied to each batch before it is sent, so
that a client asks for the reduced data (a cropped, binned, float16 frame) instead of moving
whole detector frames to reduce them itself.

A request carries `[{"step": NAME, ...parameters}, ...]`; `build_pipeline` checks all of it
against the schema the client would otherwise get, before any data is read, and gives the
schema after the steps (`Pipeline.schema`); `Pipeline.apply` runs the steps on each batch.
Columns no step touches are passed through as they are (the same buffers, no copy). A step may
add or drop columns (peaks) and drop events (hits): a batch can come out shorter than it went in.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

from flight_server.errors import close_matches
from flight_server.processing.base import DTYPE, PROCESSING, Step, StepError, quoted, shown
from flight_server.processing.bin import Bin
from flight_server.processing.cast import Cast
from flight_server.processing.hits import Hits
from flight_server.processing.normalize import Normalize
from flight_server.processing.pad import Pad
from flight_server.processing.peaks import Peaks
from flight_server.processing.roi import Roi
from flight_server.processing.threshold import Threshold
from flight_server.processing.tof_hits import TofHits
from flight_server.processing.tof_integrate import TofIntegrate

STEPS: dict[str, type[Step]] = {
    cls.name: cls for cls in (Roi, Bin, Threshold, Normalize, Cast, Pad, TofIntegrate, TofHits,
                              Peaks, Hits)
}

__all__ = ["DTYPE", "PROCESSING", "STEPS", "Pipeline", "Step", "StepError", "build_pipeline"]


@dataclass(frozen=True)
class Pipeline:
    """Steps checked against `input_schema`; `schema` is what their output batches carry."""

    steps: tuple[Step, ...]
    input_schema: pa.Schema
    schema: pa.Schema

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for step in self.steps:
            batch = step.apply(batch)
        return batch


def build_pipeline(steps: list[dict], schema: pa.Schema) -> Pipeline:
    """Check every step against the schema it will see (the input's, then each step's output)
    and build the chain. A StepError names the step, the parameter and, in a chain of several,
    the step's position."""
    if not isinstance(steps, list | tuple):
        raise StepError(f"processing steps must be a list of objects; got {shown(steps)}")
    built: list[Step] = []
    current = schema
    for i, spec in enumerate(steps):
        where = f" (step {i + 1} of {len(steps)})" if len(steps) > 1 else ""
        try:
            step = _step_class(spec).from_params(_params(spec), current)
            current = step.output_schema(current)
            built.append(step)
        except StepError as exc:
            raise StepError(f"{exc}{where}") from None
    return Pipeline(tuple(built), schema, current)


def _step_class(spec: object) -> type[Step]:
    if not isinstance(spec, Mapping) or "step" not in spec:
        raise StepError("a processing step must be an object with \"step\": one of "
                        f"{quoted(STEPS)}; got {shown(spec)}")
    name = spec["step"]
    if name not in STEPS:
        hint = close_matches(name, STEPS) if isinstance(name, str) else ""
        raise StepError(f"unknown processing step {shown(name)}; the steps are "
                        f"{quoted(STEPS)}.{hint}")
    return STEPS[name]


def _params(spec: Mapping) -> dict:
    return {k: v for k, v in spec.items() if k != "step"}
