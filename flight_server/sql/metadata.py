"""Flight SQL's catalog commands: what BI tools and drivers ask before they query.

Experiments are schemas; each has the tables `events` and `runs`. There is no catalog level
(GetCatalogs is empty and catalog_name is null), as a driver expects from a server whose tables
are named `schema.table`.
"""

from __future__ import annotations

import re

import pyarrow as pa

import schemas.flight_sql as fsql
from flight_server.errors import InvalidArgument
from flight_server.sql.engine import TABLES

TABLE_TYPE = "TABLE"
SERVER_NAME = "LCLStream Flight"


MAX_PATTERN_CHARS = 1024  # names are at most 128 characters; a longer pattern is a mistake


class Like:
    """A SQL LIKE pattern (% any run, _ any one character, \\ escapes), matched without
    backtracking across %: the pattern is cut at each % into segments of fixed length, the
    first anchored at the start, the last at the end, and each one between found at its
    leftmost place after the one before (which is optimal for these patterns). A translation
    to one regular expression (% -> .*) backtracks exponentially on patterns such as
    "%%...%Z", holding the GIL, and every other call waits."""

    def __init__(self, pattern: str | None) -> None:
        self.segments: list[re.Pattern[str]] | None = None
        if pattern is None:
            return
        if len(pattern) > MAX_PATTERN_CHARS:
            raise InvalidArgument(f"a name pattern is at most {MAX_PATTERN_CHARS} characters; "
                                  f"got {len(pattern)}")
        parts: list[list[str]] = [[]]
        escaped = False
        for ch in pattern:
            if escaped or ch not in "\\%_":
                parts[-1].append(re.escape(ch))
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == "%":
                parts.append([])
            else:
                parts[-1].append(".")
        if escaped:  # a trailing escape stands for itself
            parts[-1].append(re.escape("\\"))
        # Consecutive % are one %: drop the empty segments between them.
        parts = [parts[0], *(p for p in parts[1:-1] if p), parts[-1]] if len(parts) > 1 \
            else parts
        self.lengths = [len(p) for p in parts]  # each piece matches exactly one character
        self.segments = [re.compile("".join(p), re.DOTALL) for p in parts]

    def fullmatch(self, text: str) -> bool:
        if self.segments is None:
            return True
        if len(self.segments) == 1:
            return self.segments[0].fullmatch(text) is not None
        if sum(self.lengths) > len(text) or not self.segments[0].match(text):
            return False
        position, end = self.lengths[0], len(text) - self.lengths[-1]
        for segment in self.segments[1:-1]:
            found = segment.search(text, position, end)
            if found is None:
                return False
            position = found.end()
        return self.segments[-1].fullmatch(text, end) is not None


def catalogs() -> pa.Table:
    return fsql.GET_CATALOGS_SCHEMA.empty_table()


def db_schemas(experiments: list[str], pattern: str | None) -> pa.Table:
    match = Like(pattern)
    names = [e for e in experiments if match.fullmatch(e)]
    return pa.table({"catalog_name": pa.nulls(len(names), pa.string()),
                     "db_schema_name": names}, schema=fsql.GET_DB_SCHEMAS_SCHEMA)


def tables(experiments: list[str], schema_pattern: str | None, table_pattern: str | None,
           table_types: list[str], table_schemas: dict[str, pa.Schema] | None,
           live: dict[str, list[str]] | None = None) -> pa.Table:
    """`table_schemas` maps "experiment.table" to its Arrow schema when include_schema is set;
    `live` an experiment to its live streams' tables ("live/<stream>")."""
    schema_match, table_match = Like(schema_pattern), Like(table_pattern)
    wanted_type = not table_types or TABLE_TYPE in table_types
    rows = [(e, t) for e in experiments if schema_match.fullmatch(e) and wanted_type
            for t in [*TABLES, *(live or {}).get(e, [])] if table_match.fullmatch(t)]
    columns = {
        "catalog_name": pa.nulls(len(rows), pa.string()),
        "db_schema_name": [e for e, _ in rows],
        "table_name": [t for _, t in rows],
        "table_type": [TABLE_TYPE] * len(rows),
    }
    if table_schemas is None:
        return pa.table(columns, schema=fsql.GET_TABLES_SCHEMA)
    columns["table_schema"] = [table_schemas[f"{e}.{t}"].serialize().to_pybytes()
                               for e, t in rows]
    return pa.table(columns, schema=fsql.GET_TABLES_SCHEMA_WITH_SCHEMA)


def table_types() -> pa.Table:
    return pa.table({"table_type": [TABLE_TYPE]}, schema=fsql.GET_TABLE_TYPES_SCHEMA)


# -- GetSqlInfo ------------------------------------------------------------------------------

# value union members, in the order of the spec's dense union
STRING, BOOL, BIGINT, BITMASK, STRING_LIST = range(5)


NO_TRANSACTIONS = fsql.SqlSupportedTransaction.SQL_SUPPORTED_TRANSACTION_NONE


