"""Planning (flight_server.archive.planning) on its own, over run files generated for the test:
descriptors become requests or clear errors, event slices are clamped as Python slices are,
columns must agree across runs, and a plan's partitions hold every requested event exactly once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_server.archive.planning import (
    MAX_RUN_DIGITS,
    Plan,
    check_range,
    plan,
    request_from_descriptor,
    resolve_columns,
)
from flight_server.catalog import Catalog
from flight_server.errors import InvalidArgument, NotFound
from flight_server.generator import generate_cxi_run, generate_lcls1_run, generate_lcls2_run
from schemas import Request
from schemas import metadata as md
from schemas.request import EventSlice

EXP = "xpplan01"
EVENTS = {1: 97, 2: 50, 3: 40, 4: 30, 5: 12}  # run -> events
CHUNK = 7  # events per HDF5 chunk of runs 1 and 2
SMALL = {"frame_shape": (16, 16), "tof_samples": 32}
ALIAS = "entry_1/instrument_1/detector_1/data"  # a soft link's target in the CXI run


@pytest.fixture(scope="module")
def catalog(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Catalog]:
    """Runs 1 and 2: LCLS2, same types; run 3: LCLS2 with longer waveforms (another type);
    run 4: LCLS1; run 5: CXI, whose frames are also reachable under a link target's name."""
    root = tmp_path_factory.mktemp("planning")
    top = root / EXP / "hdf5" / "smalldata"
    generate_lcls2_run(top / f"{EXP}_Run0001.h5", 1, EVENTS[1], chunk_events=CHUNK, **SMALL)
    generate_lcls2_run(top / f"{EXP}_Run0002.h5", 2, EVENTS[2], chunk_events=CHUNK, **SMALL)
    generate_lcls2_run(top / f"{EXP}_Run0003.h5", 3, EVENTS[3], chunk_events=4,
                       frame_shape=(16, 16), tof_samples=64)
    generate_lcls1_run(root / EXP / "r0004.h5", 4, EVENTS[4], chunk_events=3)
    generate_cxi_run(root / EXP / "cxi" / "run_5.cxi", 5, EVENTS[5], frame_shape=(32, 32))
    cat = Catalog(root)
    yield cat
    cat.close()


def cmd(request: Request | dict | bytes) -> flight.FlightDescriptor:
    if isinstance(request, Request):
        return flight.FlightDescriptor.for_command(request.encode())
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    return flight.FlightDescriptor.for_command(raw)


def events_of(p: Plan) -> dict[int, list[int]]:
    """Run -> the events its partitions' tickets name, in partition order."""
    out: dict[int, list[int]] = {}
    for part in p.partitions:
        t = part.ticket
        out.setdefault(t.run, []).extend(range(t.start, t.stop, t.step))
    return out


# -- request_from_descriptor -------------------------------------------------------------------


@pytest.mark.parametrize(("path", "run"), [
    (["tmox42619", "7"], 7),
    ([b"tmox42619", b"7"], 7),
    (["tmox42619", "0007"], 7),
    (["tmox42619", "0"], 0),
    (["tmox42619", "2147483647"], 2**31 - 1),
])
def test_a_path_descriptor_names_one_run(path: list, run: int) -> None:
    request = request_from_descriptor(flight.FlightDescriptor.for_path(*path))
    assert request == Request("tmox42619", (run,))
    assert request.columns is None and request.events == EventSlice()
    assert request.filter is None and request.processing is None


def test_a_third_path_element_names_a_table() -> None:
    request = request_from_descriptor(flight.FlightDescriptor.for_path("p002012", "238", "X:xtdf"))
    assert request.runs == (238,) and request.table == "X:xtdf"


@pytest.mark.parametrize("path", [
    ["tmox42619"],
    ["tmox42619", "7", ""],
    ["tmox42619", "7", "a", "b"],
    ["tmox42619", "seven"],
    ["tmox42619", "-7"],
    ["tmox42619", "+7"],
    ["tmox42619", "7.0"],
    ["tmox42619", " 7"],
    ["tmox42619", ""],
    ["tmox42619", "\u0667"],  # ARABIC-INDIC DIGIT SEVEN: a digit to str.isdigit, not ASCII
    ["tmox42619", "1" * (MAX_RUN_DIGITS + 1)],
])
def test_bad_path_descriptors_say_what_is_valid(path: list[str]) -> None:
    with pytest.raises(InvalidArgument) as info:
        request_from_descriptor(flight.FlightDescriptor.for_path(*path))
    message = str(info.value)
    assert ("path descriptor must be [experiment, run], [experiment, run, table] or "
            "[experiment, run, source]") in message
    assert f"at most {MAX_RUN_DIGITS} digits" in message and "['tmox42619', '7']" in message
    assert "; got ['tmox42619'" in message  # what was sent, quoted


