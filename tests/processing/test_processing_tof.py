"""The TOF steps reduce traces to what numpy computes from them (window yields) or to the
constant-fraction times of known pulses, place their new columns where the trace was, say what
they did in the field metadata, and refuse bad requests naming the step and the parameter."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from flight_server.processing import PROCESSING, StepError, build_pipeline
from schemas import metadata as md
from tests.helpers import WAVES, note, run_steps, tensor_batch, values

SIGMA, BASELINE, NOISE = 3.0, 0.005, 0.0005
CENTRES, HEIGHTS = (100.3, 250.7, 400.1, 470.0), (0.1, 0.5, 1.0, 0.02)  # the last: below 0.05


def pulses(events: int = 8, channels: int = 2, samples: int = 512, sign: float = 1.0,
           seed: int = 0) -> np.ndarray:
    """float32 (events, channels, samples): Gaussian pulses of known centre and height on a
    constant baseline with a little noise; channel c is scaled by 1 / (c + 1)."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples)
    shape = sum(h * np.exp(-0.5 * ((t - c) / SIGMA) ** 2) for c, h in zip(CENTRES, HEIGHTS,
                                                                          strict=True))
    gain = 1.0 / (np.arange(channels) + 1.0)
    traces = BASELINE + sign * gain[None, :, None] * shape + rng.normal(
        0.0, NOISE, (events, channels, samples))
    return traces.astype(np.float32)


def list_batch(data: np.ndarray, null: list[bool] | None = None) -> pa.RecordBatch:
    """A one-column batch ("w") of 1-D traces as fixed_size_list, plus an event number."""
    column = pa.FixedSizeListArray.from_arrays(pa.array(data.reshape(-1)), data.shape[1],
                                               mask=pa.array(null) if null else None)
    return pa.RecordBatch.from_pydict({"w": column, "event": pa.array(np.arange(len(data)))})


def yields(traces: np.ndarray, baseline: tuple[int, int], window: tuple[int, int]) -> np.ndarray:
    base = traces[..., slice(*baseline)].astype(np.float64).mean(axis=-1, keepdims=True)
    return (traces[..., slice(*window)].astype(np.float64) - base).sum(axis=-1)


def cfd_time(centre: float, fraction: float, delay: int) -> float:
    """Where fraction * g(t) = g(t - delay) for a Gaussian g of width SIGMA at `centre`."""
    return centre + delay / 2 + SIGMA**2 * np.log(fraction) / delay


# -- tof_integrate -----------------------------------------------------------------------------


def test_integrate_windows_per_channel() -> None:
    data = pulses()
    batch = tensor_batch(data, null=[False, True, *[False] * 6], event=np.arange(8))
    windows = {"H+": [90, 111], "big": [240, 262], "tail": [380, 512]}
    out = run_steps(batch, {"step": "tof_integrate", "column": "img", "baseline": [0, 60],
                            "windows": windows})
    assert out.schema.names == ["img/H+", "img/big", "img/tail", "event"]  # in the trace's place
    for name, window in windows.items():
        got = out.column(f"img/{name}")
        assert got.type == pa.list_(pa.float32(), 2)
        assert got.is_null().to_pylist() == [False, True, *[False] * 6]
        expected = yields(data, (0, 60), tuple(window))
        np.testing.assert_allclose(values(got)[[0, *range(2, 8)]],
                                   expected[[0, *range(2, 8)]], rtol=1e-6, atol=1e-6)
    # the yields are the pulses' areas (height * sigma * sqrt(2 pi)), channel 1 at half gain
    area = np.array(HEIGHTS[:2]) * SIGMA * np.sqrt(2 * np.pi)
    np.testing.assert_allclose(values(out.column("img/H+"))[0], [area[0], area[0] / 2],
                               rtol=0.02)
    np.testing.assert_allclose(values(out.column("img/big"))[0], [area[1], area[1] / 2],
                               rtol=0.02)
    assert note(out, "img/big") == ("tof_integrate of img: sum of samples [240,262) after "
                                    "subtracting the mean of samples [0,60), float32, one value "
                                    "per channel [2]")
    assert out.column("event").equals(batch.column("event"))


