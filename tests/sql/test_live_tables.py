"""Live streams as SQL tables: `<experiment>."live/<stream>"` holds the events the stream holds
when the query starts; an ended stream is a run (in `events`) and no longer a live table; a
caller who may not read the experiment sees no such table."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest

from clients import Client, connect
from flight_server.generator import generate_lcls2_run
from flight_server.security.grants import Grants
from flight_server.server import LclstreamServer
from tests.helpers import LCLS2_EXP, adbc, events, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LclstreamServer]:
    """A server of its own: ending a stream adds a run, which the shared data root must not
    get."""
    root = tmp_path_factory.mktemp("live-sql")
    generate_lcls2_run(root / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run0001.h5", 1,
                       n_events=10)
    srv = start_server(root)
    yield srv
    srv.shutdown()


@pytest.fixture
def location(server: LclstreamServer) -> str:
    return f"grpc://127.0.0.1:{server.port}"


@pytest.fixture
def client(location: str) -> Iterator[Client]:
    with connect(location) as c:
        yield c


def test_a_live_stream_is_a_table_that_grows(client: Client, location: str) -> None:
    query = f'SELECT count(*) AS n, sum("gmd/energy") AS e FROM {LCLS2_EXP}."live/sql-grows"'
    with client.producer(LCLS2_EXP, "sql-grows") as producer:
        producer.send(events(0, 30))
        producer.flush()
        first = client.sql(query).to_pylist()[0]
        producer.send(events(30, 20))
        producer.flush()
        second = client.sql(query).to_pylist()[0]
    assert first == {"n": 30, "e": float(np.arange(30).sum() * 0.5)}
    assert second == {"n": 50, "e": float(np.arange(50).sum() * 0.5)}
    with adbc(location) as conn, conn.cursor() as cur:  # the same through a BI tool's driver
        cur.execute(f'SELECT max("gmd/energy") FROM {LCLS2_EXP}."live/sql-grows"')
        assert cur.fetchone() == (24.5,)

    client.end_run(LCLS2_EXP, "sql-grows")  # now a run: in `events`, not a live table
    with pytest.raises(pa.ArrowKeyError, match="live/sql-grows"):
        client.sql(query)


def test_only_readers_of_the_experiment_see_its_live_tables(client: Client,
                                                            server: LclstreamServer,
                                                            location: str) -> None:
    with client.producer(LCLS2_EXP, "sql-private") as producer:
        producer.send(events(0, 5))
    outsider = server.security.minter.mint("olga", Grants.build(read=["other*"]), 600)
    with connect(location, outsider) as theirs:
        with pytest.raises(pa.ArrowKeyError) as refused:
            theirs.sql(f'SELECT count(*) FROM {LCLS2_EXP}."live/sql-private"')
        with pytest.raises(pa.ArrowKeyError) as missing:
            theirs.sql('SELECT count(*) FROM nosuchexp."live/sql-private"')
    for exc in (refused.value, missing.value):  # as if it did not exist
        assert "does not exist because schema" in str(exc)
    assert client.sql(f'SELECT count(*) AS n FROM {LCLS2_EXP}."live/sql-private"') \
        .column("n").to_pylist() == [5]


def test_live_tables_are_listed_for_bi_tools(client: Client, location: str) -> None:
    with client.producer(LCLS2_EXP, "sql-listed") as producer:
        producer.send(events(0, 3))
    with adbc(location) as conn:
        objects = conn.adbc_get_objects(depth="tables", db_schema_filter=LCLS2_EXP).read_all()
        tables = [t["table_name"] for c in objects.to_pylist() for s in c["catalog_db_schemas"]
                  for t in s["db_schema_tables"]]
        assert "live/sql-listed" in tables
        schema = conn.adbc_get_table_schema("live/sql-listed", db_schema_filter=LCLS2_EXP)
        assert "gmd/energy" in schema.names


def test_a_stream_larger_than_a_query_may_hold_is_refused_with_advice(tmp_path) -> None:
    generate_lcls2_run(tmp_path / LCLS2_EXP / "hdf5" / "smalldata" / f"{LCLS2_EXP}_Run0001.h5",
                       1, n_events=10)
    small = start_server(tmp_path, sql_memory_limit="1MB")
    try:
        with connect(f"grpc://127.0.0.1:{small.port}") as c:
            with c.producer(LCLS2_EXP, "sql-big") as producer:
                producer.send(events(0, 2000, width=512))  # ~4 MiB
            with pytest.raises(pa.ArrowInvalid, match="more than a query may hold.*subscribe"):
                c.sql(f'SELECT count(*) FROM {LCLS2_EXP}."live/sql-big"')
            # Streams a query does not name are not read at all.
            assert c.sql(f"SELECT count(*) AS n FROM {LCLS2_EXP}.events") \
                .column("n").to_pylist() == [10]
    finally:
        small.shutdown()
