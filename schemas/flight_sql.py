"""Flight SQL protocol messages, constants and result schemas.

The message classes are built at import time from a `FileDescriptorProto` written here, field by
field, from the Flight SQL specification (Apache Arrow `format/FlightSql.proto`, package
`arrow.flight.protocol.sql`). Building them with the protobuf runtime keeps the project free of a
protoc/codegen step and of a checked-in generated module that must track the runtime's version.

The descriptors live in a private `DescriptorPool`, not the default one: any other Flight SQL
module in the same process (a generated `_pb2` from a client library, say) registers the same full
names in the default pool, and two definitions of one name there would conflict.

Wire compatibility is what matters and is what the tests check against an independently generated
copy: the same field names, numbers, types, labels and proto3 `optional` presence. Commands travel
as a serialized `google.protobuf.Any` whose type URL is `TYPE_URL_PREFIX` + message name.
"""

from __future__ import annotations

from enum import IntEnum

import pyarrow as pa
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError, Message

PACKAGE = "arrow.flight.protocol.sql"
TYPE_URL_PREFIX = f"type.googleapis.com/{PACKAGE}."

# ---------------------------------------------------------------------------------------------
# Message table: name -> fields, plus nested enums and messages where the spec has them.
# A field is (name, number, type, flag). Types are proto scalar names, "message:<Name>" or
# "enum:<Name>" (relative to the package), or "map<string,string>". Flags: "" (singular, no
# presence), "optional" (proto3 optional: explicit presence) or "repeated".
# ---------------------------------------------------------------------------------------------

_Field = tuple[str, int, str, str]
_EnumValues = list[tuple[str, int]]

_OPT, _REP = "optional", "repeated"
_TDO = "CommandStatementIngest.TableDefinitionOptions"

_CATALOG_SCHEMA_TABLE: list[_Field] = [
    ("catalog", 1, "string", _OPT),
    ("db_schema", 2, "string", _OPT),
    ("table", 3, "string", ""),
]

