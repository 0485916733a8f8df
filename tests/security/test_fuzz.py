"""Property-based fuzzing of everything that decodes what a client sends.

Each target either succeeds or raises its typed error; through the server, every call either
succeeds or fails with a status a client can act on (never INTERNAL), and the server answers
the next call. `make test` runs a bounded number of cases per target; `make fuzz` runs many.
"""

from __future__ import annotations

import json
import string

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2
from hypothesis import assume, example, given
from hypothesis import strategies as st

import schemas.flight_sql as fsql
from flight_server.errors import InvalidArgument
from flight_server.processing.filters import parse_filter
from flight_server.security.client_data import validated
from flight_server.server import LclstreamServer
from schemas import RequestError, parse_request, parse_ticket
from schemas.json_input import loads
from schemas.live import ProducerMeta, parse_subscription
from tests.helpers import LCLS2_EXP, raw_client, start_server

# The statuses a client can act on. INTERNAL (FlightInternalError) and UNKNOWN are bugs.
TYPED = (pa.ArrowInvalid, pa.ArrowKeyError, pa.ArrowNotImplementedError,
         flight.FlightUnauthorizedError, flight.FlightUnauthenticatedError)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=40)

KEYS = ["v", "experiment", "runs", "columns", "events", "filter", "processing", "stream", "from",
        "group", "member", "run", "start", "stop", "step", "producer", "seq", "retention"]
shaped_documents = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 2, "1", 1.0])},
    optional={k: json_values | st.sampled_from([LCLS2_EXP, 7, [7], ["gmd/energy"], "s"])
              for k in KEYS if k != "v"})
texts = st.text(max_size=300) | st.binary(max_size=300).map(lambda b: b.decode("latin-1"))


def documents() -> st.SearchStrategy[bytes]:
    """JSON documents near ours, random JSON, and text that is not JSON at all."""
    return st.one_of(shaped_documents.map(lambda d: json.dumps(d).encode()),
                     json_values.map(lambda d: json.dumps(d).encode()),
                     texts.map(str.encode), st.binary(max_size=300),
                     st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n))


# -- decoders, in process ------------------------------------------------------------------------


@given(documents())
def test_json_decoders_raise_only_request_errors(raw: bytes) -> None:
    for decode in (lambda r: loads(r, "document"), parse_request, parse_ticket,
                   parse_subscription, ProducerMeta.decode):
        try:
            decode(raw)
        except RequestError:
            pass


FILTER_WORDS = ["gmd/energy", "evr/code_40", "run", "time", "and", "or", "not", "between", "in",
                "is", "null", "(", ")", ",", "=", "!=", "<", ">=", "1", "-2.5e3", "'x'", "true",
                "1e400", "9" * 30, "\"gmd/energy\"", "tof/waveforms", "%", "'", "\\"]


@given(st.lists(st.sampled_from(FILTER_WORDS), max_size=25).map(" ".join) | texts)
def test_the_filter_parser_raises_only_filter_errors(text: str) -> None:
    schema = pa.schema({"gmd/energy": pa.float64(), "evr/code_40": pa.int32(), "run": pa.int32(),
                        "time": pa.timestamp("ns", "UTC"),
                        "tof/waveforms": pa.list_(pa.float32(), 4)})
    try:
        parse_filter(text, schema)
    except InvalidArgument:
        pass


def sql_commands() -> st.SearchStrategy[bytes]:
    names = sorted(fsql.MESSAGES)
    valid = st.sampled_from(names).map(lambda n: fsql.pack(fsql.MESSAGES[n]()))
    mutated = st.tuples(valid, st.binary(max_size=40), st.integers(0, 200)).map(
        lambda t: t[0][:t[2]] + t[1] + t[0][t[2]:])
    url = st.text(max_size=40).map(lambda n: any_pb2.Any(
        type_url=fsql.TYPE_URL_PREFIX + n, value=b"\x08\x01").SerializeToString())
    return st.one_of(valid, mutated, url, st.binary(max_size=200))


@given(sql_commands())
def test_flight_sql_unpacking_raises_only_its_errors(raw: bytes) -> None:
    try:
        fsql.unpack(raw)
    except (fsql.UnknownCommand, fsql.MalformedCommand):
        pass


# -- Arrow data sent by clients ----------------------------------------------------------------

TYPES = [pa.int8(), pa.uint16(), pa.int64(), pa.float32(), pa.string(), pa.binary(),
         pa.binary_view(), pa.string_view(), pa.list_(pa.float32()), pa.list_(pa.uint16(), 3),
         pa.large_string()]


def sample(kind: pa.DataType, n: int) -> pa.Array:
    rng = np.random.default_rng(n)
    if pa.types.is_list(kind) or pa.types.is_fixed_size_list(kind):
        values = [[float(v) for v in rng.integers(0, 9, 3 if pa.types.is_fixed_size_list(kind)
                                                   else int(rng.integers(0, 4)))]
                  for _ in range(n)]
        return pa.array(values, kind)
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return pa.array(rng.integers(0, 100, n), kind)
    return pa.array([f"v{i}" * (i % 5) for i in range(n)], kind)


