"""peaks: find Bragg peaks in every detector frame on the server, so a crystallography client
receives a peak table of a few hundred bytes per event instead of the megabyte frame.

`{"step": "peaks", "column": C, "snr": 5.0, "min_pixels": 2, "radius": 3, "max_peaks": 512,
"keep": false}` on frames [H, W] (or [1, H, W]). Adds `C/peaks/x`, `C/peaks/y`,
`C/peaks/intensity` (list<float32>, the fields of a CXI peak table: x the column index, y the row
index, pixel centres at integers) and `C/n_peaks` (int32); the frame column is dropped unless
`keep` is true.

How, per frame:
- background and noise come from the median and the MAD (x 1.4826, a Gaussian sigma) of tiles of
  at least 16x16 pixels: robust to the peaks they contain, and local enough to follow a slowly
  varying background such as a solvent ring (a global median would see the ring as peaks);
- candidates are the pixels above tile background + snr * sigma that are 3x3 local maxima
  (compared with their 8 shifted neighbours; ties go to the first pixel in raster order, so a
  flat top gives one candidate);
- a candidate is kept when it is the brightest pixel within `radius` (one peak per spot) and at
  least `min_pixels` pixels of its (2 radius + 1)^2 window are above its local background +
  snr * sigma, the local background being the median of the two-pixel ring just outside the
  window (closer to the peak than the tile's);
- intensity is the sum of the window minus that local background; the position is the centroid
  of the window weighted by the background-subtracted values clipped at 0.
The brightest `max_peaks` of a frame are kept, brightest first. Non-finite pixels (bad pixels)
are never peaks and count as nothing in sums. A null event gives null lists and a null count.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from flight_server.buffers import allocate
from flight_server.processing.base import (
    PROCESSING,
    ArrayLayout,
    Params,
    Step,
    null_events,
    shown,
)
from schemas import metadata as md

MIN_TILE = 16  # pixels a side of the background tiles, at least
MAD_SIGMA = 1.4826  # MAD of a Gaussian times this is its sigma
INTEGER_NOISE = 1 / math.sqrt(12)  # the noise floor of integer data: quantisation
CHUNK_PIXELS = 1 << 22  # frames processed together, bounding the float32 temporaries
FIELDS = ("peaks/x", "peaks/y", "peaks/intensity", "n_peaks")


class Peaks(Step):
    name = "peaks"

    def __init__(self, column: str, input_field: pa.Field, layout: ArrayLayout,
                 fields: tuple[pa.Field, ...], keep: bool, snr: float, min_pixels: int,
                 radius: int, max_peaks: int) -> None:
        super().__init__(column, input_field, fields[-1])
        self.layout, self.fields, self.keep = layout, fields, keep
        self.snr, self.min_pixels, self.radius, self.max_peaks = snr, min_pixels, radius, max_peaks
        h, w = layout.shape[-2:]
        self.tile = max(MIN_TILE, 4 * radius + 2)
        self.floor = INTEGER_NOISE if layout.dtype.kind in "iu" else 0.0
        # window offsets (radius), and the ring just outside it (local background)
        d = np.arange(-radius, radius + 1)
        self.win_dy, self.win_dx = (a.ravel() for a in np.meshgrid(d, d, indexing="ij"))
        centre = len(self.win_dy) // 2
        self.before = np.arange(len(self.win_dy)) < centre  # ties go to the earlier pixel
        e = np.arange(-radius - 2, radius + 3)
        ry, rx = (a.ravel() for a in np.meshgrid(e, e, indexing="ij"))
        ring = np.maximum(abs(ry), abs(rx)) > radius
        self.ring_dy, self.ring_dx = ry[ring], rx[ring]
        self.pad = radius + 2
        self.shape = (h, w)

    @classmethod
    def from_params(cls, params: dict, schema: pa.Schema) -> Peaks:
        p = Params(cls.name, params, ("column",),
                   {"snr": 5.0, "min_pixels": 2, "radius": 3, "max_peaks": 512, "keep": False})
        _, field, layout = p.array_column(schema)
        if not (layout.ndim == 2 or (layout.ndim == 3 and layout.shape[0] == 1)):
            raise p.error("column", f"{shown(field.name)} has per-event shape "
                          f"{list(layout.shape)}; peaks takes frames [H, W] or [1, H, W]")
        snr = p.number("snr")
        if not (math.isfinite(snr) and snr > 0):
            raise p.error("snr", f"must be a positive number; got {shown(p.raw('snr'))}")
        radius = p.integer("radius")
        h, w = layout.shape[-2:]
        if 2 * radius + 1 > min(h, w):
            raise p.error("radius", f"must leave the window (2 radius + 1 = {2 * radius + 1}) "
                          f"within the {h}x{w} frame; got {radius}")
        window = (2 * radius + 1) ** 2
        min_pixels = p.integer("min_pixels")
        if min_pixels > window:
            raise p.error("min_pixels", f"must be at most {window}, the pixels of the window "
                          f"of radius {radius}; got {min_pixels}")
        max_peaks = p.integer("max_peaks")
        keep = p.raw("keep")
        if not isinstance(keep, bool):
            raise p.error("keep", f"must be true or false; got {shown(keep)}")
        names = [f"{field.name}/{suffix}" for suffix in FIELDS]
        taken = [n for n in names if n in schema.names]
        if taken:
            raise p.error("column", f"{shown(field.name)}: peaks would add {shown(taken[0])}, "
                          "which the input already has")
        note = (f"peaks of {field.name} (snr={snr} min_pixels={min_pixels} radius={radius} "
                f"max_peaks={max_peaks}; background and noise: median and MAD of tiles)")
        before = (field.metadata or {}).get(PROCESSING)
        history = (before + b"; " if before else b"") + note.encode()
        units = (field.metadata or {}).get(md.UNITS)
        fields = []
        for name, kind, unit in zip(names, (pa.list_(pa.float32()),) * 3 + (pa.int32(),),
                                    (b"pixel", b"pixel", units, None), strict=True):
            meta = {PROCESSING: history, **({md.UNITS: unit} if unit else {})}
            fields.append(pa.field(name, kind, True, metadata=meta))
        return cls(field.name, field, layout, tuple(fields), keep, float(snr), min_pixels,
                   radius, max_peaks)

    def transform(self, column: pa.Array, batch: pa.RecordBatch) -> pa.Array:
        raise NotImplementedError("peaks makes several columns: use apply")  # pragma: no cover

    def output_schema(self, schema: pa.Schema) -> pa.Schema:
        """The frame column replaced by the peak columns (after it, when it is kept)."""
        index = self._index(schema)
        fields = list(schema)
        fields[index:index + 1] = [*([fields[index]] if self.keep else []), *self.fields]
        return pa.schema(fields, metadata=schema.metadata)

    def apply(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        index = self._index(batch.schema)
        column = batch.column(index)
        arrays = self.find(column)
        columns = list(batch.columns)
        columns[index:index + 1] = [*([column] if self.keep else []), *arrays]
        return pa.RecordBatch.from_arrays(columns, schema=self.output_schema(batch.schema))

    def find(self, column: pa.Array) -> list[pa.Array]:
        """x, y, intensity lists and the counts of a column of frames."""
        h, w = self.shape
        frames = self.layout.view(column).reshape(len(column), h, w)
        null = null_events(column)
        step = max(1, CHUNK_PIXELS // (h * w))
        parts = [self.find_frames(frames[a:a + step], a) for a in range(0, len(frames), step)]
        if not parts:
            parts = [(np.empty(0, np.int64), *(np.empty(0, np.float32),) * 3)]
        event, x, y, intensity = (np.concatenate([part[i] for part in parts]) for i in range(4))
        if null is not None and null.any():
            keep = ~null[event]
            event, x, y, intensity = event[keep], x[keep], y[keep], intensity[keep]
        counts = np.bincount(event, minlength=len(column)).astype(np.int32)
        offsets = allocate((len(column) + 1,), np.int32)
        offsets[0] = 0
        np.cumsum(counts, out=offsets[1:])
        validity = pa.array(~null).buffers()[1] if null is not None and null.any() else None
        lists = []
        for values in (x, y, intensity):
            out = allocate((len(values),), np.float32)
            out[:] = values
            flat = pa.Array.from_buffers(pa.float32(), len(out), [None, pa.py_buffer(out)])
            lists.append(pa.Array.from_buffers(pa.list_(pa.float32()), len(column),
                                               [validity, pa.py_buffer(offsets)],
                                               children=[flat]))
        n = allocate((len(column),), np.int32)
        n[:] = counts
        n_peaks = pa.Array.from_buffers(pa.int32(), len(n), [validity, pa.py_buffer(n)])
        return [*lists, n_peaks]

    def find_frames(self, frames: np.ndarray, first: int) -> tuple[np.ndarray, ...]:
        """(event, x, y, intensity) of the peaks of some frames, brightest first per event."""
        n, (h, w), pad = len(frames), self.shape, self.pad
        padded = np.full((n, h + 2 * pad, w + 2 * pad), -np.inf, np.float32)
        f = padded[:, pad:pad + h, pad:pad + w]
        f[...] = frames
        if frames.dtype.kind == "f":
            f[~np.isfinite(f)] = -np.inf  # bad pixels: never a peak, nothing in sums
        bg, sigma = self.tile_stats(f)
        threshold = bg + np.float32(self.snr) * sigma
        ty = np.minimum(np.arange(h) // self.tile_size(h), threshold.shape[1] - 1)
        tx = np.minimum(np.arange(w) // self.tile_size(w), threshold.shape[2] - 1)
        e, yy, xx = np.nonzero(f > threshold[:, ty[:, None], tx[None, :]])
        value = f[e, yy, xx]
        local_max = np.ones(len(e), bool)
        for dy in (-1, 0, 1):  # 3x3 local maxima; ties go to the earlier pixel in raster order
            for dx in (-1, 0, 1):
                if dy or dx:
                    nb = padded[e, yy + pad + dy, xx + pad + dx]
                    local_max &= (value > nb) if (dy, dx) < (0, 0) else (value >= nb)
        e, yy, xx = e[local_max], yy[local_max], xx[local_max]
        empty = np.empty(0, np.float32)
        if not len(e):
            return np.empty(0, np.int64), empty, empty, empty
        win = padded[e[:, None], (yy + pad)[:, None] + self.win_dy,
                     (xx + pad)[:, None] + self.win_dx]
        centre = win[:, len(self.win_dy) // 2]
        top = np.where(self.before, centre[:, None] > win, centre[:, None] >= win).all(axis=1)
        e, yy, xx, win = e[top], yy[top], xx[top], win[top]
        ring = padded[e[:, None], (yy + pad)[:, None] + self.ring_dy,
                      (xx + pad)[:, None] + self.ring_dx]
        ring = np.where(np.isfinite(ring), ring, np.nan)
        with np.errstate(all="ignore"):
            local = np.nanmedian(ring, axis=1) if len(ring) else np.empty(0, np.float32)
        local = np.where(np.isnan(local), bg[e, ty[yy], tx[xx]], local).astype(np.float32)
        level = local + np.float32(self.snr) * sigma[e, ty[yy], tx[xx]]
        valid = np.isfinite(win)
        enough = ((win > level[:, None]) & valid).sum(axis=1) >= self.min_pixels
        e, yy, xx, win, valid, local = (a[enough] for a in (e, yy, xx, win, valid, local))
        signal = np.where(valid, win - local[:, None], 0).astype(np.float32)
        intensity = signal.sum(axis=1)
        weight = np.maximum(signal, 0)
        total = weight.sum(axis=1)
        x = xx + (weight @ self.win_dx.astype(np.float32)) / total
        y = yy + (weight @ self.win_dy.astype(np.float32)) / total
        order = np.lexsort((-intensity, e))  # by event, brightest first
        e, x, y, intensity = e[order], x[order], y[order], intensity[order]
        starts = np.searchsorted(e, e, side="left")
        kept = np.arange(len(e)) - starts < self.max_peaks
        return (e[kept] + first, x[kept].astype(np.float32), y[kept].astype(np.float32),
                intensity[kept])

    def tile_size(self, size: int) -> int:
        """Tiles of at least `self.tile` a side dividing most of the axis; the rest of the axis
        belongs to the last tile."""
        return size // max(1, size // self.tile)

    def tile_stats(self, f: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-tile median and robust sigma (n, tiles_y, tiles_x), float32."""
        n, h, w = f.shape
        th, tw = self.tile_size(h), self.tile_size(w)
        ny, nx = h // th, w // tw
        tiles = (f[:, :ny * th, :nx * tw].reshape(n, ny, th, nx, tw).transpose(0, 1, 3, 2, 4)
                 .reshape(n, ny, nx, th * tw))
        median = np.median(tiles, axis=-1, keepdims=True)
        with np.errstate(invalid="ignore"):
            mad = np.median(np.abs(tiles - median), axis=-1)
        median = median[..., 0]
        median = np.where(np.isfinite(median), median, 0)  # a tile of mostly bad pixels
        sigma = np.where(np.isfinite(mad), np.maximum(mad * MAD_SIGMA, self.floor), np.inf)
        return median.astype(np.float32), sigma.astype(np.float32)