_MESSAGES: dict[str, list[_Field]] = {
    # Metadata commands (FlightDescriptor.cmd for GetFlightInfo / GetSchema).
    "CommandGetSqlInfo": [("info", 1, "uint32", _REP)],
    "CommandGetXdbcTypeInfo": [("data_type", 1, "int32", _OPT)],
    "CommandGetCatalogs": [],
    "CommandGetDbSchemas": [
        ("catalog", 1, "string", _OPT),
        ("db_schema_filter_pattern", 2, "string", _OPT),
    ],
    "CommandGetTables": [
        ("catalog", 1, "string", _OPT),
        ("db_schema_filter_pattern", 2, "string", _OPT),
        ("table_name_filter_pattern", 3, "string", _OPT),
        ("table_types", 4, "string", _REP),
        ("include_schema", 5, "bool", ""),
    ],
    "CommandGetTableTypes": [],
    "CommandGetPrimaryKeys": _CATALOG_SCHEMA_TABLE,
    "CommandGetExportedKeys": _CATALOG_SCHEMA_TABLE,
    "CommandGetImportedKeys": _CATALOG_SCHEMA_TABLE,
    "CommandGetCrossReference": [
        ("pk_catalog", 1, "string", _OPT),
        ("pk_db_schema", 2, "string", _OPT),
        ("pk_table", 3, "string", ""),
        ("fk_catalog", 4, "string", _OPT),
        ("fk_db_schema", 5, "string", _OPT),
        ("fk_table", 6, "string", ""),
    ],
    # Actions (DoAction bodies and results).
    "ActionCreatePreparedStatementRequest": [
        ("query", 1, "string", ""),
        ("transaction_id", 2, "bytes", _OPT),
    ],
    "SubstraitPlan": [("plan", 1, "bytes", ""), ("version", 2, "string", "")],
    "ActionCreatePreparedSubstraitPlanRequest": [
        ("plan", 1, "message:SubstraitPlan", ""),
        ("transaction_id", 2, "bytes", _OPT),
    ],
    "ActionCreatePreparedStatementResult": [
        ("prepared_statement_handle", 1, "bytes", ""),
        ("dataset_schema", 2, "bytes", ""),
        ("parameter_schema", 3, "bytes", ""),
    ],
    "ActionClosePreparedStatementRequest": [("prepared_statement_handle", 1, "bytes", "")],
    "ActionBeginTransactionRequest": [],
    "ActionBeginSavepointRequest": [("transaction_id", 1, "bytes", ""), ("name", 2, "string", "")],
    "ActionBeginTransactionResult": [("transaction_id", 1, "bytes", "")],
    "ActionBeginSavepointResult": [("savepoint_id", 1, "bytes", "")],
    "ActionEndTransactionRequest": [
        ("transaction_id", 1, "bytes", ""),
        ("action", 2, "enum:ActionEndTransactionRequest.EndTransaction", ""),
    ],
    "ActionEndSavepointRequest": [
        ("savepoint_id", 1, "bytes", ""),
        ("action", 2, "enum:ActionEndSavepointRequest.EndSavepoint", ""),
    ],
    # Query execution.
    "CommandStatementQuery": [("query", 1, "string", ""), ("transaction_id", 2, "bytes", _OPT)],
    "CommandStatementSubstraitPlan": [
        ("plan", 1, "message:SubstraitPlan", ""),
        ("transaction_id", 2, "bytes", _OPT),
    ],
    "TicketStatementQuery": [("statement_handle", 1, "bytes", "")],
    "CommandPreparedStatementQuery": [("prepared_statement_handle", 1, "bytes", "")],
    "CommandStatementUpdate": [("query", 1, "string", ""), ("transaction_id", 2, "bytes", _OPT)],
    "CommandPreparedStatementUpdate": [("prepared_statement_handle", 1, "bytes", "")],
    "CommandStatementIngest": [
        ("table_definition_options", 1, f"message:{_TDO}", ""),
        ("table", 2, "string", ""),
        ("schema", 3, "string", _OPT),
        ("catalog", 4, "string", _OPT),
        ("temporary", 5, "bool", ""),
        ("transaction_id", 6, "bytes", _OPT),
        ("options", 1000, "map<string,string>", ""),
    ],
    "DoPutUpdateResult": [("record_count", 1, "int64", "")],
    "DoPutPreparedStatementResult": [("prepared_statement_handle", 1, "bytes", _OPT)],
    # Deprecated since Arrow 13 (CancelFlightInfo replaces them); kept for old clients.
    "ActionCancelQueryRequest": [("info", 1, "bytes", "")],
    "ActionCancelQueryResult": [("result", 1, "enum:ActionCancelQueryResult.CancelResult", "")],
}

_NESTED_ENUMS: dict[str, dict[str, _EnumValues]] = {
    "ActionEndTransactionRequest": {
        "EndTransaction": [
            ("END_TRANSACTION_UNSPECIFIED", 0),
            ("END_TRANSACTION_COMMIT", 1),
            ("END_TRANSACTION_ROLLBACK", 2),
        ],
    },
    "ActionEndSavepointRequest": {
        "EndSavepoint": [
            ("END_SAVEPOINT_UNSPECIFIED", 0),
            ("END_SAVEPOINT_RELEASE", 1),
            ("END_SAVEPOINT_ROLLBACK", 2),
        ],
    },
    "ActionCancelQueryResult": {
        "CancelResult": [
            ("CANCEL_RESULT_UNSPECIFIED", 0),
            ("CANCEL_RESULT_CANCELLED", 1),
            ("CANCEL_RESULT_CANCELLING", 2),
            ("CANCEL_RESULT_NOT_CANCELLABLE", 3),
        ],
    },
}

# CommandStatementIngest.TableDefinitionOptions, with its own two nested enums.
_TABLE_DEFINITION_OPTIONS: list[_Field] = [
    ("if_not_exist", 1, f"enum:{_TDO}.TableNotExistOption", ""),
    ("if_exists", 2, f"enum:{_TDO}.TableExistsOption", ""),
]
_TABLE_DEFINITION_ENUMS: dict[str, _EnumValues] = {
    "TableNotExistOption": [
        ("TABLE_NOT_EXIST_OPTION_UNSPECIFIED", 0),
        ("TABLE_NOT_EXIST_OPTION_CREATE", 1),
        ("TABLE_NOT_EXIST_OPTION_FAIL", 2),
    ],
    "TableExistsOption": [
        ("TABLE_EXISTS_OPTION_UNSPECIFIED", 0),
        ("TABLE_EXISTS_OPTION_FAIL", 1),
        ("TABLE_EXISTS_OPTION_APPEND", 2),
        ("TABLE_EXISTS_OPTION_REPLACE", 3),
    ],
}