def test_a_path_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="path descriptor is not UTF-8"):
        request_from_descriptor(flight.FlightDescriptor.for_path(b"tmox42619", b"\xff7"))


@pytest.mark.parametrize("request_", [
    Request(EXP, (1,)),
    Request(EXP, (2, 1), columns=("gmd/energy", "pnccd/image")),
    Request(EXP, (1,), events=EventSlice(5, 80, 3)),
    Request(EXP, (1, 2, 3), events=EventSlice(10, None, 2), filter="gmd/energy > 1",
            processing=({"step": "roi", "column": "pnccd/image", "y": [2, 10], "x": [0, 8]},)),
])
def test_a_command_descriptor_round_trips(request_: Request) -> None:
    assert request_from_descriptor(cmd(request_)) == request_


def test_a_command_fills_in_defaults() -> None:
    request = request_from_descriptor(cmd({"v": 1, "experiment": EXP, "runs": [3, 1],
                                           "events": {"start": None, "stop": 9, "step": None}}))
    assert request == Request(EXP, (3, 1), events=EventSlice(0, 9, 1))


@pytest.mark.parametrize(("raw", "phrase"), [
    (b"{", "request is not valid JSON"),
    (b"\xff", "request is not valid JSON"),
    (b"[]", "request must be a JSON object, got list"),
    ({}, "'v' is a required property"),
    ({"v": 2, "experiment": EXP, "runs": [1]}, "invalid request at v"),
    ({"v": 1, "experiment": EXP, "runs": []}, "invalid request at runs"),
    ({"v": 1, "experiment": EXP, "runs": [1, 1]}, "invalid request at runs"),
    ({"v": 1, "experiment": EXP, "runs": [1.0]}, "invalid request at runs/0"),
    ({"v": 1, "experiment": EXP, "runs": [1], "events": {"step": 0}},
     "invalid request at events/step"),
    ({"v": 1, "experiment": EXP, "runs": [1], "events": {"start": -1}},
     "invalid request at events/start"),
    ({"v": 1, "experiment": EXP, "runs": [1], "events": {"start": 5, "stop": 2}},
     "event slice is reversed: start 5 > stop 2"),
    ({"v": 1, "experiment": EXP, "runs": [1], "colums": ["x"]}, "invalid request"),
])
def test_bad_commands_are_invalid_arguments(raw: dict | bytes, phrase: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        request_from_descriptor(cmd(raw))
    assert phrase in str(info.value)
    assert info.value.__cause__ is None  # the parser's own exception is not chained to clients


# -- check_range -------------------------------------------------------------------------------


@pytest.mark.parametrize(("run", "events", "expected"), [
    (1, EventSlice(), (0, 97, 1)),
    (1, EventSlice(10, 50, 3), (10, 50, 3)),
    (1, EventSlice(10, 500, 2), (10, 97, 2)),  # stop past the end: clamped
    (2, EventSlice(10, 500, 2), (10, 50, 2)),  # the same slice on a shorter run
    (1, EventSlice(0, 0), (0, 0, 1)),
    (1, EventSlice(97), (97, 97, 1)),  # start at the end: empty, not an error
    (1, EventSlice(97, 200, 5), (97, 97, 5)),
    (2, EventSlice(49, None, 100), (49, 50, 100)),
])
def test_check_range_clamps_stop_as_slices_do(catalog: Catalog, run: int, events: EventSlice,
                                              expected: tuple[int, int, int]) -> None:
    start, stop, step = check_range(catalog.run(EXP, run), events)
    assert (start, stop, step) == expected
    n = EVENTS[run]
    assert list(range(start, stop, step)) == list(range(n))[events.start:events.stop:events.step]


@pytest.mark.parametrize(("run", "start"), [(1, 98), (2, 51), (2, 97), (5, 10**12)])
def test_check_range_refuses_a_start_past_the_end(catalog: Catalog, run: int, start: int) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_range(catalog.run(EXP, run), EventSlice(start, None, 1))
    n = EVENTS[run]
    message = str(info.value)
    assert f"event start {start} is out of range for run {run} of '{EXP}'" in message
    assert f"which has {n} events (valid: 0 <= start <= {n})" in message


# -- resolve_columns ---------------------------------------------------------------------------


def test_all_columns_of_runs_that_agree(catalog: Catalog) -> None:
    one, two = catalog.run(EXP, 1), catalog.run(EXP, 2)
    columns = resolve_columns([one, two], None)
    assert [c.name for c in columns] == list(one.columns)  # every column, in schema order
    assert columns == list(one.columns.values())


def test_all_columns_of_different_layouts_are_the_common_ones(catalog: Catalog) -> None:
    lcls2, lcls1 = catalog.run(EXP, 1), catalog.run(EXP, 4)
    names = [c.name for c in resolve_columns([lcls2, lcls1], None)]
    assert names == [n for n in lcls2.columns if n in lcls1.columns]  # the first run's order
    assert names[:2] == [md.RUN_COLUMN, md.TIME_COLUMN]
    assert "pnccd/image" not in names and "jungfrau1M/ROI_0_area" not in names


def test_named_columns_resolve_with_a_slash_and_through_a_link(catalog: Catalog) -> None:
    runs = [catalog.run(EXP, 1), catalog.run(EXP, 2)]
    columns = resolve_columns(runs, ("/gmd/energy", "time", "pnccd/image"))
    assert [c.name for c in columns] == ["gmd/energy", "time", "pnccd/image"]
    [frames] = resolve_columns([catalog.run(EXP, 5)], (ALIAS,))
    assert frames.name == "entry_1/data_1/data"


def test_a_column_whose_type_differs_between_runs_is_refused(catalog: Catalog) -> None:
    one, three = catalog.run(EXP, 1), catalog.run(EXP, 3)
    for runs, first, second in (([one, three], 1, 3), ([three, one], 3, 1)):
        for names in (None, ("gmd/energy", "tof/waveforms")):
            with pytest.raises(InvalidArgument) as info:
                resolve_columns(runs, names)
            message = str(info.value)
            assert "column 'tof/waveforms' is " in message
            assert f"in run {first} but " in message and f"in run {second};" in message
            assert "request these runs separately" in message
            assert "shape=[2,32]" in message and "shape=[2,64]" in message
    # columns that do agree may still be read together: frames of the same shape, scalars
    columns = resolve_columns([one, three], ("gmd/energy", "pnccd/image", "run"))
    assert [c.field.type for c in columns] == [one.columns[n].field.type
                                               for n in ("gmd/energy", "pnccd/image", "run")]


def test_a_column_named_twice_through_a_link_is_refused(catalog: Catalog) -> None:
    cxi = catalog.run(EXP, 5)
    with pytest.raises(InvalidArgument, match="a column is named twice"):
        resolve_columns([cxi], ("entry_1/data_1/data", ALIAS))
    with pytest.raises(InvalidArgument, match="a column is named twice"):
        resolve_columns([cxi], ("time", "/time"))


def test_an_unknown_column_is_not_found(catalog: Catalog) -> None:
    with pytest.raises(NotFound, match="Did you mean 'gmd/energy'"):
        resolve_columns([catalog.run(EXP, 1), catalog.run(EXP, 2)], ("gmd/energi",))


# -- plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize("partition_bytes", [1, 4096, 30_000, 10**12])
@pytest.mark.parametrize("events", [
    EventSlice(),
    EventSlice(5, 80, 3),
    EventSlice(13, None, 1),
    EventSlice(1, 1000, 10),
    EventSlice(0, 49, 49),
    EventSlice(45, 60, 2),  # past the end of run 2 (50 events): clamped there
    EventSlice(50),  # nothing of run 2, the tail of run 1
])
def test_partitions_hold_every_event_exactly_once(catalog: Catalog, events: EventSlice,
                                                  partition_bytes: int) -> None:
    p = plan(Request(EXP, (2, 1), events=events), catalog, partition_bytes)
    wanted = {run: list(range(EVENTS[run]))[events.start:events.stop:events.step]
              for run in (2, 1)}
    got = events_of(p)
    assert {run: got.get(run, []) for run in wanted} == wanted
    assert set(got) <= {1, 2}
    runs_in_order = [part.ticket.run for part in p.partitions]
    assert runs_in_order == sorted(runs_in_order, key=[2, 1].index)  # the request's run order
    assert p.total_records == sum(len(v) for v in wanted.values())
    for part in p.partitions:
        t = part.ticket
        assert part.records == len(range(t.start, t.stop, t.step)) > 0
        assert t.step == events.step and t.experiment == EXP
        assert (t.start - events.start) % events.step == 0  # on the slice's lattice
        assert t.columns == tuple(p.schema.names)
    # partitions are cut at whole chunks: every cut but a run's last is a multiple of the chunk
    for run in (1, 2):
        stops = [part.ticket.stop for part in p.partitions if part.ticket.run == run]
        assert all(stop % CHUNK == 0 for stop in stops[:-1])


def test_partitions_are_about_partition_bytes(catalog: Catalog) -> None:
    one = catalog.run(EXP, 1)
    whole = plan(Request(EXP, (1,)), catalog, 10**12)
    assert len(whole.partitions) == 1
    assert whole.total_bytes == whole.partitions[0].bytes == int(
        sum(c.event_bytes for c in one.columns.values()) * EVENTS[1])
    per_event = sum(c.event_bytes for c in one.columns.values())
    small = plan(Request(EXP, (1,)), catalog, int(per_event * 2 * CHUNK) + 1)
    assert [p.records for p in small.partitions] == [14] * 6 + [13]  # two chunks a partition
    assert small.total_records == EVENTS[1]
    tiny = plan(Request(EXP, (1,)), catalog, 1)
    assert [p.records for p in tiny.partitions] == [CHUNK] * 13 + [6]  # at least a chunk


def test_partition_bytes_count_the_requested_columns(catalog: Catalog) -> None:
    p = plan(Request(EXP, (1, 2), columns=("gmd/energy",), events=EventSlice(0, None, 2)),
             catalog, 10**12)
    energy = catalog.run(EXP, 1).columns["gmd/energy"].event_bytes
    assert [part.records for part in p.partitions] == [49, 25]
    assert [part.bytes for part in p.partitions] == [int(49 * energy), int(25 * energy)]
    assert p.total_bytes == int(49 * energy) + int(25 * energy)
    assert p.schema.names == ["gmd/energy"]


def test_the_schema_of_one_run_and_of_several(catalog: Catalog) -> None:
    one = catalog.run(EXP, 1)
    single = plan(Request(EXP, (1,)), catalog, 4096)
    assert single.schema.equals(one.schema(), check_metadata=True)
    several = plan(Request(EXP, (2, 1)), catalog, 4096)
    meta = several.schema.metadata
    assert meta[md.EXPERIMENT] == EXP.encode()
    assert json.loads(meta[md.RUNS]) == [2, 1]
    assert meta[md.EVENTS] == str(EVENTS[1] + EVENTS[2]).encode()  # before any slice
    assert meta[md.LAYOUT] == b"lcls2-smalldata"
    assert md.RUN not in meta
    mixed = plan(Request(EXP, (4, 1)), catalog, 4096)
    assert mixed.schema.metadata[md.LAYOUT] == b"lcls1-smalldata,lcls2-smalldata"


def test_a_filter_and_processing_shape_the_plan_not_its_partitions(catalog: Catalog) -> None:
    roi = {"step": "roi", "column": "pnccd/image", "y": [2, 10], "x": [0, 8]}
    p = plan(Request(EXP, (1,), filter="gmd/energy > 1", processing=(roi,)), catalog, 4096)
    assert p.total_records == -1  # unknown until the filter has run
    assert p.schema.field("pnccd/image").type == pa.fixed_shape_tensor(pa.uint16(), [1, 8, 8])
    assert events_of(p) == {1: list(range(EVENTS[1]))}  # still every event, once
    for part in p.partitions:
        assert part.ticket.filter == "gmd/energy > 1"
        assert part.ticket.processing == (roi,)
    plain = plan(Request(EXP, (1,)), catalog, 4096)
    assert p.total_bytes < plain.total_bytes  # the cropped frames cost less on the wire


def test_a_plan_with_a_bad_run_or_slice_is_refused(catalog: Catalog) -> None:
    with pytest.raises(InvalidArgument, match="event start 60 is out of range for run 2"):
        plan(Request(EXP, (1, 2), events=EventSlice(60)), catalog, 4096)
    with pytest.raises(InvalidArgument, match="column 'tof/waveforms'"):
        plan(Request(EXP, (1, 3)), catalog, 4096)
    with pytest.raises(NotFound, match=f"experiment '{EXP}' has no run 9"):
        plan(Request(EXP, (1, 9)), catalog, 4096)
    with pytest.raises(NotFound, match="no experiment 'xpplan02'"):
        plan(Request("xpplan02", (1,)), catalog, 4096)
