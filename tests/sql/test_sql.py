"""Flight SQL over DuckDB, end to end: real servers, real drivers (ADBC, flightsql-dbapi,
polars, pandas), results checked against the HDF5 files themselves."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import adbc_driver_manager
import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pytest

import schemas.flight_sql as fsql
from clients import connect
from flight_server.security.grants import Grants
from flight_server.security.users import UsersFile
from flight_server.server import LclstreamServer
from tests.helpers import CXI_EXP, LCLS2_EXP, adbc, admin_token, open_h5, raw_client, start_server

EVENTS = f"{LCLS2_EXP}.events"
PASSWORD = "correct horse battery"


def run_file(root: Path, run: int) -> Path:
    return root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run{run:04d}.h5"


def energies(root: Path, run: int) -> np.ndarray:
    with open_h5(run_file(root, run)) as f:
        return f["gmd/energy"][()]


@pytest.fixture(scope="module")
def sql_server(data_root: Path, tmp_path_factory: pytest.TempPathFactory,
               ) -> Iterator[LclstreamServer]:
    """A server with a password user who may read tmox4* only, and a short query time limit."""
    import os

    state = Path(os.environ["LCLSTREAM_STATE_DIR"])
    users = tmp_path_factory.mktemp("sql-users") / "users.json"
    UsersFile(users).add("erin", PASSWORD, Grants.build(read=["tmox4*"]))
    srv = start_server(data_root, state_dir=state, users_file=users, sql_timeout=2,
                       sql_memory_limit="256MB", batch_bytes=256 * 1024,
                       first_batch_bytes=32 * 1024)
    yield srv
    srv.shutdown()


@pytest.fixture
def loc(sql_server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{sql_server.port}"


def tmox_token(server: LclstreamServer, subject: str = "erin") -> str:
    return server.security.minter.mint(subject, Grants.build(read=["tmox4*"]), 600)


# -- results are right --------------------------------------------------------------------------


def test_group_by_run_matches_the_files(loc: str, data_root: Path) -> None:
    with connect(loc) as client:
        table = client.sql(f'SELECT run, count(*) AS n, avg("gmd/energy") AS mean, '
                           f'max("gmd/energy") AS top FROM {EVENTS} GROUP BY run ORDER BY run')
    rows = table.to_pylist()
    assert [r["run"] for r in rows] == [7, 8]
    for row in rows:
        e = energies(data_root, row["run"])
        assert row["n"] == len(e)
        assert row["mean"] == pytest.approx(float(np.nanmean(e)))
        assert row["top"] == pytest.approx(float(np.nanmax(e)))


def test_event_range_and_value_filters(loc: str, data_root: Path) -> None:
    e7, e8 = energies(data_root, 7), energies(data_root, 8)
    with connect(loc) as client:
        window = client.sql(f'SELECT run, event, "gmd/energy" AS e FROM {EVENTS} '
                            "WHERE run = 7 AND event BETWEEN 10 AND 19 ORDER BY event")
        assert window.column("event").to_pylist() == list(range(10, 20))
        np.testing.assert_array_equal(window.column("e").to_numpy(), e7[10:20])
        threshold = float(np.nanmedian(np.concatenate([e7, e8])))
        bright = client.sql(f'SELECT run, event FROM {EVENTS} WHERE "gmd/energy" > ? '
                            "ORDER BY run, event", [threshold])
        expected = [(7, int(i)) for i in np.flatnonzero(e7 > threshold)]
        expected += [(8, int(i)) for i in np.flatnonzero(e8 > threshold)]
        assert list(zip(bright.column("run").to_pylist(), bright.column("event").to_pylist(),
                        strict=True)) == expected
        picked = client.sql(f"SELECT run, event FROM {EVENTS} WHERE (run = 8 AND event IN "
                            "(0, 5, 89)) OR (run = 7 AND event = 119) ORDER BY run, event")
        assert picked.to_pylist() == [{"run": 7, "event": 119}, {"run": 8, "event": 0},
                                      {"run": 8, "event": 5}, {"run": 8, "event": 89}]


def test_tensor_columns_keep_their_shape(loc: str, data_root: Path) -> None:
    with connect(loc) as client:
        table = client.sql(f'SELECT "pnccd/image" AS img, "pnccd/image"[1][3][5] AS px '
                           f"FROM {EVENTS} WHERE run = 8 AND event = 4")
    with open_h5(run_file(data_root, 8)) as f:
        frame = f["pnccd/image"][4]
    image = table.column("img").to_pylist()[0]  # one list per dimension: the shape survives
    np.testing.assert_array_equal(np.array(image, dtype=frame.dtype), frame)
    assert table.column("px")[0].as_py() == int(frame.reshape(-1, *frame.shape[-2:])[0, 2, 4])


def test_runs_table(loc: str) -> None:
    with connect(loc) as client:
        runs = client.sql(f"SELECT run, events, layout, list_contains(columns, 'gmd/energy') "
                          f"AS has_energy FROM {LCLS2_EXP}.runs ORDER BY run").to_pylist()
    assert runs == [{"run": 7, "events": 120, "layout": "lcls2-smalldata", "has_energy": True},
                    {"run": 8, "events": 90, "layout": "lcls2-smalldata", "has_energy": True}]


def test_large_results_stream_in_batches(loc: str, caplog: pytest.LogCaptureFixture) -> None:
    import json

    caplog.set_level(logging.INFO, logger="lclstream.audit")
    with connect(loc) as client:
        batches = list(client.sql_batches(f'SELECT "tof/waveforms" FROM {EVENTS}'))
    assert len(batches) > 1 and sum(b.num_rows for b in batches) == 210
    audited = [json.loads(r.getMessage()) for r in caplog.records
               if r.name == "lclstream.audit" and '"do_get"' in r.getMessage()]
    assert audited[-1]["bytes"] == sum(b.nbytes for b in batches)  # the audit counts SQL too


def test_parameter_rows_run_once_each(loc: str) -> None:
    with connect(loc) as client:
        table = client.sql(f"SELECT run, count(*) AS n FROM {EVENTS} WHERE run = ? GROUP BY run",
                           [[8], [7], [99]])
    assert table.to_pylist() == [{"run": 8, "n": 90}, {"run": 7, "n": 120}]


# -- pushdown: only what the query names is read ------------------------------------------------


def test_a_query_opens_one_run_and_reads_one_dataset(data_root: Path) -> None:
    srv = start_server(data_root)
    try:
        with connect(f"grpc://127.0.0.1:{srv.port}") as client:
            client.sql(f'SELECT avg("gmd/energy") FROM {EVENTS} WHERE run = 7')
        opened = {r.number: r for _, r in srv.catalog._runs.values()
                  if r.experiment == LCLS2_EXP and r._handle is not None}
        assert list(opened) == [7]
        assert set(opened[7]._datasets) == {"gmd/energy"}
    finally:
        srv.shutdown()


PLAIN = [
    f'SELECT "tof/waveforms", event FROM {EVENTS} WHERE run = 7 AND event < 50',
    f'SELECT e.run, e."gmd/energy" AS energy, "pnccd/image" FROM {EVENTS} e '
    "WHERE event BETWEEN 5 AND 9 AND run IN (7, 8)",
    f"SELECT time, run FROM {EVENTS} WHERE 3 > event OR FALSE",  # not plain (OR): DuckDB
    f'SELECT "peaks/var_x", run FROM {EVENTS} WHERE run >= ? AND event = ?',
    f"SELECT event FROM {EVENTS}",
]


@pytest.mark.parametrize("query", PLAIN)
def test_plain_selections_stream_from_the_sources_with_duckdbs_result(
        loc: str, query: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="flight_server.sql.service")
    params = [8, 3] if "?" in query else None
    with connect(loc) as client:
        direct = client.sql(query, params)
        through_duckdb = client.sql(f"SELECT * FROM ({query})", params)  # not plain
    assert direct.schema == through_duckdb.schema
    keys = [(n, "ascending") for n in direct.schema.names
            if not pa.types.is_nested(direct.schema.field(n).type)]
    assert direct.sort_by(keys).equals(through_duckdb.sort_by(keys))
    streamed = [r for r in caplog.records if "streamed from the sources" in r.getMessage()]
    assert bool(streamed) == (" OR " not in query)


def test_recognised_selections() -> None:
    from flight_server.sql import direct
    from flight_server.sql.databases import DatabasePool, Limits

    pool = DatabasePool(Limits())
    try:
        def plain(query: str, params=()) -> bool:
            return direct.recognise(pool.parse(query).tree, list(params)) is not None

        assert plain(f'SELECT run, "gmd/energy" FROM {EVENTS} WHERE run = 7 AND event < 10')
        assert plain(f"SELECT event FROM {EVENTS} x WHERE x.run IN (1, 2) AND event != 4")
        assert plain(f"SELECT event FROM {EVENTS} WHERE run = ?", [7])
        for query, params in [
            (f"SELECT * FROM {EVENTS}", ()),
            (f"SELECT event + 1 FROM {EVENTS}", ()),
            (f"SELECT event FROM {EVENTS} ORDER BY event", ()),
            (f"SELECT event FROM {EVENTS} LIMIT 3", ()),
            (f"SELECT DISTINCT run FROM {EVENTS}", ()),
            (f"SELECT run, count(*) FROM {EVENTS} GROUP BY run", ()),
            (f'SELECT event FROM {EVENTS} WHERE "gmd/energy" > 1', ()),
            (f"SELECT event FROM {EVENTS} WHERE run = 7 OR event = 1", ()),
            (f"SELECT event FROM {EVENTS} WHERE run = 7.5", ()),
            (f"SELECT event FROM {EVENTS} WHERE run = ?", ["7"]),
            (f"SELECT event FROM {EVENTS} WHERE run = ?", [True]),
            (f"SELECT event FROM {LCLS2_EXP}.runs", ()),
            (f"SELECT a.event FROM {EVENTS} a, {EVENTS} b", ()),
            (f"WITH e AS (SELECT 1) SELECT event FROM {EVENTS}", ()),
            (f"SELECT other.event FROM {EVENTS} e", ()),
        ]:
            assert not plain(query, params), query
    finally:
        pool.close()


# -- clients and drivers -----------------------------------------------------------------------


def test_adbc_with_bearer_token_and_prepared_parameters(loc: str, data_root: Path) -> None:
    with adbc(loc) as conn, conn.cursor() as cur:
        cur.execute(f'SELECT event, "gmd/energy" FROM {EVENTS} WHERE run = ? AND event < ? '
                    "ORDER BY event", (7, 4))
        rows = cur.fetchall()
        assert [r[0] for r in rows] == [0, 1, 2, 3]
        np.testing.assert_array_equal([r[1] for r in rows], energies(data_root, 7)[:4])
        cur.execute(f"SELECT count(*) FROM {EVENTS}")
        assert cur.fetch_arrow_table().column(0).to_pylist() == [210]


def test_adbc_with_username_and_password(loc: str) -> None:
    with adbc(loc, username="erin", password=PASSWORD) as conn, conn.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {EVENTS}")
        assert cur.fetchall() == [(210,)]
        with pytest.raises(adbc_driver_manager.Error, match="NOT_FOUND"):
            cur.execute(f"SELECT count(*) FROM {CXI_EXP}.events")


def test_adbc_metadata(loc: str, sql_server: LclstreamServer) -> None:
    with adbc(loc) as conn:
        info = conn.adbc_get_info()
        assert info["vendor_name"] == "LCLStream Flight"
        assert conn.adbc_get_table_types() == ["TABLE"]
        objects = conn.adbc_get_objects(depth="tables").read_all().to_pylist()
        schemas = {s["db_schema_name"]: sorted(t["table_name"] for t in s["db_schema_tables"])
                   for c in objects for s in c["catalog_db_schemas"]}
        assert schemas[LCLS2_EXP] == ["events", "runs"] and CXI_EXP in schemas
        schema = conn.adbc_get_table_schema("events", db_schema_filter=LCLS2_EXP)
        assert schema.names[:2] == ["run", "event"] and "gmd/energy" in schema.names
    with adbc(loc, tmox_token(sql_server)) as conn:  # only what the caller may read
        objects = conn.adbc_get_objects(depth="db_schemas").read_all().to_pylist()
        assert [s["db_schema_name"] for c in objects for s in c["catalog_db_schemas"]] \
            == [LCLS2_EXP]


def test_polars_read_database(loc: str) -> None:
    query = f'SELECT run, avg("gmd/energy") AS mean FROM {EVENTS} GROUP BY run ORDER BY run'
    with adbc(loc) as conn:
        frame = pl.read_database(query, connection=conn)
        assert frame.shape == (2, 2) and frame["run"].to_list() == [7, 8]
        chunks = list(pl.read_database(f"SELECT event FROM {EVENTS}", connection=conn,
                                       iter_batches=True, batch_size=50))
        assert sum(c.height for c in chunks) == 210


def test_pandas_read_sql(loc: str) -> None:
    with adbc(loc) as conn:
        frame = pd.read_sql(f"SELECT run, event FROM {EVENTS} WHERE event < 3", conn)
    assert len(frame) == 6 and set(frame["run"]) == {7, 8}


def test_flightsql_dbapi(loc: str, sql_server: LclstreamServer) -> None:
    from flightsql import FlightSQLClient
    from flightsql import connect as flightsql_connect

    client = FlightSQLClient(host="127.0.0.1", port=sql_server.port, insecure=True,
                             token=admin_token())
    with flightsql_connect(client) as conn:
        cursor = conn.cursor()
        cursor.execute(f"SELECT run, count(*) FROM {EVENTS} GROUP BY run ORDER BY run")
        assert [tuple(map(int, r)) for r in cursor.fetchall()] == [(7, 120), (8, 90)]


# -- security ----------------------------------------------------------------------------------


def sql_error(loc: str, query: str, token: str | None = None) -> str:
    with adbc(loc, token) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error) as info:
            cur.execute(query)
            cur.fetchall()
    return str(info.value)


def test_unreadable_experiments_look_like_missing_ones(loc: str,
                                                       sql_server: LclstreamServer) -> None:
    token = tmox_token(sql_server)
    hidden = sql_error(loc, f"SELECT count(*) FROM {CXI_EXP}.events", token)
    missing = sql_error(loc, "SELECT count(*) FROM nosuchexp.events", token)
    assert "NOT_FOUND" in hidden and "NOT_FOUND" in missing
    assert hidden.replace(CXI_EXP, "X") == missing.replace("nosuchexp", "X")
    assert CXI_EXP not in sql_error(loc, "SELECT * FROM events", token)


def test_a_reused_database_keeps_nothing_of_its_last_user(loc: str,
                                                           sql_server: LclstreamServer) -> None:
    query = f"SELECT count(*) AS n FROM {CXI_EXP}.events"
    for _ in range(sql_server.sql.databases.keep + 1):  # every pooled database has CXI attached
        with connect(loc) as admin:
            assert admin.sql(query).to_pylist() == [{"n": 40}]
    assert "NOT_FOUND" in sql_error(loc, query, tmox_token(sql_server))
    with connect(loc, tmox_token(sql_server)) as user:
        seen = user.sql(f"SELECT schema_name || '.' || view_name FROM duckdb_views() "
                        f"WHERE (SELECT count(*) FROM {EVENTS}) > 0").column(0).to_pylist()
    assert f"{LCLS2_EXP}.events" in seen
    assert not [name for name in seen if CXI_EXP in name], seen


@pytest.mark.parametrize("query, status, phrase", [
    ("SELECT * FROM read_csv('/etc/passwd')", "INVALID_ARGUMENT", "not the server's files"),
    ("SELECT * FROM read_text('/etc/hostname')", "INVALID_ARGUMENT", "not the server's files"),
    ("SELECT * FROM glob('/*')", "INVALID_ARGUMENT", "not the server's files"),
    ("SELECT * FROM 'secrets.parquet'", "INVALID_ARGUMENT", "not the server's files"),
    ("COPY (SELECT 1) TO 'out.csv'", "INVALID_ARGUMENT", "only SELECT"),
    ("ATTACH 'other.db'", "INVALID_ARGUMENT", "only SELECT"),
    ("INSTALL httpfs", "INVALID_ARGUMENT", "only SELECT"),
    ("LOAD httpfs", "INVALID_ARGUMENT", "only SELECT"),
    ("SET enable_external_access = true", "INVALID_ARGUMENT", "only SELECT"),
    ("SET memory_limit = '100GB'", "INVALID_ARGUMENT", "only SELECT"),
    ("RESET lock_configuration", "INVALID_ARGUMENT", "only SELECT"),
    ("PRAGMA database_list", "INVALID_ARGUMENT", "only SELECT"),
    ("CREATE TABLE t AS SELECT 1", "INVALID_ARGUMENT", "only SELECT"),
    (f"DROP VIEW {EVENTS}", "INVALID_ARGUMENT", "only SELECT"),
    ("SELECT 1; SELECT 2", "INVALID_ARGUMENT", "exactly one SELECT"),
    ("SELECT 1; SET threads = 64", "INVALID_ARGUMENT", "exactly one SELECT"),
    ("-- only a comment", "INVALID_ARGUMENT", "exactly one SELECT"),
    ("SELEC 1", "INVALID_ARGUMENT", "syntax error"),
    (f"SELECT nope FROM {EVENTS}", "INVALID_ARGUMENT", "nope"),
    (f"SELECT * FROM {LCLS2_EXP}.nope", "NOT_FOUND", "nope"),
    ("SELECT CAST('abc' AS INTEGER)", "INVALID_ARGUMENT", "Conversion Error"),
])
def test_bad_and_escaping_queries_are_refused(loc: str, query: str, status: str,
                                              phrase: str) -> None:
    message = sql_error(loc, query)
    assert status in message and phrase in message, message
    with adbc(loc) as conn, conn.cursor() as cur:  # the server is still up
        cur.execute("SELECT 42")
        assert cur.fetchall() == [(42,)]


def test_wrong_parameters(loc: str) -> None:
    with adbc(loc) as conn, conn.cursor() as cur:
        with pytest.raises(adbc_driver_manager.Error, match="takes 1 parameter"):
            cur.execute(f"SELECT count(*) FROM {EVENTS} WHERE run = ?", (7, 8))
        with pytest.raises(adbc_driver_manager.Error, match="INVALID_ARGUMENT"):
            cur.execute(f"SELECT count(*) FROM {EVENTS} WHERE run = ?", ("seven",))
            cur.fetchall()


def prepare(location: str, query: str, token: str) -> bytes:
    client = raw_client(location, token)
    request = fsql.ActionCreatePreparedStatementRequest(query=query)
    [result] = list(client.do_action(flight.Action("CreatePreparedStatement",
                                                   fsql.pack(request))))
    return fsql.unpack(result.body.to_pybytes()).prepared_statement_handle


def prepared_info(location: str, handle: bytes, token: str) -> flight.FlightInfo:
    command = fsql.CommandPreparedStatementQuery(prepared_statement_handle=handle)
    return raw_client(location, token).get_flight_info(
        flight.FlightDescriptor.for_command(fsql.pack(command)))


def test_prepared_statements_belong_to_their_user(loc: str, sql_server: LclstreamServer) -> None:
    mine = tmox_token(sql_server, "erin")
    handle = prepare(loc, f"SELECT count(*) AS n FROM {EVENTS}", mine)
    info = prepared_info(loc, handle, mine)
    assert raw_client(loc, mine).do_get(info.endpoints[0].ticket).read_all()["n"][0].as_py() \
        == 210
    theirs = tmox_token(sql_server, "frank")
    with pytest.raises(pa.ArrowKeyError, match="belong to the user who prepared them"):
        prepared_info(loc, handle, theirs)
    altered_mac = handle[:-3] + (b"xyz" if handle.endswith(b"abc") else b"abc")
    for forged in (b"", b"garbage", altered_mac, handle.replace(b"count", b"COUNT")):
        with pytest.raises(pa.ArrowKeyError, match="no such statement handle"):
            prepared_info(loc, forged, mine)
    request = fsql.ActionClosePreparedStatementRequest(prepared_statement_handle=b"garbage")
    with pytest.raises(pa.ArrowKeyError):
        list(raw_client(loc, mine).do_action(flight.Action("ClosePreparedStatement",
                                                           fsql.pack(request))))


def test_query_time_limit_and_lazy_planning(loc: str) -> None:
    endless = "SELECT sum(hash(range)) FROM range(1000000000000)"
    client = raw_client(loc)
    started = time.monotonic()
    info = client.get_flight_info(flight.FlightDescriptor.for_command(
        fsql.pack(fsql.CommandStatementQuery(query=endless))))
    assert time.monotonic() - started < 2  # planned, not run: the limit is 2 s
    assert info.schema.names == ["sum(hash(\"range\"))"]
    with pytest.raises(flight.FlightTimedOutError, match="time limit of 2 s"):
        client.do_get(info.endpoints[0].ticket).read_all()
    assert "TIMEOUT" in sql_error(loc, endless)
    with connect(loc) as c:
        assert c.sql("SELECT 1 AS one").to_pylist() == [{"one": 1}]


def test_query_memory_limit(loc: str) -> None:
    message = sql_error(loc, "SELECT list(range) FROM range(200000000)")
    assert "memory limit" in message


def test_a_cancelled_stream_stops_its_query(loc: str, sql_server: LclstreamServer,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    pool = sql_server.sql.databases
    with connect(loc) as c:  # a database is in the pool to watch
        c.sql("SELECT 1")
    idle = pool.idle
    client = raw_client(loc)
    info = client.get_flight_info(flight.FlightDescriptor.for_command(
        fsql.pack(fsql.CommandStatementQuery(query="SELECT range FROM range(100000000000)"))))
    reader = client.do_get(info.endpoints[0].ticket)
    reader.read_chunk()
    assert pool.idle == idle - 1  # the query holds its database
    reader.cancel()
    deadline = time.monotonic() + 10
    while pool.idle < idle and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pool.idle == idle, "the cancelled query still holds its database"


@pytest.mark.parametrize("command", [
    fsql.CommandStatementUpdate(query="DELETE FROM x"),
    fsql.CommandGetPrimaryKeys(table="events"),
    fsql.CommandGetExportedKeys(table="events"),
    fsql.CommandStatementSubstraitPlan(),
    fsql.CommandPreparedStatementUpdate(prepared_statement_handle=b"x"),
], ids=lambda c: c.DESCRIPTOR.name)
def test_unsupported_commands_are_unimplemented(loc: str, command) -> None:
    descriptor = flight.FlightDescriptor.for_command(fsql.pack(command))
    with pytest.raises(pa.ArrowNotImplementedError, match="not supported"):
        raw_client(loc).get_flight_info(descriptor)


def test_unknown_and_malformed_flight_sql_payloads(loc: str) -> None:
    from google.protobuf import any_pb2

    client = raw_client(loc)
    unknown = any_pb2.Any(type_url=fsql.TYPE_URL_PREFIX + "CommandFromTheFuture", value=b"")
    with pytest.raises(pa.ArrowNotImplementedError):
        client.get_flight_info(flight.FlightDescriptor.for_command(unknown.SerializeToString()))
    broken = any_pb2.Any(type_url=fsql.TYPE_URL_PREFIX + "CommandStatementQuery",
                         value=b"\x0a\xff\xff")
    with pytest.raises(pa.ArrowInvalid, match="malformed Flight SQL command"):
        client.get_flight_info(flight.FlightDescriptor.for_command(broken.SerializeToString()))
    with pytest.raises(pa.ArrowNotImplementedError):
        list(client.do_action(flight.Action("BeginTransaction", fsql.pack(
            fsql.ActionBeginTransactionRequest()))))
    with pytest.raises(pa.ArrowInvalid, match="exactly one SELECT"):
        client.get_flight_info(flight.FlightDescriptor.for_command(
            fsql.pack(fsql.CommandStatementQuery(query=""))))
    writer, _ = client.do_put(flight.FlightDescriptor.for_path(LCLS2_EXP, "7"),
                              pa.schema([("x", pa.int64())]))
    with pytest.raises(pa.ArrowNotImplementedError):
        writer.close()


def test_runs_that_appear_or_vanish_are_seen_without_a_restart(data_root: Path,
                                                               tmp_path: Path) -> None:
    import shutil

    smalldata = tmp_path / LCLS2_EXP / "hdf5" / "smalldata"
    smalldata.mkdir(parents=True)
    shutil.copy(run_file(data_root, 7), smalldata)
    srv = start_server(tmp_path)
    query = f"SELECT run, count(*) AS n FROM {EVENTS} GROUP BY run ORDER BY run"
    try:
        with connect(f"grpc://127.0.0.1:{srv.port}") as client:
            assert client.sql(query).to_pylist() == [{"run": 7, "n": 120}]
            shutil.copy(run_file(data_root, 8), smalldata)
            assert client.sql(query).to_pylist() == [{"run": 7, "n": 120}, {"run": 8, "n": 90}]
            (smalldata / run_file(data_root, 7).name).unlink()
            assert client.sql(query).to_pylist() == [{"run": 8, "n": 90}]
            assert client.sql(f"SELECT run FROM {LCLS2_EXP}.runs").to_pylist() == [{"run": 8}]
    finally:
        srv.shutdown()