_DEPRECATED = {"ActionCancelQueryRequest", "ActionCancelQueryResult"}

_FDP = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    "string": _FDP.TYPE_STRING,
    "bytes": _FDP.TYPE_BYTES,
    "bool": _FDP.TYPE_BOOL,
    "int32": _FDP.TYPE_INT32,
    "int64": _FDP.TYPE_INT64,
    "uint32": _FDP.TYPE_UINT32,
}


def _enum(name: str, values: _EnumValues) -> descriptor_pb2.EnumDescriptorProto:
    proto = descriptor_pb2.EnumDescriptorProto(name=name)
    for value_name, number in values:
        proto.value.add(name=value_name, number=number)
    return proto


def _message(
    name: str,
    fields: list[_Field],
    enums: dict[str, _EnumValues] | None = None,
    nested: list[descriptor_pb2.DescriptorProto] | None = None,
) -> descriptor_pb2.DescriptorProto:
    """One message as protoc would describe it (synthetic oneofs for proto3 `optional`)."""
    proto = descriptor_pb2.DescriptorProto(name=name)
    proto.nested_type.extend(nested or [])
    for enum_name, values in (enums or {}).items():
        proto.enum_type.append(_enum(enum_name, values))
    for field_name, number, kind, flag in fields:
        field = proto.field.add(name=field_name, number=number)
        field.label = _FDP.LABEL_REPEATED if flag == _REP else _FDP.LABEL_OPTIONAL
        if kind in _SCALARS:
            field.type = _SCALARS[kind]
        elif kind == "map<string,string>":
            # A map is a repeated field of a nested `<Name>Entry` message marked map_entry.
            entry = _message(f"{field_name.title().replace('_', '')}Entry",
                             [("key", 1, "string", ""), ("value", 2, "string", "")])
            entry.options.map_entry = True
            proto.nested_type.append(entry)
            field.label = _FDP.LABEL_REPEATED
            field.type = _FDP.TYPE_MESSAGE
            field.type_name = f".{PACKAGE}.{name}.{entry.name}"
        else:
            category, _, type_name = kind.partition(":")
            field.type = _FDP.TYPE_MESSAGE if category == "message" else _FDP.TYPE_ENUM
            field.type_name = f".{PACKAGE}.{type_name}"
        if flag == _OPT:
            field.proto3_optional = True
            field.oneof_index = len(proto.oneof_decl)
            proto.oneof_decl.add(name=f"_{field_name}")
    return proto


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="lclstream/FlightSql.proto", package=PACKAGE, syntax="proto3"
    )
    for name, fields in _MESSAGES.items():
        nested = []
        if name == "CommandStatementIngest":
            nested.append(_message("TableDefinitionOptions", _TABLE_DEFINITION_OPTIONS,
                                   _TABLE_DEFINITION_ENUMS))
        message = _message(name, fields, _NESTED_ENUMS.get(name), nested)
        if name in _DEPRECATED:
            message.options.deprecated = True
        proto.message_type.append(message)
    return proto


_POOL = descriptor_pool.DescriptorPool()
FILE_DESCRIPTOR = _POOL.Add(_file())

#: Every top-level Flight SQL message class, by its spec name.
MESSAGES: dict[str, type[Message]] = {
    name: message_factory.GetMessageClass(descriptor)
    for name, descriptor in FILE_DESCRIPTOR.message_types_by_name.items()
}

