"""Plain selections of events, served straight from the run sources, as DoGet serves them.

`SELECT "tof/waveforms", event FROM exp.events WHERE run = 7 AND event < 1000` needs no query
engine: it is a projection with run and event-range filters, which the sources already push
down. Through DuckDB every value would be copied into its vectors and out again, which halves
the throughput of large results (waveforms, frames). Such a query is recognised on DuckDB's own
parse tree and streamed from the sources; anything else — other filters, expressions, ORDER BY,
LIMIT, joins, `*` — goes to DuckDB. The result schema is DuckDB's, computed as for any query,
so a client cannot tell which path answered, except by the speed.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from flight_server.sql.tables import EVENT_COLUMN, RunSource
from schemas.metadata import RUN_COLUMN

INTEGER_KINDS = {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT",
                 "UINTEGER", "UBIGINT"}
COMPARISONS: dict[str, Callable[[object, object], object]] = {
    "COMPARE_EQUAL": operator.eq, "COMPARE_NOTEQUAL": operator.ne,
    "COMPARE_LESSTHAN": operator.lt, "COMPARE_GREATERTHAN": operator.gt,
    "COMPARE_LESSTHANOREQUALTO": operator.le, "COMPARE_GREATERTHANOREQUALTO": operator.ge,
}
FLIPPED = {"COMPARE_LESSTHAN": "COMPARE_GREATERTHAN", "COMPARE_GREATERTHAN": "COMPARE_LESSTHAN",
           "COMPARE_LESSTHANOREQUALTO": "COMPARE_GREATERTHANOREQUALTO",
           "COMPARE_GREATERTHANOREQUALTO": "COMPARE_LESSTHANOREQUALTO",
           "COMPARE_EQUAL": "COMPARE_EQUAL", "COMPARE_NOTEQUAL": "COMPARE_NOTEQUAL"}


class NotPlain(Exception):
    """The query is more than a plain selection: DuckDB answers it."""


@dataclass(frozen=True)
class Selection:
    schema_name: str  # the experiment as written in the query
    columns: list[str]  # source columns (or run / event), in output order
    keep_run: Callable[[int], bool]
    events: pc.Expression | None  # over `event`, pushed into each run's scan


def recognise(tree: dict, params: list[object]) -> Selection | None:
    """The selection the parse tree describes, or None if it is anything more."""
    try:
        statements = tree["statements"]
        if len(statements) != 1:
            return None
        return _selection(statements[0]["node"], params)
    except (NotPlain, KeyError, TypeError, ValueError, IndexError):
        return None


def _selection(node: dict, params: list[object]) -> Selection:
    plain = (node["type"] == "SELECT_NODE" and not node["modifiers"]
             and not node["cte_map"]["map"] and not node["group_expressions"]
             and not node["group_sets"] and node["having"] is None and node["sample"] is None
             and node["qualify"] is None and node["aggregate_handling"] == "STANDARD_HANDLING")
    table = node["from_table"]
    if not plain or table["type"] != "BASE_TABLE" or table["table_name"].lower() != "events" \
            or table["catalog_name"] or table["at_clause"] or table["sample"] \
            or table["column_name_alias"] or not table["schema_name"]:
        raise NotPlain
    qualifiers = {table["alias"].lower(), "events"} - {""}
    columns = [_column(item, qualifiers) for item in node["select_list"]]
    runs: list[Callable[[int], bool]] = []
    events: list[pc.Expression] = []
    for term in _conjuncts(node["where_clause"]):
        _constraint(term, qualifiers, params, runs, events)
    event_filter = None
    for expression in events:
        event_filter = expression if event_filter is None else event_filter & expression
    return Selection(table["schema_name"], columns, lambda r: all(f(r) for f in runs),
                     event_filter)


def _column(item: dict, qualifiers: set[str]) -> str:
    if item["class"] != "COLUMN_REF":
        raise NotPlain
    names = item["column_names"]
    if len(names) == 2 and names[0].lower() not in qualifiers or len(names) > 2:
        raise NotPlain
    return names[-1]


def _conjuncts(node: dict | None) -> list[dict]:
    if node is None:
        return []
    if node["class"] == "CONJUNCTION" and node["type"] == "CONJUNCTION_AND":
        return [t for child in node["children"] for t in _conjuncts(child)]
    return [node]


def _constraint(term: dict, qualifiers: set[str], params: list[object],
                runs: list[Callable[[int], bool]], events: list[pc.Expression]) -> None:
    kind = term["class"]
    if kind == "COMPARISON" and term["type"] in COMPARISONS:
        op, left, right = term["type"], term["left"], term["right"]
        if left["class"] != "COLUMN_REF":
            op, left, right = FLIPPED[op], right, left
        name, value = _column(left, qualifiers).lower(), _integer(right, params)
        compare = COMPARISONS[op]
        if name == RUN_COLUMN:
            runs.append(lambda r: compare(r, value))
        elif name == EVENT_COLUMN:
            events.append(compare(pc.field(EVENT_COLUMN), value))
        else:
            raise NotPlain
    elif kind == "BETWEEN":
        name = _column(term["input"], qualifiers).lower()
        low, high = _integer(term["lower"], params), _integer(term["upper"], params)
        if name == RUN_COLUMN:
            runs.append(lambda r: low <= r <= high)
        elif name == EVENT_COLUMN:
            events.append((pc.field(EVENT_COLUMN) >= low) & (pc.field(EVENT_COLUMN) <= high))
        else:
            raise NotPlain
    elif kind == "OPERATOR" and term["type"] == "COMPARE_IN":
        first, *values = term["children"]
        name = _column(first, qualifiers).lower()
        members = {_integer(v, params) for v in values}
        if name == RUN_COLUMN:
            runs.append(lambda r: r in members)
        elif name == EVENT_COLUMN:
            events.append(pc.field(EVENT_COLUMN).isin(sorted(members)))
        else:
            raise NotPlain
    else:
        raise NotPlain


def _integer(node: dict, params: list[object]) -> int:
    if node["class"] == "CONSTANT" and node["literal"]["kind"] in INTEGER_KINDS:
        return int(node["literal"]["text"])
    if node["class"] == "PARAMETER":
        value = params[int(node["identifier"]) - 1]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    raise NotPlain


def stream(selection: Selection, sources: list[RunSource],
           schema: pa.Schema) -> Iterator[pa.RecordBatch] | None:
    """The selection's batches in DuckDB's result schema, or None if a run lacks a column
    (DuckDB fills those with NULL)."""
    chosen = [s for s in sources if selection.keep_run(s.run.number)]
    wanted = [c.lower() for c in selection.columns]
    for source in chosen:
        if not set(wanted) <= {n.lower() for n in source.schema.names} | {RUN_COLUMN}:
            return None
    return _batches(chosen, wanted, selection.events, schema)


def _batches(sources: list[RunSource], wanted: list[str], events: pc.Expression | None,
             schema: pa.Schema) -> Iterator[pa.RecordBatch]:
    for source in sources:
        by_lower = {n.lower(): n for n in source.schema.names}
        scanned = list(dict.fromkeys(by_lower[w] for w in wanted if w != RUN_COLUMN)) \
            or [EVENT_COLUMN]
        run = pa.scalar(source.run.number, pa.int32())
        for batch in source.scanner(columns=scanned, filter=events).to_reader():
            arrays = [pa.repeat(run, batch.num_rows) if w == RUN_COLUMN
                      else batch.column(scanned.index(by_lower[w])) for w in wanted]
            yield pa.RecordBatch.from_arrays(
                [a.cast(f.type) for a, f in zip(arrays, schema, strict=True)], schema=schema)