def test_integrate_one_channel_gives_scalars() -> None:
    data = np.round(pulses(channels=1)[:, 0] * 1000).astype(np.int16)  # integer digitizer counts
    out = run_steps(list_batch(data, null=[False] * 7 + [True]),
                    {"step": "tof_integrate", "column": "w", "baseline": [0, 60],
                     "windows": {"a": [240, 262]}})
    got = out.column("w/a")
    assert got.type == pa.float64() and got.null_count == 1
    np.testing.assert_allclose(got.to_numpy(zero_copy_only=False)[:7],
                               yields(data, (0, 60), (240, 262))[:7], rtol=1e-12)
    assert note(out, "w/a").endswith("float64, a scalar (one channel)")
    # a tensor [1, samples] has one channel too
    out = run_steps(tensor_batch(pulses(channels=1)), {"step": "tof_integrate", "column": "img",
                                                       "baseline": [0, 60],
                                                       "windows": {"a": [240, 262]}})
    assert out.column("img/a").type == pa.float32()


def test_integrate_run7(lcls2: pa.RecordBatch) -> None:
    steps = {"step": "tof_integrate", "column": WAVES, "baseline": [0, 150],
             "windows": {"H+": [225, 256], "N2+": [880, 965]}}
    out = run_steps(lcls2, steps)
    waves = lcls2.column(WAVES).to_numpy_ndarray()
    assert WAVES not in out.schema.names
    index = lcls2.schema.get_field_index(WAVES)
    assert out.schema.names[index:index + 2] == [f"{WAVES}/H+", f"{WAVES}/N2+"]
    for name, window in steps["windows"].items():
        field = out.schema.field(f"{WAVES}/{name}")
        assert field.type == pa.list_(pa.float32(), 2)
        assert field.metadata[md.UNITS] == b"V*sample"
        assert field.metadata[md.HDF5_PATH] == b"/tof/waveforms"
        np.testing.assert_allclose(values(out.column(field.name)),
                                   yields(waves, (0, 150), tuple(window)), rtol=1e-5, atol=1e-5)
    assert (values(out.column(f"{WAVES}/N2+")) > 0.1).all()  # every shot has nitrogen ions
    # kept: the trace stays, unchanged and uncopied, before the new columns
    kept = run_steps(lcls2, {**steps, "keep": True})
    assert kept.schema.names[index:index + 3] == [WAVES, f"{WAVES}/H+", f"{WAVES}/N2+"]
    assert kept.schema.field(WAVES).equals(lcls2.schema.field(WAVES), check_metadata=True)
    assert kept.column(WAVES).storage.buffers()[-1].address == (
        lcls2.column(WAVES).storage.buffers()[-1].address)
    assert kept.column(f"{WAVES}/H+").equals(out.column(f"{WAVES}/H+"))


# -- tof_hits ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fraction", "delay"), [(0.5, 4), (0.3, 6), (1.0, 2)])
def test_hits_at_the_constant_fraction_times(fraction: float, delay: int) -> None:
    data = pulses()
    batch = tensor_batch(data, null=[False, False, True, *[False] * 5])
    out = run_steps(batch, {"step": "tof_hits", "column": "img", "threshold": 0.05,
                            "fraction": fraction, "delay": delay})
    assert out.schema.names == ["img/hits", "img/n_hits"]
    hits, counts = out.column("img/hits"), out.column("img/n_hits")
    assert hits.type == pa.list_(pa.float64()) and counts.type == pa.int32()
    assert counts.to_pylist() == [3, 3, None, 3, 3, 3, 3, 3]  # the 0.02 pulse is below 0.05
    assert hits.is_null().to_pylist() == [False, False, True, *[False] * 5]
    expected = [cfd_time(c, fraction, delay) for c in CENTRES[:3]]
    for event in hits.to_pylist():
        if event is not None:
            np.testing.assert_allclose(event, expected, atol=0.2)
    assert out.schema.field("img/hits").metadata[md.UNITS] == b"sample"
    assert note(out, "img/n_hits") == (
        f"tof_hits of img channel 0: number of hits by constant-fraction discrimination "
        f"(fraction {fraction:g}, delay {delay}, positive pulses above 0.05 over the trace's "
        "median)")