CommandGetSqlInfo = MESSAGES["CommandGetSqlInfo"]
CommandGetXdbcTypeInfo = MESSAGES["CommandGetXdbcTypeInfo"]
CommandGetCatalogs = MESSAGES["CommandGetCatalogs"]
CommandGetDbSchemas = MESSAGES["CommandGetDbSchemas"]
CommandGetTables = MESSAGES["CommandGetTables"]
CommandGetTableTypes = MESSAGES["CommandGetTableTypes"]
CommandGetPrimaryKeys = MESSAGES["CommandGetPrimaryKeys"]
CommandGetExportedKeys = MESSAGES["CommandGetExportedKeys"]
CommandGetImportedKeys = MESSAGES["CommandGetImportedKeys"]
CommandGetCrossReference = MESSAGES["CommandGetCrossReference"]
ActionCreatePreparedStatementRequest = MESSAGES["ActionCreatePreparedStatementRequest"]
SubstraitPlan = MESSAGES["SubstraitPlan"]
ActionCreatePreparedSubstraitPlanRequest = MESSAGES["ActionCreatePreparedSubstraitPlanRequest"]
ActionCreatePreparedStatementResult = MESSAGES["ActionCreatePreparedStatementResult"]
ActionClosePreparedStatementRequest = MESSAGES["ActionClosePreparedStatementRequest"]
ActionBeginTransactionRequest = MESSAGES["ActionBeginTransactionRequest"]
ActionBeginSavepointRequest = MESSAGES["ActionBeginSavepointRequest"]
ActionBeginTransactionResult = MESSAGES["ActionBeginTransactionResult"]
ActionBeginSavepointResult = MESSAGES["ActionBeginSavepointResult"]
ActionEndTransactionRequest = MESSAGES["ActionEndTransactionRequest"]
ActionEndSavepointRequest = MESSAGES["ActionEndSavepointRequest"]
CommandStatementQuery = MESSAGES["CommandStatementQuery"]
CommandStatementSubstraitPlan = MESSAGES["CommandStatementSubstraitPlan"]
TicketStatementQuery = MESSAGES["TicketStatementQuery"]
CommandPreparedStatementQuery = MESSAGES["CommandPreparedStatementQuery"]
CommandStatementUpdate = MESSAGES["CommandStatementUpdate"]
CommandPreparedStatementUpdate = MESSAGES["CommandPreparedStatementUpdate"]
CommandStatementIngest = MESSAGES["CommandStatementIngest"]
DoPutUpdateResult = MESSAGES["DoPutUpdateResult"]
DoPutPreparedStatementResult = MESSAGES["DoPutPreparedStatementResult"]
ActionCancelQueryRequest = MESSAGES["ActionCancelQueryRequest"]
ActionCancelQueryResult = MESSAGES["ActionCancelQueryResult"]


# ---------------------------------------------------------------------------------------------
# Any packing
# ---------------------------------------------------------------------------------------------


class UnknownCommand(Exception):
    """A Flight SQL `Any` (right type URL prefix) naming a message this module does not define."""

    def __init__(self, type_name: str) -> None:
        super().__init__(f"unknown Flight SQL command: {type_name}")
        self.type_name = type_name


class MalformedCommand(ValueError):
    """A Flight SQL `Any` naming a known message whose payload does not decode as that message."""

    def __init__(self, type_name: str, reason: str) -> None:
        super().__init__(f"malformed Flight SQL {type_name}: {reason}")
        self.type_name = type_name


def pack(message: Message) -> bytes:
    """`message` wrapped in a serialized `google.protobuf.Any`, as Flight SQL sends commands."""
    name = message.DESCRIPTOR.full_name.removeprefix(f"{PACKAGE}.")
    wrapper = any_pb2.Any(type_url=TYPE_URL_PREFIX + name, value=message.SerializeToString())
    return wrapper.SerializeToString()


def _parse_any(data: bytes) -> any_pb2.Any | None:
    """The `Any` in `data` if it is one with the Flight SQL type URL prefix, else None."""
    if not data:
        return None
    wrapper = any_pb2.Any()
    try:
        wrapper.ParseFromString(data)
    except DecodeError:  # JSON text, random bytes: not protobuf at all
        return None
    if not wrapper.type_url.startswith(TYPE_URL_PREFIX):
        return None
    return wrapper


def command_name(data: bytes) -> str | None:
    """The Flight SQL message name `data` carries (known or not), or None if not Flight SQL."""
    wrapper = _parse_any(data)
    return None if wrapper is None else wrapper.type_url.removeprefix(TYPE_URL_PREFIX)