def _server_info(version: str) -> dict[int, tuple[int, object]]:
    info = fsql.SqlInfo
    return {
        info.FLIGHT_SQL_SERVER_NAME: (STRING, SERVER_NAME),
        info.FLIGHT_SQL_SERVER_VERSION: (STRING, version),
        info.FLIGHT_SQL_SERVER_ARROW_VERSION: (STRING, pa.__version__),
        info.FLIGHT_SQL_SERVER_READ_ONLY: (BOOL, True),
        info.FLIGHT_SQL_SERVER_SQL: (BOOL, True),
        info.FLIGHT_SQL_SERVER_SUBSTRAIT: (BOOL, False),
        info.FLIGHT_SQL_SERVER_TRANSACTION: (BITMASK, int(NO_TRANSACTIONS)),
        info.FLIGHT_SQL_SERVER_CANCEL: (BOOL, False),
        info.FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT: (BITMASK, 0),
        info.SQL_DDL_CATALOG: (BOOL, False),
        info.SQL_DDL_SCHEMA: (BOOL, False),
        info.SQL_DDL_TABLE: (BOOL, False),
        info.SQL_IDENTIFIER_QUOTE_CHAR: (STRING, '"'),
        info.SQL_ALL_TABLES_ARE_SELECTABLE: (BOOL, True),
        info.SQL_SEARCH_STRING_ESCAPE: (STRING, "\\"),
        info.SQL_SCHEMA_TERM: (STRING, "experiment"),
        info.SQL_CATALOG_TERM: (STRING, "catalog"),
        info.SQL_TRANSACTIONS_SUPPORTED: (BOOL, False),
    }


def sql_info(requested: list[int], version: str) -> pa.Table:
    """The requested SqlInfo ids we know (all of them if none are named); unknown ids are left
    out, as the spec allows."""
    known = _server_info(version)
    ids = [i for i in (requested or list(known)) if i in known]
    union_type = fsql.GET_SQL_INFO_SCHEMA.field("value").type
    by_member: list[list[object]] = [[] for _ in range(union_type.num_fields)]
    type_codes, offsets = [], []
    for i in ids:
        member, value = known[i]
        type_codes.append(member)
        offsets.append(len(by_member[member]))
        by_member[member].append(value)
    children = [pa.array(values, type=union_type.field(m).type)
                for m, values in enumerate(by_member)]
    # from_buffers, not UnionArray.from_dense: that cannot make the spec's non-nullable members
    value = pa.Array.from_buffers(
        union_type, len(ids),
        [None, pa.array(type_codes, pa.int8()).buffers()[1],
         pa.array(offsets, pa.int32()).buffers()[1]],
        children=children)
    return pa.Table.from_arrays([pa.array(ids, pa.uint32()), value],
                                schema=fsql.GET_SQL_INFO_SCHEMA)


# -- GetXdbcTypeInfo -------------------------------------------------------------------------

# (DuckDB name, XDBC type, column size, literal prefix/suffix, case sensitive, unsigned)
_TYPES = [
    ("BOOLEAN", "XDBC_BIT", 1, None, False, None),
    ("TINYINT", "XDBC_TINYINT", 3, None, False, False),
    ("SMALLINT", "XDBC_SMALLINT", 5, None, False, False),
    ("INTEGER", "XDBC_INTEGER", 10, None, False, False),
    ("BIGINT", "XDBC_BIGINT", 19, None, False, False),
    ("FLOAT", "XDBC_FLOAT", 24, None, False, False),
    ("DOUBLE", "XDBC_DOUBLE", 53, None, False, False),
    ("VARCHAR", "XDBC_VARCHAR", None, "'", True, None),
    ("BLOB", "XDBC_VARBINARY", None, "'", False, None),
    ("DATE", "XDBC_DATE", 10, "'", False, None),
    ("TIMESTAMP", "XDBC_TIMESTAMP", 29, "'", False, None),
    ("TIMESTAMP WITH TIME ZONE", "XDBC_TIMESTAMP", 35, "'", False, None),
]


def xdbc_type_info(data_type: int | None) -> pa.Table:
    schema = fsql.GET_XDBC_TYPE_INFO_SCHEMA
    rows = []
    for name, xdbc, size, quote, case_sensitive, unsigned in _TYPES:
        code = int(fsql.XdbcDataType[xdbc])
        if data_type is not None and code != data_type:
            continue
        rows.append({
            "type_name": name, "data_type": code, "column_size": size,
            "literal_prefix": quote, "literal_suffix": quote, "create_params": None,
            "nullable": int(fsql.Nullable.NULLABILITY_NULLABLE), "case_sensitive": case_sensitive,
            "searchable": int(fsql.Searchable.SEARCHABLE_FULL), "unsigned_attribute": unsigned,
            "fixed_prec_scale": False, "auto_increment": None, "local_type_name": name,
            "minimum_scale": None, "maximum_scale": None, "sql_data_type": code,
            "datetime_subcode": None, "num_prec_radix": None, "interval_precision": None,
        })
    return pa.Table.from_pylist(rows, schema=schema)