def test_hits_polarity_channel_and_threshold() -> None:
    down = tensor_batch(pulses(sign=-1.0))
    step = {"step": "tof_hits", "column": "img", "threshold": 0.05, "delay": 4,
            "polarity": "negative"}
    out = run_steps(down, step)
    expected = [cfd_time(c, 0.5, 4) for c in CENTRES[:3]]
    for event in out.column("img/hits").to_pylist():
        np.testing.assert_allclose(event, expected, atol=0.2)
    assert run_steps(down, {**step, "polarity": "positive"}).column("img/n_hits").to_pylist() == (
        [0] * 8)
    # channel 1 has half the gain: the 0.1 pulse is now 0.05 high, not above 0.05
    out = run_steps(down, {**step, "channel": 1})
    assert out.column("img/n_hits").to_pylist() == [2] * 8
    np.testing.assert_allclose(out.column("img/hits").to_pylist(), [expected[1:]] * 8, atol=0.2)
    # a threshold below the 0.02 pulse finds it too
    out = run_steps(down, {**step, "threshold": 0.01})
    assert out.column("img/n_hits").to_pylist() == [4] * 8


def test_hits_run7_and_a_1d_column(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "tof_hits", "column": WAVES, "threshold": 0.02, "delay": 3,
                            "keep": True})
    index = lcls2.schema.get_field_index(WAVES)
    assert out.schema.names[index:index + 3] == [WAVES, f"{WAVES}/hits", f"{WAVES}/n_hits"]
    hits = out.column(f"{WAVES}/hits").to_pylist()
    counts = out.column(f"{WAVES}/n_hits").to_pylist()
    assert counts == [len(h) for h in hits] and sum(counts) > len(counts)
    flat = np.concatenate([h for h in hits if h])
    assert ((flat >= 3) & (flat < 1023)).all()
    assert all(h == sorted(h) for h in hits)
    # the same channel as a 1-D column gives the same hits
    waves = lcls2.column(WAVES).to_numpy_ndarray()
    one = run_steps(list_batch(np.ascontiguousarray(waves[:, 0])),
                    {"step": "tof_hits", "column": "w", "threshold": 0.02, "delay": 3})
    assert one.column("w/hits").to_pylist() == hits


# -- chains, slices, kept columns --------------------------------------------------------------


def test_chains(lcls2: pa.RecordBatch) -> None:
    out = run_steps(lcls2, {"step": "cast", "column": WAVES, "to": "float64"},
                    {"step": "tof_integrate", "column": WAVES, "baseline": [0, 150],
                     "windows": {"H+": [225, 256]}})
    field = out.schema.field(f"{WAVES}/H+")
    assert field.type == pa.list_(pa.float64(), 2)
    assert field.metadata[PROCESSING].decode().startswith(
        "cast float32->float64; tof_integrate of tof/waveforms: sum of samples [225,256)")
    waves = lcls2.column(WAVES).to_numpy_ndarray()
    np.testing.assert_allclose(values(out.column(field.name)),
                               yields(waves, (0, 150), (225, 256)), rtol=1e-12)
    # hit times count from the start of the cropped trace
    cropped = run_steps(lcls2, {"step": "roi", "column": WAVES, "x": [600, 1024]},
                        {"step": "tof_hits", "column": WAVES, "threshold": 0.02, "delay": 3})
    flat = np.concatenate(cropped.column(f"{WAVES}/hits").to_pylist())
    assert flat.size and ((flat >= 3) & (flat < 424)).all()
    assert note(cropped, f"{WAVES}/hits").startswith("roi y=[0,2] x=[600,1024]; tof_hits of ")
    # both steps on one trace: the first keeps it for the second
    both = run_steps(lcls2, {"step": "tof_integrate", "column": WAVES, "baseline": [0, 150],
                             "windows": {"H+": [225, 256]}, "keep": True},
                     {"step": "tof_hits", "column": WAVES, "threshold": 0.02, "delay": 3})
    assert WAVES not in both.schema.names
    assert {f"{WAVES}/H+", f"{WAVES}/hits", f"{WAVES}/n_hits"} <= set(both.schema.names)