def unpack(data: bytes) -> Message | None:
    """Decode a Flight SQL command: the message, or None when `data` is not a Flight SQL `Any`.

    Never raises for arbitrary non-protobuf input (JSON commands, empty or random bytes).
    Raises UnknownCommand for a Flight SQL type URL naming a message not defined here, and
    MalformedCommand when a known message's payload does not decode.
    """
    wrapper = _parse_any(data)
    if wrapper is None:
        return None
    name = wrapper.type_url.removeprefix(TYPE_URL_PREFIX)
    cls = MESSAGES.get(name)
    if cls is None:
        raise UnknownCommand(name)
    message = cls()
    try:
        message.ParseFromString(wrapper.value)
    except DecodeError as exc:
        raise MalformedCommand(name, str(exc)) from exc
    return message


# ---------------------------------------------------------------------------------------------
# Enums (top-level enums of the spec, as Python IntEnums; values are wire values)
# ---------------------------------------------------------------------------------------------


class SqlInfo(IntEnum):
    """CommandGetSqlInfo ids: server info [0, 500), SQL syntax info [500, 1000)."""

    FLIGHT_SQL_SERVER_NAME = 0  # utf8
    FLIGHT_SQL_SERVER_VERSION = 1  # utf8
    FLIGHT_SQL_SERVER_ARROW_VERSION = 2  # utf8
    FLIGHT_SQL_SERVER_READ_ONLY = 3  # bool
    FLIGHT_SQL_SERVER_SQL = 4  # bool
    FLIGHT_SQL_SERVER_SUBSTRAIT = 5  # bool
    FLIGHT_SQL_SERVER_SUBSTRAIT_MIN_VERSION = 6  # utf8
    FLIGHT_SQL_SERVER_SUBSTRAIT_MAX_VERSION = 7  # utf8
    FLIGHT_SQL_SERVER_TRANSACTION = 8  # int32: SqlSupportedTransaction
    FLIGHT_SQL_SERVER_CANCEL = 9  # bool
    FLIGHT_SQL_SERVER_BULK_INGESTION = 10  # bool
    FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED = 11  # bool
    FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT = 100  # int32 ms, 0 = none
    FLIGHT_SQL_SERVER_TRANSACTION_TIMEOUT = 101  # int32 ms, 0 = none
    SQL_DDL_CATALOG = 500
    SQL_DDL_SCHEMA = 501
    SQL_DDL_TABLE = 502
    SQL_IDENTIFIER_CASE = 503
    SQL_IDENTIFIER_QUOTE_CHAR = 504
    SQL_QUOTED_IDENTIFIER_CASE = 505
    SQL_ALL_TABLES_ARE_SELECTABLE = 506
    SQL_NULL_ORDERING = 507
    SQL_KEYWORDS = 508
    SQL_NUMERIC_FUNCTIONS = 509
    SQL_STRING_FUNCTIONS = 510
    SQL_SYSTEM_FUNCTIONS = 511
    SQL_DATETIME_FUNCTIONS = 512
    SQL_SEARCH_STRING_ESCAPE = 513
    SQL_EXTRA_NAME_CHARACTERS = 514
    SQL_SUPPORTS_COLUMN_ALIASING = 515
    SQL_NULL_PLUS_NULL_IS_NULL = 516
    SQL_SUPPORTS_CONVERT = 517
    SQL_SUPPORTS_TABLE_CORRELATION_NAMES = 518
    SQL_SUPPORTS_DIFFERENT_TABLE_CORRELATION_NAMES = 519
    SQL_SUPPORTS_EXPRESSIONS_IN_ORDER_BY = 520
    SQL_SUPPORTS_ORDER_BY_UNRELATED = 521
    SQL_SUPPORTED_GROUP_BY = 522
    SQL_SUPPORTS_LIKE_ESCAPE_CLAUSE = 523
    SQL_SUPPORTS_NON_NULLABLE_COLUMNS = 524
    SQL_SUPPORTED_GRAMMAR = 525
    SQL_ANSI92_SUPPORTED_LEVEL = 526
    SQL_SUPPORTS_INTEGRITY_ENHANCEMENT_FACILITY = 527
    SQL_OUTER_JOINS_SUPPORT_LEVEL = 528
    SQL_SCHEMA_TERM = 529
    SQL_PROCEDURE_TERM = 530
    SQL_CATALOG_TERM = 531
    SQL_CATALOG_AT_START = 532
    SQL_SCHEMAS_SUPPORTED_ACTIONS = 533
    SQL_CATALOGS_SUPPORTED_ACTIONS = 534
    SQL_SUPPORTED_POSITIONED_COMMANDS = 535
    SQL_SELECT_FOR_UPDATE_SUPPORTED = 536
    SQL_STORED_PROCEDURES_SUPPORTED = 537
    SQL_SUPPORTED_SUBQUERIES = 538
    SQL_CORRELATED_SUBQUERIES_SUPPORTED = 539
    SQL_SUPPORTED_UNIONS = 540
    SQL_MAX_BINARY_LITERAL_LENGTH = 541
    SQL_MAX_CHAR_LITERAL_LENGTH = 542
    SQL_MAX_COLUMN_NAME_LENGTH = 543
    SQL_MAX_COLUMNS_IN_GROUP_BY = 544
    SQL_MAX_COLUMNS_IN_INDEX = 545
    SQL_MAX_COLUMNS_IN_ORDER_BY = 546
    SQL_MAX_COLUMNS_IN_SELECT = 547
    SQL_MAX_COLUMNS_IN_TABLE = 548
    SQL_MAX_CONNECTIONS = 549
    SQL_MAX_CURSOR_NAME_LENGTH = 550
    SQL_MAX_INDEX_LENGTH = 551
    SQL_DB_SCHEMA_NAME_LENGTH = 552  # sic: the spec has no MAX_ in this one
    SQL_MAX_PROCEDURE_NAME_LENGTH = 553
    SQL_MAX_CATALOG_NAME_LENGTH = 554
    SQL_MAX_ROW_SIZE = 555
    SQL_MAX_ROW_SIZE_INCLUDES_BLOBS = 556
    SQL_MAX_STATEMENT_LENGTH = 557
    SQL_MAX_STATEMENTS = 558
    SQL_MAX_TABLE_NAME_LENGTH = 559
    SQL_MAX_TABLES_IN_SELECT = 560
    SQL_MAX_USERNAME_LENGTH = 561
    SQL_DEFAULT_TRANSACTION_ISOLATION = 562
    SQL_TRANSACTIONS_SUPPORTED = 563
    SQL_SUPPORTED_TRANSACTIONS_ISOLATION_LEVELS = 564
    SQL_DATA_DEFINITION_CAUSES_TRANSACTION_COMMIT = 565
    SQL_DATA_DEFINITIONS_IN_TRANSACTIONS_IGNORED = 566
    SQL_SUPPORTED_RESULT_SET_TYPES = 567
    SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_UNSPECIFIED = 568
    SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_FORWARD_ONLY = 569
    SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_SCROLL_SENSITIVE = 570
    SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_SCROLL_INSENSITIVE = 571
    SQL_BATCH_UPDATES_SUPPORTED = 572
    SQL_SAVEPOINTS_SUPPORTED = 573
    SQL_NAMED_PARAMETERS_SUPPORTED = 574
    SQL_LOCATORS_UPDATE_COPY = 575
    SQL_STORED_FUNCTIONS_USING_CALL_SYNTAX_SUPPORTED = 576


