"""tof_hits: find ion hits in one channel of each time-of-flight trace with a constant-fraction
discriminator, so a client that counts ions gets a few hit times per event instead of the trace.
A constant-fraction time does not walk with the pulse height, unlike a plain threshold crossing.

`{"step": "tof_hits", "column": C, "channel": 0, "threshold": v, "fraction": 0.5, "delay": d,
"polarity": "positive", "keep": false}`. Per event:

1. x = trace - median(trace): the median is the baseline, as pulses cover few samples. With
   `"polarity": "negative"` (pulses going down from the baseline) x is negated, so the rest
   reads the same for both polarities and `threshold` is a height above the baseline (> 0).
2. The CFD signal s[t] = fraction * x[t] - x[t - delay], for t >= delay. On a pulse it goes
   positive on the leading edge and crosses zero once, going negative, at a time that does not
   depend on the pulse's height (for a Gaussian pulse of width sigma centred at m it is
   m + delay / 2 + sigma**2 * ln(fraction) / delay).
3. A hit is a crossing from s[i] > 0 to s[i + 1] <= 0 where x, interpolated to the crossing,
   exceeds `threshold`; its time, in samples from the trace's start (float64), is interpolated
   linearly between samples i and i + 1. Noise crossings stay below a threshold set above the
   noise.

Output: `C/hits`, a list<float64> of hit times in increasing order, and `C/n_hits` (int32), in
C's place; C is dropped unless `"keep": true`. A null event has null outputs; an event with a
NaN sample has no hits (its median is NaN). `channel` must be 0 for a 1-D trace.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.processing.base import ArrayLayout, Params, null_events
from flight_server.processing.tof_integrate import (
    NewColumnsStep,
    flag,
    new_field,
    scalar_array,
    trace_column,
    traces,
)

POLARITIES = ("positive", "negative")


class TofHits(NewColumnsStep):
    name = "tof_hits"

    def __init__(self, column: str, input_field: pa.Field, fields: Sequence[pa.Field],
                 keep: bool, layout: ArrayLayout, channel: int, threshold: float, fraction: float,
                 delay: int, negative: bool) -> None:
        super().__init__(column, input_field, fields, keep)
        self.layout, self.channel, self.threshold = layout, channel, threshold
        self.fraction, self.delay, self.negative = fraction, delay, negative

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> TofHits:
        p = Params(cls.name, params, ("column", "threshold", "delay"),
                   {"channel": 0, "fraction": 0.5, "polarity": "positive", "keep": False})
        field, layout, channels, samples = trace_column(p, schema)
        channel = p.integer("channel", f"an integer from 0 to {channels - 1} (the column has "
                            f"{channels} channel{'s' if channels > 1 else ''})", minimum=0)
        if channel >= channels:
            raise p.error("channel", f"must be an integer from 0 to {channels - 1} (the column "
                          f"has {channels} channel{'s' if channels > 1 else ''}); got {channel}")
        threshold = float(p.number("threshold"))
        if not 0 < threshold < math.inf:
            raise p.error("threshold", "must be a positive number (the pulse height above the "
                          f"baseline, for either polarity); got {threshold:g}")
        fraction = float(p.number("fraction"))
        if not 0 < fraction <= 1:
            raise p.error("fraction", f"must be a number in (0, 1]; got {fraction:g}")
        delay = p.integer("delay", f"a positive integer below {samples - 1} (the trace has "
                          f"{samples} samples)")
        if delay >= samples - 1:
            raise p.error("delay", f"must be a positive integer below {samples - 1} (the trace "
                          f"has {samples} samples); got {delay}")
        polarity = p.string("polarity", POLARITIES)
        keep = flag(p, "keep")
        how = (f"by constant-fraction discrimination (fraction {fraction:g}, delay {delay}, "
               f"{polarity} pulses above {threshold:g} over the trace's median)")
        fields = [
            new_field(p, "column", schema, field, "hits", pa.list_(pa.float64()),
                      f"tof_hits of {field.name} channel {channel}: hit times in samples {how}",
                      b"sample"),
            new_field(p, "column", schema, field, "n_hits", pa.int32(),
                      f"tof_hits of {field.name} channel {channel}: number of hits {how}", None),
        ]
        return cls(field.name, field, fields, keep, layout, channel, threshold, fraction, delay,
                   polarity == "negative")

    def compute(self, column: pa.Array) -> list[pa.Array]:
        n = len(column)
        x = traces(self.layout, column)[:, self.channel, :].astype(np.float64)
        x -= np.median(x, axis=-1, keepdims=True)
        if self.negative:
            np.negative(x, out=x)
        d = self.delay
        s = self.fraction * x[:, d:]
        s -= x[:, :-d]
        before, after = s[:, :-1], s[:, 1:]
        crossing = (before > 0) & (after <= 0)
        events, i = np.nonzero(crossing)  # row-major: events, then times, in increasing order
        step = before[events, i] / (before[events, i] - after[events, i])  # in (0, 1]
        t = i + d
        height = x[events, t] + step * (x[events, t + 1] - x[events, t])
        hit = height > self.threshold
        events, times = events[hit], t[hit] + step[hit]
        null = null_events(column)
        if null is not None:
            keep = ~null[events]
            events, times = events[keep], times[keep]
        counts = allocate((n,), np.int32)
        counts[:] = np.bincount(events, minlength=n)
        offsets = allocate((n + 1,), np.int32)
        offsets[0] = 0
        np.cumsum(counts, out=offsets[1:])
        values = allocate((len(times),), np.float64)
        values[:] = times
        validity = None
        if null is not None and null.any():
            validity = pa.array(~null, type=pa.bool_()).buffers()[1]
        hits = pa.Array.from_buffers(
            self.fields[0].type, n, [validity, pa.py_buffer(offsets)],
            children=[pa.Array.from_buffers(pa.float64(), len(values),
                                            [None, pa.py_buffer(values)])])
        return [hits, scalar_array(counts, pa.int32(), null)]