def test_sliced_batches_and_no_events(lcls2: pa.RecordBatch) -> None:
    steps = [{"step": "tof_integrate", "column": WAVES, "baseline": [0, 150],
              "windows": {"H+": [225, 256]}, "keep": True},
             {"step": "tof_hits", "column": WAVES, "threshold": 0.02, "delay": 3}]
    whole = run_steps(lcls2, *steps)
    part = run_steps(lcls2.slice(17, 40), *steps)
    assert part.equals(whole.slice(17, 40))
    empty = run_steps(lcls2.slice(0, 0), *steps)
    assert empty.num_rows == 0 and empty.schema == whole.schema


# -- errors ------------------------------------------------------------------------------------

INTEGRATE = {"step": "tof_integrate", "column": WAVES, "baseline": [0, 100],
             "windows": {"a": [200, 300]}}
HITS = {"step": "tof_hits", "column": WAVES, "threshold": 0.02, "delay": 3}

BAD = [
    ({**INTEGRATE, "windows": {}}, "tof_integrate: 'windows' must be a non-empty object of NAME: "
                                   "[start, stop] sample ranges; got {}"),
    ({**INTEGRATE, "windows": [[0, 10]]}, "tof_integrate: 'windows' must be a non-empty object"),
    ({**INTEGRATE, "windows": {"a/b": [0, 10]}},
     "tof_integrate: 'windows' name \"a/b\" is not valid: 1 to 64 letters, digits"),
    ({**INTEGRATE, "windows": {"": [0, 10]}}, "tof_integrate: 'windows' name \"\" is not valid"),
    ({**INTEGRATE, "windows": {"Ion": [0, 10], "ion": [5, 20]}},
     "tof_integrate: 'windows' names \"Ion\" and \"ion\" differ only in case"),
    ({**INTEGRATE, "windows": {"a": [0, 2000]}},
     "tof_integrate: 'windows' \"a\" must be [start, stop] with 0 <= start < stop <= 1024 (the "
     "trace has 1024 samples); got [0, 2000]"),
    ({**INTEGRATE, "windows": {"a": [10, 10]}}, "tof_integrate: 'windows' \"a\" must be [start, "),
    ({**INTEGRATE, "windows": {"a": "0:10"}}, "tof_integrate: 'windows' \"a\" must be [start, "),
    ({**INTEGRATE, "baseline": [50, 50]},
     "tof_integrate: 'baseline' must be [start, stop] with 0 <= start < stop <= 1024 (the trace "
     "has 1024 samples); got [50, 50]"),
    ({**INTEGRATE, "baseline": [0, 1025]}, "tof_integrate: 'baseline' must be [start, stop]"),
    ({**INTEGRATE, "keep": 1}, "tof_integrate: 'keep' must be true or false; got 1"),
    ({**INTEGRATE, "column": "pnccd/image"},
     "tof_integrate: 'column' \"pnccd/image\" has per-event shape [1, 128, 128]; tof_integrate "
     "takes a 1-D (fixed_size_list) trace or a 2-D tensor [channels, samples] of traces"),
    ({**INTEGRATE, "column": "gmd/energy"},
     "tof_integrate: 'column' \"gmd/energy\" is a scalar (double) column, but tof_integrate "
     "works on per-event arrays"),
    ({**INTEGRATE, "column": "tof/wavefrms"},
     "tof_integrate: 'column' \"tof/wavefrms\" is not a column of the input. Did you mean "
     "'tof/waveforms'?"),
    ({"step": "tof_integrate", "column": WAVES, "windows": {"a": [0, 1]}},
     "tof_integrate: missing parameter 'baseline'"),
    ({**INTEGRATE, "window": {}}, "tof_integrate: unknown parameter 'window'"),
    ({**HITS, "channel": 2}, "tof_hits: 'channel' must be an integer from 0 to 1 (the column has "
                             "2 channels); got 2"),
    ({**HITS, "channel": -1}, "tof_hits: 'channel' must be an integer from 0 to 1"),
    ({**HITS, "threshold": 0}, "tof_hits: 'threshold' must be a positive number (the pulse "
                               "height above the baseline, for either polarity); got 0"),
    ({**HITS, "threshold": "0.1"}, "tof_hits: 'threshold' must be a number; got \"0.1\""),
    ({**HITS, "fraction": 1.5}, "tof_hits: 'fraction' must be a number in (0, 1]; got 1.5"),
    ({**HITS, "fraction": 0}, "tof_hits: 'fraction' must be a number in (0, 1]; got 0"),
    ({**HITS, "delay": 0}, "tof_hits: 'delay' must be a positive integer below 1023 (the trace "
                           "has 1024 samples); got 0"),
    ({**HITS, "delay": 1023}, "tof_hits: 'delay' must be a positive integer below 1023"),
    ({**HITS, "delay": 2.5}, "tof_hits: 'delay' must be a positive integer below 1023"),
    ({**HITS, "polarity": "negativ"}, "tof_hits: 'polarity' must be one of 'positive', "
                                      "'negative'; got \"negativ\". Did you mean 'negative'?"),
    ({**HITS, "keep": "yes"}, "tof_hits: 'keep' must be true or false; got \"yes\""),
    ({"step": "tof_hits", "column": WAVES, "delay": 3}, "tof_hits: missing parameter "
                                                         "'threshold'"),
]