class SqlSupportedTransaction(IntEnum):
    """Value of FLIGHT_SQL_SERVER_TRANSACTION."""

    SQL_SUPPORTED_TRANSACTION_NONE = 0
    SQL_SUPPORTED_TRANSACTION_TRANSACTION = 1
    SQL_SUPPORTED_TRANSACTION_SAVEPOINT = 2


class XdbcDataType(IntEnum):
    """JDBC/ODBC type codes (data_type / sql_data_type of the XDBC type info result)."""

    XDBC_UNKNOWN_TYPE = 0
    XDBC_CHAR = 1
    XDBC_NUMERIC = 2
    XDBC_DECIMAL = 3
    XDBC_INTEGER = 4
    XDBC_SMALLINT = 5
    XDBC_FLOAT = 6
    XDBC_REAL = 7
    XDBC_DOUBLE = 8
    XDBC_DATETIME = 9
    XDBC_INTERVAL = 10
    XDBC_VARCHAR = 12
    XDBC_DATE = 91
    XDBC_TIME = 92
    XDBC_TIMESTAMP = 93
    XDBC_LONGVARCHAR = -1
    XDBC_BINARY = -2
    XDBC_VARBINARY = -3
    XDBC_LONGVARBINARY = -4
    XDBC_BIGINT = -5
    XDBC_TINYINT = -6
    XDBC_BIT = -7
    XDBC_WCHAR = -8
    XDBC_WVARCHAR = -9


