"""Processing steps compute what plain numpy computes on the same data, say what they did in the
field metadata, pass untouched columns through without a copy, and refuse bad requests with a
message that names the step and the parameter."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pytest

from flight_server.processing import DTYPE, PROCESSING, STEPS, StepError, build_pipeline
from schemas import metadata as md
from tests.helpers import ENERGY, IMAGE, WAVES, note, run_steps, tensor_batch, values

CXI_FRAME, PEAKS = "entry_1/data_1/data", "entry_1/result_1/peakTotalIntensity"


# -- roi ---------------------------------------------------------------------------------------


def test_roi_crops_the_last_two_axes(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "roi", "column": IMAGE, "y": [10, 50], "x": [0, 64]})
    frames = lcls2.column(IMAGE).to_numpy_ndarray()
    got = out.column(IMAGE)
    assert got.type == pa.fixed_shape_tensor(pa.uint16(), [1, 40, 64])
    np.testing.assert_array_equal(got.to_numpy_ndarray(), frames[:, :, 10:50, 0:64])
    meta = out.schema.field(IMAGE).metadata
    assert meta[PROCESSING] == b"roi y=[10,50] x=[0,64]"
    assert meta[md.HDF5_PATH] == b"/pnccd/image" and meta[md.UNITS] == b"ADU"


def test_roi_one_axis_keeps_the_other(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "roi", "column": WAVES, "x": [100, 356]})
    waves = lcls2.column(WAVES).to_numpy_ndarray()
    assert out.column(WAVES).type == pa.fixed_shape_tensor(pa.float32(), [2, 256])
    np.testing.assert_array_equal(out.column(WAVES).to_numpy_ndarray(), waves[:, :, 100:356])
    assert note(out, WAVES) == "roi y=[0,2] x=[100,356]"


def test_roi_of_a_1d_column(cxi: pa.RecordBatch) -> None:
    out = run_steps(cxi, {"step": "roi", "column": PEAKS, "x": [0, 32]})
    assert out.column(PEAKS).type == pa.list_(pa.float32(), 32)
    np.testing.assert_array_equal(values(out.column(PEAKS)), values(cxi.column(PEAKS))[:, :32])
    assert note(out, PEAKS) == "roi x=[0,32]"


def test_roi_of_booleans() -> None:
    mask = np.random.default_rng(1).random((5, 6, 8)) > 0.5
    out = run_steps(tensor_batch(mask), {"step": "roi", "column": "img", "y": [1, 4]})
    assert out.column("img").type == pa.fixed_shape_tensor(pa.bool_(), [3, 8])
    np.testing.assert_array_equal(values(out.column("img")), mask[:, 1:4, :])
    out = run_steps(tensor_batch(mask), {"step": "pad", "column": "img", "height": 8,
                                         "width": 8, "value": True})
    expected = np.ones((5, 1, 8, 8), bool)
    expected[:, 0, 1:7, :] = mask
    np.testing.assert_array_equal(values(out.column("img")), expected)
    with pytest.raises(StepError, match=r"^threshold: 'column' \"img\" holds bool values; "
                                        "threshold works on numbers"):
        build_pipeline([{"step": "threshold", "column": "img", "below": 1}],
                       tensor_batch(mask).schema)


# -- bin ---------------------------------------------------------------------------------------


def test_bin_sum_widens_integers(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "bin", "column": IMAGE, "factor": 2, "reduce": "sum"})
    frames = lcls2.column(IMAGE).to_numpy_ndarray()
    expected = frames.astype(np.uint64).reshape(-1, 1, 64, 2, 64, 2).sum(axis=(3, 5))
    got = out.column(IMAGE)
    assert got.type == pa.fixed_shape_tensor(pa.uint32(), [1, 64, 64])
    np.testing.assert_array_equal(got.to_numpy_ndarray(), expected)
    assert note(out, IMAGE) == "bin 2x2 sum (uint16->uint32 so that no sum can overflow)"


def test_bin_sum_cannot_overflow() -> None:
    full = np.full((2, 4, 4), 65535, np.uint16)
    out = run_steps(tensor_batch(full), {"step": "bin", "column": "img", "factor": [2, 4],
                                         "reduce": "sum"})
    np.testing.assert_array_equal(values(out.column("img")), np.full((2, 2, 1), 8 * 65535))
    small = np.full((2, 4, 4), 255, np.uint8)  # uint8 x 4 fits uint16: the narrowest that holds
    out = run_steps(tensor_batch(small), {"step": "bin", "column": "img", "factor": 2,
                                          "reduce": "sum"})
    assert out.column("img").type.value_type == pa.uint16()
    np.testing.assert_array_equal(values(out.column("img")), np.full((2, 2, 2), 1020))
    half = np.full((1, 2, 2), 60000, np.float16)  # float16 sums would overflow to inf
    out = run_steps(tensor_batch(half), {"step": "bin", "column": "img", "factor": 2,
                                         "reduce": "sum"})
    assert out.column("img").type.value_type == pa.float32()
    assert values(out.column("img"))[0, 0, 0] == 240000


def test_bin_mean_is_float32(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "bin", "column": IMAGE, "factor": [4, 2], "reduce": "mean"})
    frames = lcls2.column(IMAGE).to_numpy_ndarray()
    expected = frames.reshape(-1, 1, 32, 4, 64, 2).mean(axis=(3, 5)).astype(np.float32)
    got = out.column(IMAGE)
    assert got.type == pa.fixed_shape_tensor(pa.float32(), [1, 32, 64])
    np.testing.assert_array_equal(got.to_numpy_ndarray(), expected)
    assert note(out, IMAGE) == "bin 4x2 mean (uint16->float32)"


def test_bin_waveforms_and_1d_columns(lcls2: pa.RecordBatch, cxi: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "bin", "column": WAVES, "factor": [1, 8], "reduce": "mean"})
    waves = lcls2.column(WAVES).to_numpy_ndarray()
    np.testing.assert_allclose(out.column(WAVES).to_numpy_ndarray(),
                               waves.reshape(-1, 2, 128, 8).mean(axis=3), rtol=1e-6)
    assert note(out, WAVES) == "bin 1x8 mean"  # float32 stays float32: nothing to say
    out = run_steps(cxi, {"step": "bin", "column": PEAKS, "factor": 4, "reduce": "sum"})
    assert out.column(PEAKS).type == pa.list_(pa.float32(), 16)
    np.testing.assert_allclose(values(out.column(PEAKS)),
                               values(cxi.column(PEAKS)).reshape(-1, 16, 4).sum(axis=2),
                               rtol=1e-6)


# -- threshold ---------------------------------------------------------------------------------


def test_threshold_integers(lcls2: pa.RecordBatch) -> None:
    frames = lcls2.column(IMAGE).to_numpy_ndarray()
    level = int(np.median(frames))
    out = run_steps(lcls2, {"step": "threshold", "column": IMAGE, "below": level})
    assert out.column(IMAGE).type == lcls2.column(IMAGE).type
    np.testing.assert_array_equal(out.column(IMAGE).to_numpy_ndarray(),
                                  np.where(frames < level, 0, frames))
    assert note(out, IMAGE) == f"threshold below {level} -> 0"
    # a fractional level on integers: 10.5 replaces 10 and keeps 11
    out = run_steps(lcls2, {"step": "threshold", "column": IMAGE, "below": level + 0.5,
                            "value": 7})
    np.testing.assert_array_equal(out.column(IMAGE).to_numpy_ndarray(),
                                  np.where(frames <= level, 7, frames))
    # levels beyond the type's range: everything, or nothing, is below
    out = run_steps(lcls2, {"step": "threshold", "column": IMAGE, "below": 1e9, "value": 3})
    assert (out.column(IMAGE).to_numpy_ndarray() == 3).all()
    out = run_steps(lcls2, {"step": "threshold", "column": IMAGE, "below": -5})
    np.testing.assert_array_equal(out.column(IMAGE).to_numpy_ndarray(), frames)


def test_threshold_above_blanks_overloads_and_masked_pixels(lcls2: pa.RecordBatch) -> None:
    frames = lcls2.column(IMAGE).to_numpy_ndarray()
    low, high = (int(v) for v in np.percentile(frames, [20, 80]))
    out = run_steps(lcls2, {"step": "threshold", "column": IMAGE, "above": high})
    np.testing.assert_array_equal(out.column(IMAGE).to_numpy_ndarray(),
                                  np.where(frames > high, 0, frames))
    assert note(out, IMAGE) == f"threshold above {high} -> 0"
    # both levels; a fractional `above` on integers: 10.5 replaces 11 and keeps 10
    out = run_steps(lcls2, {"step": "threshold", "column": IMAGE, "below": low,
                            "above": high + 0.5, "value": 1})
    np.testing.assert_array_equal(out.column(IMAGE).to_numpy_ndarray(),
                                  np.where((frames < low) | (frames > high), 1, frames))
    # floats: exact, NaN untouched; levels past the type's range
    waves = lcls2.column(WAVES).to_numpy_ndarray()
    level = float(np.median(waves)) + 1e-12
    out = run_steps(lcls2, {"step": "threshold", "column": WAVES, "above": level})
    np.testing.assert_array_equal(out.column(WAVES).to_numpy_ndarray(),
                                  np.where(waves.astype(np.float64) > level, 0, waves))
    out = run_steps(lcls2, {"step": "threshold", "column": IMAGE, "above": 1e9})
    np.testing.assert_array_equal(out.column(IMAGE).to_numpy_ndarray(), frames)
    out = run_steps(lcls2, {"step": "threshold", "column": IMAGE, "above": -1, "value": 2})
    assert (out.column(IMAGE).to_numpy_ndarray() == 2).all()


@pytest.mark.parametrize("params, message", [
    ({}, "give 'below', 'above' or both"),
    ({"below": 10, "above": 5}, "'above' (5) is less than 'below' (10)"),
])
def test_threshold_levels_are_checked(lcls2: pa.RecordBatch, params: dict, message: str) -> None:
    with pytest.raises(StepError, match=re.escape(message)):
        build_pipeline([{"step": "threshold", "column": IMAGE, **params}], lcls2.schema)


def test_threshold_floats_compare_exactly(lcls2: pa.RecordBatch) -> None:
    waves = lcls2.column(WAVES).to_numpy_ndarray()
    out = run_steps(lcls2, {"step": "threshold", "column": WAVES, "below": 0.01, "value": -1})
    np.testing.assert_array_equal(out.column(WAVES).to_numpy_ndarray(),
                                  np.where(waves < 0.01, np.float32(-1), waves))
    # float16(0.1) is 0.0999755859375: below 0.1, though equal to 0.1 rounded to float16
    half = np.array([[[0.1, 0.2], [np.nan, -1]]], np.float16)
    out = run_steps(tensor_batch(half), {"step": "threshold", "column": "img", "below": 0.1})
    np.testing.assert_array_equal(values(out.column("img")),
                                  np.array([[[0, 0.2], [np.nan, 0]]], np.float16))


# -- normalize ---------------------------------------------------------------------------------


def test_normalize_by_pulse_energy(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "normalize", "column": WAVES, "by": ENERGY})
    energy = lcls2.column(ENERGY)
    assert energy.null_count > 0, "the test run should have missing pulse energies"
    missing = energy.is_null().to_numpy(zero_copy_only=False)
    got = out.column(WAVES)
    assert got.type == pa.fixed_shape_tensor(pa.float32(), [2, 1024])
    np.testing.assert_array_equal(got.is_null().to_numpy(zero_copy_only=False), missing)
    waves = lcls2.column(WAVES).to_numpy_ndarray()
    d = energy.to_numpy(zero_copy_only=False)
    expected = (waves / d[:, None, None]).astype(np.float32)
    np.testing.assert_array_equal(values(got)[~missing], expected[~missing])
    meta = out.schema.field(WAVES).metadata
    assert meta[md.UNITS] == b"V/mJ"
    assert meta[PROCESSING].startswith(b"normalize by gmd/energy (float32->float32; null where")


def test_normalize_integers_and_bad_divisors() -> None:
    frames = np.arange(5 * 2 * 2, dtype=np.uint16).reshape(5, 2, 2)
    by = [2.0, 0.0, float("nan"), None, 4.0]
    out = run_steps(tensor_batch(frames, null=[False] * 4 + [True], i0=by),
                    {"step": "normalize", "column": "img", "by": "i0"})
    got = out.column("img")
    assert got.type.value_type == pa.float32()
    # zero, NaN and null divisors give null events; a null event stays null
    assert got.is_null().to_pylist() == [False, True, True, True, True]
    np.testing.assert_array_equal(values(got)[0], frames[0] / np.float32(2))


# -- cast --------------------------------------------------------------------------------------


@pytest.mark.parametrize("to", ["float16", "float32", "float64", "int32", "uint32", "int64"])
def test_cast_frames(lcls2: pa.RecordBatch, to: str) -> None:
    out = run_steps(lcls2, {"step": "cast", "column": IMAGE, "to": to})
    frames = lcls2.column(IMAGE).to_numpy_ndarray()
    got = out.column(IMAGE)
    assert got.type == pa.fixed_shape_tensor(pa.from_numpy_dtype(np.dtype(to)), [1, 128, 128])
    np.testing.assert_array_equal(got.to_numpy_ndarray(), frames.astype(to))
    assert note(out, IMAGE) == f"cast uint16->{to}"


def test_cast_saturates_and_rounds() -> None:
    ints = np.array([[0, 255, 256, 65535]], np.uint16)
    out = run_steps(tensor_batch(ints[:, None, :]), {"step": "cast", "column": "img",
                                                     "to": "uint8"})
    assert values(out.column("img")).tolist() == [[[0, 255, 255, 255]]]
    assert note(out, "img") == "cast uint16->uint8 (saturating)"
    floats = np.array([[[0.5, 1.5, -2.7, 1e10, -1e10, np.nan, np.inf, -np.inf]]], np.float32)
    out = run_steps(tensor_batch(floats), {"step": "cast", "column": "img", "to": "int16"})
    assert values(out.column("img")).tolist() == [[[0, 2, -3, 32767, -32768, 0, 32767, -32768]]]
    out = run_steps(tensor_batch(floats), {"step": "cast", "column": "img", "to": "int64"})
    top = np.iinfo(np.int64).max
    got = values(out.column("img"))[0, 0]
    assert got[3] == 10**10 and got[6] > top - 2048 and got[7] == np.iinfo(np.int64).min
    out = run_steps(tensor_batch(floats), {"step": "cast", "column": "img", "to": "uint8"})
    assert values(out.column("img")).tolist() == [[[0, 2, 0, 255, 0, 0, 255, 0]]]


def test_cast_bfloat16_rounds_to_nearest_even() -> None:
    one = 1.0
    ulp = 2.0**-7  # bfloat16 keeps 7 fraction bits
    cases = {  # value -> expected bit pattern
        1.0: 0x3F80, -2.0: 0xC000, 0.0: 0x0000, np.inf: 0x7F80, -np.inf: 0xFF80,
        one + ulp / 2: 0x3F80,  # tie: down to the even pattern
        one + 3 * ulp / 2: 0x3F82,  # tie: up to the even pattern
        one + ulp / 2 + 2.0**-20: 0x3F81,  # just past the tie
        3.4e38: 0x7F80,  # rounds beyond bfloat16's largest: inf
    }
    data = np.array([[list(cases) + [np.nan]]], np.float32)
    out = run_steps(tensor_batch(data), {"step": "cast", "column": "img", "to": "bfloat16"})
    field = out.schema.field("img")
    assert field.type.value_type == pa.uint16() and field.metadata[DTYPE] == b"bfloat16"
    assert note(out, "img").startswith("cast float32->bfloat16 (stored as uint16 bit patterns")
    bits = values(out.column("img"))[0, 0]
    assert [int(b) for b in bits[:-1]] == list(cases.values())
    assert bits[-1] & 0x7F80 == 0x7F80 and bits[-1] & 0x7F  # NaN stays NaN


def test_cast_bfloat16_against_exact_rounding(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "cast", "column": WAVES, "to": "bfloat16"})
    x = lcls2.column(WAVES).to_numpy_ndarray().reshape(-1).astype(np.float64)
    bits = values(out.column(WAVES)).reshape(-1).astype(np.uint32)
    down = ((x.astype(np.float32).view(np.uint32) >> 16) << 16).view(np.float32)  # truncated
    got = (bits << 16).view(np.float32).astype(np.float64)
    mag = np.abs(down)
    step = (np.nextafter(mag, np.float32(np.inf)) - mag).astype(np.float64) * 65536
    up = np.where(np.signbit(down), down - step, down + step)  # the next one away from zero
    err, err_other = np.abs(got - x), np.minimum(np.abs(down - x), np.abs(up - x))
    assert (err <= err_other).all()  # nearest of the two candidates
    ties = np.abs(down - x) == np.abs(up - x)
    assert (bits[ties] & 1 == 0).all()  # ties go to the even pattern
    # and back: bfloat16 -> float32 is exact, roi and pad keep it bfloat16
    out = run_steps(out, {"step": "roi", "column": WAVES, "x": [0, 512]},
                    {"step": "pad", "column": WAVES, "height": 4, "width": 512, "value": 1.0},
                    {"step": "cast", "column": WAVES, "to": "float32"})
    back = out.column(WAVES).to_numpy_ndarray()
    np.testing.assert_array_equal(back[:, 0, 1:3], got.reshape(-1, 2, 1024)[:, :, :512])
    assert (back[:, 0, [0, 3]] == 1.0).all()
    assert DTYPE not in out.schema.field(WAVES).metadata
    assert note(out, WAVES).endswith("; cast bfloat16->float32")


def test_cast_to_the_same_type_is_free(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "cast", "column": IMAGE, "to": "uint16"})
    assert out.column(IMAGE).storage.values.buffers()[1].address == \
        lcls2.column(IMAGE).storage.values.buffers()[1].address
    assert note(out, IMAGE) == "cast uint16->uint16 (unchanged)"


# -- pad ---------------------------------------------------------------------------------------


def test_pad_2d_frames_gain_a_channel(cxi: pa.RecordBatch) -> None:
    out = run_steps(cxi, {"step": "pad", "column": CXI_FRAME, "height": 131, "width": 125,
                          "value": -1})
    frames = cxi.column(CXI_FRAME).to_numpy_ndarray()
    expected = np.full((len(frames), 1, 131, 125), -1, np.float32)
    expected[:, 0, 1:129, :] = frames[:, :, 1:126]  # pad 3 rows: 1 above, 2 below; crop 3 cols
    got = out.column(CXI_FRAME)
    assert got.type == pa.fixed_shape_tensor(pa.float32(), [1, 131, 125])
    np.testing.assert_array_equal(got.to_numpy_ndarray(), expected)
    assert note(out, CXI_FRAME) == "pad to [1,131,125] centred (from [128, 128]; fill -1)"


def test_pad_3d_keeps_channels(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "pad", "column": WAVES, "height": 4, "width": 1000})
    waves = lcls2.column(WAVES).to_numpy_ndarray()  # [2, 1024] is a 2-D frame: C = 1
    expected = np.zeros((len(waves), 1, 4, 1000), np.float32)
    expected[:, 0, 1:3, :] = waves[:, :, 12:1012]
    np.testing.assert_array_equal(out.column(WAVES).to_numpy_ndarray(), expected)
    out = run_steps(lcls2, {"step": "pad", "column": IMAGE, "height": 256, "width": 256})
    frames = lcls2.column(IMAGE).to_numpy_ndarray()
    expected = np.zeros((len(frames), 1, 256, 256), np.uint16)
    expected[:, :, 64:192, 64:192] = frames
    assert out.column(IMAGE).type == pa.fixed_shape_tensor(pa.uint16(), [1, 256, 256])
    np.testing.assert_array_equal(out.column(IMAGE).to_numpy_ndarray(), expected)


# -- pipelines ---------------------------------------------------------------------------------


def test_chain_roi_bin_cast_pad(lcls2: pa.RecordBatch) -> None:
    steps = [
        {"step": "roi", "column": IMAGE, "y": [10, 50], "x": [0, 64]},
        {"step": "bin", "column": IMAGE, "factor": 2, "reduce": "mean"},
        {"step": "cast", "column": IMAGE, "to": "float16"},
        {"step": "pad", "column": IMAGE, "height": 32, "width": 32},
    ]
    pipeline = build_pipeline(steps, lcls2.schema)
    assert [type(s) for s in pipeline.steps] == [STEPS[s["step"]] for s in steps]
    assert pipeline.schema.field(IMAGE).type == pa.fixed_shape_tensor(pa.float16(), [1, 32, 32])
    out = pipeline.apply(lcls2)
    assert out.schema.equals(pipeline.schema, check_metadata=True)
    assert out.schema.metadata == lcls2.schema.metadata
    frames = lcls2.column(IMAGE).to_numpy_ndarray()[:, :, 10:50, 0:64]
    binned = frames.reshape(-1, 1, 20, 2, 32, 2).mean(axis=(3, 5)).astype(np.float32)
    expected = np.zeros((len(frames), 1, 32, 32), np.float16)
    expected[:, :, 6:26, :] = binned.astype(np.float16)
    np.testing.assert_array_equal(out.column(IMAGE).to_numpy_ndarray(), expected)
    assert note(out, IMAGE) == ("roi y=[10,50] x=[0,64]; bin 2x2 mean (uint16->float32); "
                                "cast float32->float16; pad to [1,32,32] centred (from "
                                "[1, 20, 32]; fill 0)")
    assert out.schema.field(IMAGE).metadata[md.HDF5_PATH] == b"/pnccd/image"


def test_untouched_columns_are_not_copied(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "bin", "column": IMAGE, "factor": 4, "reduce": "sum"},
                    {"step": "normalize", "column": WAVES, "by": ENERGY})
    for name in lcls2.schema.names:
        if name in (IMAGE, WAVES):
            continue
        before, after = lcls2.column(name), out.column(name)
        assert after.equals(before)
        for a, b in zip(before.buffers(), after.buffers(), strict=True):
            assert (a is None and b is None) or a.address == b.address, name
        assert out.schema.field(name).metadata == lcls2.schema.field(name).metadata


def test_sliced_batches_and_no_events(lcls2: pa.RecordBatch) -> None:
    steps = [{"step": "roi", "column": IMAGE, "y": [0, 64], "x": [32, 96]},
             {"step": "normalize", "column": WAVES, "by": ENERGY}]
    whole = run_steps(lcls2, *steps)
    part = run_steps(lcls2.slice(17, 40), *steps)
    assert part.equals(whole.slice(17, 40))
    empty = run_steps(lcls2.slice(0, 0), *steps)
    assert empty.num_rows == 0 and empty.schema == whole.schema


def test_null_events_stay_null() -> None:
    frames = np.arange(3 * 4 * 4, dtype=np.int16).reshape(3, 4, 4)
    batch = tensor_batch(frames, null=[False, True, False])
    for step in ({"step": "roi", "column": "img", "x": [1, 3]},
                 {"step": "bin", "column": "img", "factor": 2, "reduce": "sum"},
                 {"step": "threshold", "column": "img", "below": 5},
                 {"step": "cast", "column": "img", "to": "bfloat16"},
                 {"step": "pad", "column": "img", "height": 6, "width": 2}):
        out = run_steps(batch, step)
        assert out.column("img").is_null().to_pylist() == [False, True, False], step["step"]


def test_no_steps_is_the_identity(lcls2: pa.RecordBatch) -> None:
    pipeline = build_pipeline([], lcls2.schema)
    assert pipeline.schema.equals(lcls2.schema, check_metadata=True)
    assert pipeline.apply(lcls2) is lcls2


def test_a_batch_of_another_schema_is_refused(lcls2: pa.RecordBatch, cxi: pa.RecordBatch) -> None:
    pipeline = build_pipeline([{"step": "bin", "column": IMAGE, "factor": 2, "reduce": "sum"}],
                              lcls2.schema)
    with pytest.raises(StepError, match="not the extension<arrow.fixed_shape_tensor"):
        pipeline.apply(cxi)


# -- errors ------------------------------------------------------------------------------------

BAD = [
    # the request's shape
    ({"step": "rio"}, 'unknown processing step "rio"; the steps are \'roi\', \'bin\', '
                      "'threshold', 'normalize', 'cast', 'pad', 'tof_integrate', 'tof_hits', "
                      "'peaks', 'hits'. Did you mean 'roi'?"),
    ({"column": IMAGE}, 'a processing step must be an object with "step"'),
    ("roi", 'a processing step must be an object with "step"'),
    ({"step": "bin", "column": IMAGE, "factr": 2, "reduce": "sum"},
     "bin: unknown parameter 'factr'; bin takes 'column', 'factor', 'reduce'. Did you mean "
     "'factor'?"),
    ({"step": "bin", "column": IMAGE}, "bin: missing parameters 'factor', 'reduce' (required: "
                                       "'column', 'factor', 'reduce')"),
    ({"step": "roi", "column": "pnccd/imag", "x": [0, 1]},
     "roi: 'column' \"pnccd/imag\" is not a column of the input. Did you mean 'pnccd/image'?"),
    ({"step": "roi", "column": 3, "x": [0, 1]}, "roi: 'column' must be a string; got 3"),
    # wrong kinds of column
    ({"step": "roi", "column": ENERGY, "x": [0, 1]},
     "roi: 'column' \"gmd/energy\" is a scalar (double) column, but roi works on per-event "
     "arrays"),
    ({"step": "bin", "column": "peaks/var_x", "factor": 2, "reduce": "sum"},
     "bin: 'column' \"peaks/var_x\" is a variable-length list (list<item: float>) column"),
    ({"step": "pad", "column": ENERGY, "height": 2, "width": 2}, "pad: 'column' \"gmd/energy\" "
                                                                 "is a scalar"),
    ({"step": "normalize", "column": WAVES, "by": IMAGE},
     "normalize: 'by' \"pnccd/image\" is a per-event array (fixed_shape_tensor of uint16, shape "
     "[1, 128, 128]) column, but normalize divides by a numeric scalar column"),
    ({"step": "normalize", "column": WAVES, "by": "time"},
     "normalize: 'by' \"time\" is a scalar (timestamp[ns, tz=UTC]) column, but normalize"),
    ({"step": "normalize", "column": WAVES, "by": "nope"},
     "normalize: 'by' \"nope\" is not a column of the input"),
    # roi
    ({"step": "roi", "column": IMAGE, "y": [0, 500]},
     "roi: 'y' must be [start, stop] with 0 <= start < stop <= 128 (the frame's height); got "
     "[0, 500]"),
    ({"step": "roi", "column": IMAGE, "x": [64, 64]},
     "roi: 'x' must be [start, stop] with 0 <= start < stop <= 128 (the frame's width); got "
     "[64, 64]"),
    ({"step": "roi", "column": IMAGE, "x": [-1, 5]}, "roi: 'x' must be [start, stop]"),
    ({"step": "roi", "column": IMAGE, "x": "0:5"}, "roi: 'x' must be [start, stop]"),
    ({"step": "roi", "column": IMAGE, "x": [0.0, 5]}, "roi: 'x' must be [start, stop]"),
    ({"step": "roi", "column": IMAGE}, "roi: 'x' or 'y' is needed"),
    # bin
    ({"step": "bin", "column": IMAGE, "factor": 0, "reduce": "sum"},
     "bin: 'factor' must be a positive integer k (k x k bins) or [ky, kx] of positive integers; "
     "got 0"),
    ({"step": "bin", "column": IMAGE, "factor": [2, 0], "reduce": "sum"},
     "bin: 'factor' must be a positive integer k"),
    ({"step": "bin", "column": IMAGE, "factor": "2", "reduce": "sum"},
     "bin: 'factor' must be a positive integer k"),
    ({"step": "bin", "column": IMAGE, "factor": True, "reduce": "sum"},
     "bin: 'factor' must be a positive integer k"),
    ({"step": "bin", "column": IMAGE, "factor": 3, "reduce": "sum"},
     "bin: 'factor' must divide 128 (the frame's height) exactly; got 3"),
    ({"step": "bin", "column": WAVES, "factor": [1, 3], "reduce": "sum"},
     "bin: 'factor' must divide 1024 (the frame's width) exactly; got [1, 3]"),
    ({"step": "bin", "column": IMAGE, "factor": 2, "reduce": "max"},
     "bin: 'reduce' must be one of 'sum', 'mean'; got \"max\""),
    # threshold
    ({"step": "threshold", "column": IMAGE, "below": "10"},
     "threshold: 'below' must be a number; got \"10\""),
    ({"step": "threshold", "column": IMAGE, "below": 10, "value": -1},
     "threshold: 'value' must be an integer from 0 to 65535 (the column is uint16); got -1"),
    ({"step": "threshold", "column": IMAGE, "below": 10, "value": 0.5},
     "threshold: 'value' must be an integer from 0 to 65535"),
    # cast
    ({"step": "cast", "column": IMAGE, "to": "bfloat15"},
     "cast: 'to' must be one of 'float16', 'float32', 'float64', 'bfloat16', 'int8', 'int16', "
     "'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64'; got \"bfloat15\". Did you mean "
     "'bfloat16'"),
    ({"step": "cast", "column": IMAGE, "to": "double"}, "cast: 'to' must be one of"),
    # pad
    ({"step": "pad", "column": IMAGE, "height": -4, "width": 8},
     "pad: 'height' must be a positive integer up to 32768; got -4"),
    ({"step": "pad", "column": IMAGE, "height": 8, "width": 0},
     "pad: 'width' must be a positive integer up to 32768; got 0"),
    ({"step": "pad", "column": IMAGE, "height": 8, "width": 8, "value": 70000},
     "pad: 'value' must be an integer from 0 to 65535 (the column is uint16); got 70000"),
]


@pytest.mark.parametrize(("step", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_steps(lcls2: pa.RecordBatch, step: dict, message: str) -> None:
    with pytest.raises(StepError) as info:
        build_pipeline([step], lcls2.schema)
    assert str(info.value).startswith(message)


def test_bad_steps_on_other_kinds(cxi: pa.RecordBatch) -> None:
    with pytest.raises(StepError, match=r"^roi: 'y' does not apply to a 1-D column "
                                        r"\(fixed_size_list<item: float>\[64\]\); crop it"):
        build_pipeline([{"step": "roi", "column": PEAKS, "y": [0, 1]}], cxi.schema)
    with pytest.raises(StepError, match=r"^bin: 'factor' must be a positive integer \(the "
                                        r"column is 1-D\); got \[2, 2\]"):
        build_pipeline([{"step": "bin", "column": PEAKS, "factor": [2, 2], "reduce": "sum"}],
                       cxi.schema)
    with pytest.raises(StepError, match=r"^pad: 'column' \"entry_1/result_1/peakTotalIntensity"
                                        r"\" has per-event shape \[64\]; pad takes frames"):
        build_pipeline([{"step": "pad", "column": PEAKS, "height": 8, "width": 8}], cxi.schema)
    with pytest.raises(StepError, match=r"^pad: 'value' is beyond the range of float16 \(the "
                                        r"column's type\); got 100000 \(step 2 of 2\)$"):
        build_pipeline([{"step": "cast", "column": CXI_FRAME, "to": "float16"},
                        {"step": "pad", "column": CXI_FRAME, "height": 8, "width": 8,
                         "value": 100000}], cxi.schema)
    bf16 = [{"step": "cast", "column": CXI_FRAME, "to": "bfloat16"}]
    for step in ({"step": "bin", "column": CXI_FRAME, "factor": 2, "reduce": "sum"},
                 {"step": "threshold", "column": CXI_FRAME, "below": 1},
                 {"step": "normalize", "column": CXI_FRAME, "by": "LCLS/photon_energy_eV"}):
        with pytest.raises(StepError, match=rf"^{step['step']}: 'column' .* holds bfloat16 "
                                            r"values \(stored as uint16 bit patterns\); cast it"):
            build_pipeline([*bf16, step], cxi.schema)


def test_errors_in_a_chain_say_which_step(lcls2: pa.RecordBatch) -> None:
    steps = [{"step": "roi", "column": IMAGE, "y": [0, 100]},
             {"step": "bin", "column": IMAGE, "factor": 8, "reduce": "sum"}]  # 100 % 8 != 0
    with pytest.raises(StepError, match=r"^bin: 'factor' must divide 100 \(the frame's height\) "
                                        r"exactly; got 8 \(step 2 of 2\)$"):
        build_pipeline(steps, lcls2.schema)
    with pytest.raises(StepError, match="processing steps must be a list"):
        build_pipeline({"step": "roi"}, lcls2.schema)  # type: ignore[arg-type]


def test_step_errors_are_invalid_arguments() -> None:
    # a ValueError for Python callers, ArrowInvalid so Flight answers INVALID_ARGUMENT
    assert issubclass(StepError, ValueError) and issubclass(StepError, pa.ArrowInvalid)
