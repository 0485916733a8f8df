"""The v1 request (command descriptor) and ticket formats.

Both are small JSON documents validated against the JSON Schemas beside this module, so any client
in any language can build a request from the schema alone. Validation errors say where the
document is wrong and what would be valid.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from schemas.json_input import RequestError, excerpt, loads_object

VERSION = 1


@dataclass(frozen=True)
class EventSlice:
    """Python slice semantics over a run's events; negatives are not allowed."""

    start: int = 0
    stop: int | None = None
    step: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "stop": self.stop, "step": self.step}


@dataclass(frozen=True)
class Request:
    """Which runs of one experiment, which columns (None = all), which events."""

    experiment: str
    runs: tuple[int, ...]
    columns: tuple[str, ...] | None = None
    events: EventSlice = EventSlice()
    filter: str | None = None  # keep only events where this holds (see flight_server/filters)
    processing: tuple[dict[str, Any], ...] | None = None  # steps applied on the server, in order
    table: str | None = None  # one of the runs' other tables (None = their main table)
    source: str | None = None  # the runs in another form: "xtc2" (None = their default form)
    compression: str | None = None  # on the wire: "zstd" | "lz4" | "none" (None: server's)
    compression_level: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"v": VERSION, "experiment": self.experiment, "runs": list(self.runs)}
        if self.source is not None:
            doc["source"] = self.source
        if self.table is not None:
            doc["table"] = self.table
        if self.columns is not None:
            doc["columns"] = list(self.columns)
        if self.events != EventSlice():
            doc["events"] = self.events.to_json()
        if self.filter is not None:
            doc["filter"] = self.filter
        if self.processing is not None:
            doc["processing"] = list(self.processing)
        add_compression(doc, self.compression, self.compression_level)
        return doc

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()


@dataclass(frozen=True)
class Ticket:
    """One partition of a planned request: events [start, stop) with step of one run."""

    experiment: str
    run: int
    columns: tuple[str, ...]
    start: int
    stop: int
    step: int = 1
    filter: str | None = None
    processing: tuple[dict[str, Any], ...] | None = None
    table: str | None = None
    source: str | None = None
    compression: str | None = None
    compression_level: int | None = None

    def encode(self) -> bytes:
        doc: dict[str, Any] = {
            "v": VERSION,
            "experiment": self.experiment,
            "run": self.run,
            "columns": list(self.columns),
            "start": self.start,
            "stop": self.stop,
            "step": self.step,
        }
        if self.source is not None:
            doc["source"] = self.source
        if self.table is not None:
            doc["table"] = self.table
        if self.filter is not None:
            doc["filter"] = self.filter
        if self.processing is not None:
            doc["processing"] = list(self.processing)
        add_compression(doc, self.compression, self.compression_level)
        return json.dumps(doc, separators=(",", ":")).encode()


def compression_choice(text: str | None) -> tuple[str | None, int | None]:
    """What a client passes as `compression=` (and a server as its default): "zstd", "lz4",
    "none" or "zstd:LEVEL" -> (codec, level); None: the server's default."""
    if text is None:
        return None, None
    codec, _, level = str(text).partition(":")
    try:
        return codec, int(level) if level else None
    except ValueError:
        raise RequestError(f"compression level must be an integer, got {level!r} in "
                           f"{excerpt(text)} (e.g. 'zstd:3')") from None


def add_compression(doc: dict[str, Any], codec: str | None, level: int | None) -> None:
    if codec is not None:
        doc["compression"] = codec
    if level is not None:
        doc["compression_level"] = level


@cache
def _validator(name: str, definition: str | None = None) -> jsonschema.protocols.Validator:
    """The validator of a schema file, or of one of its `$defs` (a file that defines several
    documents, such as the job actions' bodies)."""
    schema = json.loads(resources.files("schemas").joinpath(name).read_text())
    if definition is not None:
        schema = {"$schema": schema["$schema"], "$defs": schema["$defs"],
                  "$ref": f"#/$defs/{definition}"}
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # JSON Schema counts 7.0 (and 1e308) as an integer; our integers are counts and indexes,
    # and a float in their place is a mistake to refuse, not a value to round.
    strict = cls.TYPE_CHECKER.redefine(
        "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool))
    return jsonschema.validators.extend(cls, type_checker=strict)(schema)


def load_document(raw: bytes | str, what: str, schema_file: str,
                  definition: str | None = None) -> dict[str, Any]:
    """A JSON object from a client, within the JSON limits and valid against its schema."""
    doc = loads_object(raw, what)
    error = jsonschema.exceptions.best_match(
        _validator(schema_file, definition).iter_errors(doc))
    if error is not None:
        where = "/".join(str(p)[:60] for p in error.absolute_path) or "(top level)"
        raise RequestError(f"invalid {what} at {where}: {_explain(error)}")
    return doc


def _explain(error: jsonschema.ValidationError) -> str:
    """The validator's message; where it would quote a long value in full, an excerpt."""
    if len(error.message) <= 200:
        return error.message
    rule = error.schema.get(error.validator) if isinstance(error.schema, dict) else None
    return f"{excerpt(error.instance)} does not satisfy {error.validator} {excerpt(rule, 60)}"


def parse_request(raw: bytes | str) -> Request:
    """Parse and validate a v1 command descriptor."""
    doc = load_document(raw, "request", "request.schema.json")
    events = doc.get("events") or {}
    start = events.get("start") or 0
    stop = events.get("stop")
    step = events.get("step") or 1
    if stop is not None and stop < start:
        raise RequestError(f"event slice is reversed: start {start} > stop {stop}")
    columns = doc.get("columns")
    processing = doc.get("processing")
    return Request(
        experiment=doc["experiment"],
        runs=tuple(doc["runs"]),
        columns=None if columns is None else tuple(columns),
        events=EventSlice(start, stop, step),
        filter=doc.get("filter"),
        processing=None if processing is None else tuple(processing),
        table=doc.get("table"),
        source=doc.get("source"),
        compression=doc.get("compression"),
        compression_level=doc.get("compression_level"),
    )


def parse_ticket(raw: bytes) -> Ticket:
    """Parse and validate a v1 ticket. The caller still re-checks that the run exists."""
    doc = load_document(raw, "ticket", "ticket.schema.json")
    if doc["stop"] < doc["start"]:
        raise RequestError(f"ticket event range is reversed: {doc['start']} > {doc['stop']}")
    return Ticket(
        experiment=doc["experiment"],
        run=doc["run"],
        columns=tuple(doc["columns"]),
        start=doc["start"],
        stop=doc["stop"],
        step=doc["step"],
        filter=doc.get("filter"),
        processing=None if doc.get("processing") is None else tuple(doc["processing"]),
        table=doc.get("table"),
        source=doc.get("source"),
        compression=doc.get("compression"),
        compression_level=doc.get("compression_level"),
    )