class XdbcDatetimeSubcode(IntEnum):
    """datetime_subcode for XDBC_DATETIME / XDBC_INTERVAL (the spec aliases 1-5)."""

    XDBC_SUBCODE_UNKNOWN = 0
    XDBC_SUBCODE_YEAR = 1
    XDBC_SUBCODE_DATE = 1
    XDBC_SUBCODE_TIME = 2
    XDBC_SUBCODE_MONTH = 2
    XDBC_SUBCODE_TIMESTAMP = 3
    XDBC_SUBCODE_DAY = 3
    XDBC_SUBCODE_TIME_WITH_TIMEZONE = 4
    XDBC_SUBCODE_HOUR = 4
    XDBC_SUBCODE_TIMESTAMP_WITH_TIMEZONE = 5
    XDBC_SUBCODE_MINUTE = 5
    XDBC_SUBCODE_SECOND = 6
    XDBC_SUBCODE_YEAR_TO_MONTH = 7
    XDBC_SUBCODE_DAY_TO_HOUR = 8
    XDBC_SUBCODE_DAY_TO_MINUTE = 9
    XDBC_SUBCODE_DAY_TO_SECOND = 10
    XDBC_SUBCODE_HOUR_TO_MINUTE = 11
    XDBC_SUBCODE_HOUR_TO_SECOND = 12
    XDBC_SUBCODE_MINUTE_TO_SECOND = 13
    XDBC_SUBCODE_INTERVAL_YEAR = 101
    XDBC_SUBCODE_INTERVAL_MONTH = 102
    XDBC_SUBCODE_INTERVAL_DAY = 103
    XDBC_SUBCODE_INTERVAL_HOUR = 104
    XDBC_SUBCODE_INTERVAL_MINUTE = 105
    XDBC_SUBCODE_INTERVAL_SECOND = 106
    XDBC_SUBCODE_INTERVAL_YEAR_TO_MONTH = 107
    XDBC_SUBCODE_INTERVAL_DAY_TO_HOUR = 108
    XDBC_SUBCODE_INTERVAL_DAY_TO_MINUTE = 109
    XDBC_SUBCODE_INTERVAL_DAY_TO_SECOND = 110
    XDBC_SUBCODE_INTERVAL_HOUR_TO_MINUTE = 111
    XDBC_SUBCODE_INTERVAL_HOUR_TO_SECOND = 112
    XDBC_SUBCODE_INTERVAL_MINUTE_TO_SECOND = 113


class Nullable(IntEnum):
    """`nullable` of the XDBC type info result (JDBC columnNoNulls / columnNullable / ...)."""

    NULLABILITY_NO_NULLS = 0
    NULLABILITY_NULLABLE = 1
    NULLABILITY_UNKNOWN = 2


class Searchable(IntEnum):
    """`searchable` of the XDBC type info result: how a type may appear in WHERE."""

    SEARCHABLE_NONE = 0
    SEARCHABLE_CHAR = 1  # LIKE only
    SEARCHABLE_BASIC = 2  # anything but LIKE
    SEARCHABLE_FULL = 3


# ---------------------------------------------------------------------------------------------
# Result set column metadata keys (field metadata on query and table_schema schemas)
# ---------------------------------------------------------------------------------------------

META_CATALOG_NAME = b"ARROW:FLIGHT:SQL:CATALOG_NAME"
META_DB_SCHEMA_NAME = b"ARROW:FLIGHT:SQL:DB_SCHEMA_NAME"
META_TABLE_NAME = b"ARROW:FLIGHT:SQL:TABLE_NAME"
META_TYPE_NAME = b"ARROW:FLIGHT:SQL:TYPE_NAME"  # data source-specific type name
META_PRECISION = b"ARROW:FLIGHT:SQL:PRECISION"  # column precision/size
META_SCALE = b"ARROW:FLIGHT:SQL:SCALE"
META_IS_AUTO_INCREMENT = b"ARROW:FLIGHT:SQL:IS_AUTO_INCREMENT"  # "1" or "0"
META_IS_CASE_SENSITIVE = b"ARROW:FLIGHT:SQL:IS_CASE_SENSITIVE"  # "1" or "0"
META_IS_READ_ONLY = b"ARROW:FLIGHT:SQL:IS_READ_ONLY"  # "1" or "0"
META_IS_SEARCHABLE = b"ARROW:FLIGHT:SQL:IS_SEARCHABLE"  # "1" or "0"
META_REMARKS = b"ARROW:FLIGHT:SQL:REMARKS"  # column comment; added last, clients may lack it