@st.composite
def mutated_batches(draw: st.DrawFn) -> pa.RecordBatch:
    """A valid batch whose buffers are then edited byte by byte, as an attacker would."""
    kind = draw(st.sampled_from(TYPES))
    array = sample(kind, draw(st.integers(1, 20)))
    buffers = [b for b in array.buffers()]
    index = draw(st.integers(0, len(buffers) - 1))
    assume(buffers[index] is not None and buffers[index].size > 0)
    data = bytearray(buffers[index].to_pybytes())
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    buffers[index] = pa.py_buffer(bytes(data))
    try:  # from_buffers makes Arrow's cheap checks; what passes them is what the wire carries
        children = [array.values] if array.type.num_fields else None
        if children is not None:
            cut = 2 if pa.types.is_list(kind) else 1
            mutated = pa.Array.from_buffers(kind, len(array), buffers[:cut], children=children)
        else:
            mutated = pa.Array.from_buffers(kind, len(array), buffers)
    except (pa.ArrowInvalid, pa.ArrowIndexError, ValueError):
        assume(False)
    return pa.record_batch([mutated], names=["c"])


@given(mutated_batches())
def test_validation_refuses_or_passes_and_passes_only_readable_data(batch: pa.RecordBatch
                                                                    ) -> None:
    try:
        validated(batch, "the batch")
    except InvalidArgument:
        return
    batch.column(0).to_pylist()  # what validation passes, kernels may read in full


# -- through the server --------------------------------------------------------------------------


def server_answers(client: flight.FlightClient) -> None:
    assert [a.type for a in client.list_actions()]


def typed_or_ok(call) -> None:
    try:
        call()
    except TYPED:
        pass
    except flight.FlightError as exc:  # pragma: no cover - the failure being hunted
        pytest.fail(f"untyped error {type(exc).__name__}: {str(exc)[:300]}")


@pytest.fixture(scope="module")
def fuzz_client(server: LclstreamServer):
    client = raw_client(server.port)
    yield client
    client.close()


@given(documents())
def test_descriptors_get_a_typed_answer(fuzz_client: flight.FlightClient, raw: bytes) -> None:
    descriptor = flight.FlightDescriptor.for_command(raw)
    typed_or_ok(lambda: fuzz_client.get_flight_info(descriptor))
    typed_or_ok(lambda: fuzz_client.get_schema(descriptor))
    server_answers(fuzz_client)


@given(st.lists(texts.map(str.encode) | st.sampled_from([b"7", b"live", LCLS2_EXP.encode()]),
                max_size=4))
def test_paths_get_a_typed_answer(fuzz_client: flight.FlightClient, parts: list[bytes]) -> None:
    typed_or_ok(lambda: fuzz_client.get_flight_info(flight.FlightDescriptor.for_path(*parts)))
    server_answers(fuzz_client)


@given(documents() | sql_commands())
def test_tickets_get_a_typed_answer(fuzz_client: flight.FlightClient, raw: bytes) -> None:
    typed_or_ok(lambda: fuzz_client.do_get(flight.Ticket(raw)).read_all())
    server_answers(fuzz_client)


@example(action="CreatePreparedStatement",  # found by this fuzzer: a type URL naming nothing
         body=b"\n.type.googleapis.com/arrow.flight.protocol.sql.\x12\x02\x01\x08")
@given(st.sampled_from(["commit", "end_run", "streams", "experiments", "whoami",
                        "CreatePreparedStatement", "ClosePreparedStatement", "nosuch"]),
       documents() | sql_commands())
def test_actions_get_a_typed_answer(fuzz_client: flight.FlightClient, action: str,
                                    body: bytes) -> None:
    typed_or_ok(lambda: list(fuzz_client.do_action(flight.Action(action, body))))
    server_answers(fuzz_client)


@given(st.text(alphabet=string.printable, max_size=200) | st.sampled_from([
    f'SELECT * FROM {LCLS2_EXP}.events WHERE "gmd/energy" > 1', "SELECT 1",
    "SELECT * FROM glob('*')", "SELECT " + "(" * 500 + "1" + ")" * 500]))
@example(query="CONNECT")  # found by this fuzzer: a statement DuckDB's Python enum does not know
def test_sql_queries_get_a_typed_answer(fuzz_client: flight.FlightClient, query: str) -> None:
    command = fsql.pack(fsql.CommandStatementQuery(query=query))
    descriptor = flight.FlightDescriptor.for_command(command)
    typed_or_ok(lambda: fuzz_client.get_flight_info(descriptor))
    server_answers(fuzz_client)


@pytest.fixture(scope="module")
def producer_client(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("fuzz-live")
    (root / LCLS2_EXP).mkdir()
    server = start_server(root)
    client = raw_client(server.port)
    yield client
    client.close()
    server.shutdown()


@given(documents(), mutated_batches() | st.just(None))
def test_producers_get_a_typed_answer(producer_client: flight.FlightClient, meta: bytes,
                                      batch: pa.RecordBatch | None) -> None:
    if batch is None:
        batch = pa.record_batch({"gmd/energy": pa.array([0.5, 1.5])})
    descriptor = flight.FlightDescriptor.for_path(LCLS2_EXP, "live", "fuzz")

    def produce() -> None:
        writer, _ = producer_client.do_put(descriptor, batch.schema)
        try:
            writer.write_with_metadata(batch, pa.py_buffer(meta))
            writer.done_writing()
        finally:
            writer.close()

    typed_or_ok(produce)
    server_answers(producer_client)
