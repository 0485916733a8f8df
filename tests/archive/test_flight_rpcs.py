"""The Flight RPCs over a real server on loopback, with pyarrow.flight as the client."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from schemas import metadata as md
from tests.helpers import CXI_EXP, LCLS1_EXP, LCLS2_EXP, open_h5, ticket_json


def cmd(**doc) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps({"v": 1, **doc}))


def fetch(c: flight.FlightClient, info: flight.FlightInfo) -> pa.Table:
    tables = [c.do_get(e.ticket).read_all() for e in info.endpoints]
    return pa.concat_tables(tables) if tables else info.schema.empty_table()


def test_list_flights_all_and_by_glob(flight_client) -> None:
    infos = list(flight_client.list_flights())
    paths = {tuple(p.decode() for p in i.descriptor.path) for i in infos}
    assert paths == {(LCLS2_EXP, "7"), (LCLS2_EXP, "8"), (LCLS1_EXP, "3"), (CXI_EXP, "12")}
    tmo = list(flight_client.list_flights(b"tmo*"))
    assert {i.descriptor.path[1] for i in tmo} == {b"7", b"8"}
    assert list(flight_client.list_flights(b"nothing*")) == []
    run7 = next(i for i in tmo if i.descriptor.path[1] == b"7")
    assert run7.total_records == 120 and run7.total_bytes > 120 * 32 * 1024
    assert run7.schema.metadata[md.RUN] == b"7"


def test_path_descriptor_plans_partitions(flight_client, data_root) -> None:
    info = flight_client.get_flight_info(flight.FlightDescriptor.for_path(LCLS2_EXP, "7"))
    assert info.total_records == 120
    # ~45 KiB per event, 1 MiB partitions in the test server -> several endpoints
    assert len(info.endpoints) > 3
    table = fetch(flight_client, info)
    assert table.num_rows == 120
    assert table.schema.equals(info.schema)  # schema advertised == schema streamed
    path = data_root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run0007.h5"
    with open_h5(path) as f:
        np.testing.assert_array_equal(table.column("pnccd/image").combine_chunks()
                                      .to_numpy_ndarray(), f["pnccd/image"][()])
    # total_bytes is an honest estimate of what is streamed
    assert 0.8 < info.total_bytes / table.nbytes < 1.25


def test_batches_are_sized_by_bytes(flight_client) -> None:
    info = flight_client.get_flight_info(
        cmd(experiment=LCLS2_EXP, runs=[7], columns=["pnccd/image"]))
    big = max(info.endpoints, key=lambda e: ticket_json(e.ticket)["stop"]
              - ticket_json(e.ticket)["start"])
    sizes = [chunk.data.nbytes for chunk in flight_client.do_get(big.ticket)]
    assert len(sizes) > 2
    chunk = 5 * 32 * 1024  # batches hold whole HDF5 chunks (5 frames of 32 KiB)
    assert sizes[0] <= max(32 * 1024, chunk) < max(sizes)  # small first batch: fast first byte
    assert max(sizes) <= 256 * 1024 + chunk  # the batch target, whole chunks


def test_command_descriptor_projection_and_events(flight_client, data_root) -> None:
    info = flight_client.get_flight_info(cmd(
        experiment=LCLS2_EXP, runs=[7, 8], columns=["gmd/energy", "run", "tof/waveforms"],
        events={"start": 10, "stop": 80, "step": 3}))
    assert info.schema.names == ["gmd/energy", "run", "tof/waveforms"]
    assert json.loads(info.schema.metadata[md.RUNS]) == [7, 8]
    expected = 2 * len(range(10, 80, 3))
    assert info.total_records == expected
    table = fetch(flight_client, info)
    assert table.num_rows == expected
    runs = table.column("run").to_numpy()
    assert (runs[: expected // 2] == 7).all() and (runs[expected // 2 :] == 8).all()
    path = data_root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run0008.h5"
    with open_h5(path) as f:
        got = table.column("tof/waveforms").combine_chunks().to_numpy_ndarray()[expected // 2 :]
        np.testing.assert_array_equal(got, f["tof/waveforms"][10:80:3])


def test_stop_past_the_end_is_clamped_per_run(flight_client) -> None:
    # one slice over runs of 120 and 90 events, as with Python, NumPy and h5py slices
    info = flight_client.get_flight_info(cmd(
        experiment=LCLS2_EXP, runs=[7, 8], columns=["run"], events={"start": 50, "stop": 100}))
    assert info.total_records == 50 + 40
    runs = fetch(flight_client, info).column("run").to_pylist()
    assert runs.count(7) == 50 and runs.count(8) == 40


def test_get_schema_matches_flight_info(flight_client) -> None:
    d = cmd(experiment=CXI_EXP, runs=[12], columns=["entry_1/data_1/data", "time"])
    schema = flight_client.get_schema(d).schema
    assert schema.equals(flight_client.get_flight_info(d).schema, check_metadata=True)
    assert schema.field(0).type == pa.fixed_shape_tensor(pa.float32(), [128, 128])


def test_empty_event_slice_gives_empty_table(flight_client) -> None:
    info = flight_client.get_flight_info(
        cmd(experiment=LCLS1_EXP, runs=[3], events={"start": 80, "stop": 80}))
    assert info.total_records == 0 and list(info.endpoints) == []


def test_tickets_are_rechecked_not_trusted(flight_client, sign) -> None:
    # Even a ticket carrying the server's own seal is checked against the run again.
    info = flight_client.get_flight_info(cmd(experiment=LCLS1_EXP, runs=[3]))
    ticket = ticket_json(info.endpoints[0].ticket)
    ticket["stop"] = 10_000  # beyond the run
    with pytest.raises(pa.ArrowInvalid, match="beyond the 80 events of run 3"):
        flight_client.do_get(flight.Ticket(sign(json.dumps(ticket).encode()))).read_all()
    ticket.update(stop=10, columns=["../../etc/passwd"])
    with pytest.raises(pa.ArrowKeyError, match="no column"):
        flight_client.do_get(flight.Ticket(sign(json.dumps(ticket).encode()))).read_all()


def test_list_actions_and_experiments_action(flight_client) -> None:
    assert "experiments" in [a.type for a in flight_client.list_actions()]
    [result] = list(flight_client.do_action(flight.Action("experiments", b"")))
    body = json.loads(result.body.to_pybytes())
    assert {e["experiment"]: e["runs"] for e in body}[LCLS2_EXP] == [7, 8]