COLUMN_METADATA_KEYS: tuple[bytes, ...] = (
    META_CATALOG_NAME,
    META_DB_SCHEMA_NAME,
    META_TABLE_NAME,
    META_TYPE_NAME,
    META_PRECISION,
    META_SCALE,
    META_IS_AUTO_INCREMENT,
    META_IS_CASE_SENSITIVE,
    META_IS_READ_ONLY,
    META_IS_SEARCHABLE,
    META_REMARKS,
)

# ---------------------------------------------------------------------------------------------
# Result schemas the spec prescribes. Nullability and child fields follow the reference
# implementations (Arrow C++ SqlSchema, Go schema_ref) where the spec's notation is loose: clients
# such as the ADBC driver compare the server's schema to these with Schema::Equals.
# ---------------------------------------------------------------------------------------------

GET_CATALOGS_SCHEMA = pa.schema([pa.field("catalog_name", pa.utf8(), nullable=False)])

GET_DB_SCHEMAS_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.utf8()),
    pa.field("db_schema_name", pa.utf8(), nullable=False),
])

GET_TABLES_SCHEMA = pa.schema([
    pa.field("catalog_name", pa.utf8()),
    pa.field("db_schema_name", pa.utf8()),
    pa.field("table_name", pa.utf8(), nullable=False),
    pa.field("table_type", pa.utf8(), nullable=False),
])

# CommandGetTables with include_schema: table_schema is an IPC-serialized Arrow schema.
GET_TABLES_SCHEMA_WITH_SCHEMA = GET_TABLES_SCHEMA.append(
    pa.field("table_schema", pa.binary(), nullable=False)
)

GET_TABLE_TYPES_SCHEMA = pa.schema([pa.field("table_type", pa.utf8(), nullable=False)])

# Union children in type-code order 0..5; a value's type code names its representation.
SQL_INFO_VALUE_TYPE = pa.dense_union(
    [
        pa.field("string_value", pa.utf8(), nullable=False),
        pa.field("bool_value", pa.bool_(), nullable=False),
        pa.field("bigint_value", pa.int64(), nullable=False),
        pa.field("int32_bitmask", pa.int32(), nullable=False),
        pa.field("string_list", pa.list_(pa.utf8()), nullable=False),
        pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(pa.int32())),
                 nullable=False),
    ],
    type_codes=[0, 1, 2, 3, 4, 5],
)

GET_SQL_INFO_SCHEMA = pa.schema([
    pa.field("info_name", pa.uint32(), nullable=False),
    pa.field("value", SQL_INFO_VALUE_TYPE, nullable=False),
])

GET_XDBC_TYPE_INFO_SCHEMA = pa.schema([
    pa.field("type_name", pa.utf8(), nullable=False),
    pa.field("data_type", pa.int32(), nullable=False),  # XdbcDataType
    pa.field("column_size", pa.int32()),
    pa.field("literal_prefix", pa.utf8()),
    pa.field("literal_suffix", pa.utf8()),
    pa.field("create_params", pa.list_(pa.field("item", pa.utf8(), nullable=False))),
    pa.field("nullable", pa.int32(), nullable=False),  # Nullable
    pa.field("case_sensitive", pa.bool_(), nullable=False),
    pa.field("searchable", pa.int32(), nullable=False),  # Searchable
    pa.field("unsigned_attribute", pa.bool_()),
    pa.field("fixed_prec_scale", pa.bool_(), nullable=False),
    pa.field("auto_increment", pa.bool_()),
    pa.field("local_type_name", pa.utf8()),
    pa.field("minimum_scale", pa.int32()),
    pa.field("maximum_scale", pa.int32()),
    pa.field("sql_data_type", pa.int32(), nullable=False),  # XdbcDataType
    pa.field("datetime_subcode", pa.int32()),  # XdbcDatetimeSubcode
    pa.field("num_prec_radix", pa.int32()),
    pa.field("interval_precision", pa.int32()),
])