@pytest.mark.parametrize(("step", "message"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_steps(lcls2: pa.RecordBatch, step: dict, message: str) -> None:
    with pytest.raises(StepError) as info:
        build_pipeline([step], lcls2.schema)
    assert str(info.value).startswith(message)


def test_bad_steps_in_chains(lcls2: pa.RecordBatch) -> None:
    # the trace is gone once a step without "keep" has used it
    with pytest.raises(StepError, match=r"^tof_hits: 'column' \"tof/waveforms\" is not a column "
                                        r"of the input\..* \(step 2 of 2\)$"):
        build_pipeline([INTEGRATE, HITS], lcls2.schema)
    # new columns may not overwrite existing ones
    with pytest.raises(StepError, match=r"^tof_integrate: 'windows' \"a\" would make a column "
                                        r"\"tof/waveforms/a\", which the input already has "
                                        r"\(step 2 of 2\)$"):
        build_pipeline([{**INTEGRATE, "keep": True}, INTEGRATE], lcls2.schema)
    with pytest.raises(StepError, match=r"^tof_hits: 'column' \"tof/waveforms\" would make a "
                                        r"column \"tof/waveforms/hits\", which the input"):
        build_pipeline([{**HITS, "keep": True}, HITS], lcls2.schema)
    with pytest.raises(StepError, match=r"^tof_hits: 'channel' must be an integer from 0 to 0 "
                                        r"\(the column has 1 channel\); got 1"):
        build_pipeline([{**HITS, "column": "w", "channel": 1}],
                       list_batch(pulses(channels=1)[:, 0]).schema)
    with pytest.raises(StepError, match=r"^tof_hits: 'column' .* holds bfloat16 values"):
        build_pipeline([{"step": "cast", "column": WAVES, "to": "bfloat16"}, HITS],
                       lcls2.schema)
