"""The one way JSON sent by a client is read: bounded in size and depth, strict about numbers.

Every JSON input (descriptors, tickets, subscriptions, processing steps, action bodies, producer
metadata) goes through `loads`, so the limits hold everywhere and a hostile document costs a
bounded amount of work before it is refused:

- at most `MAX_BYTES` bytes, refused unparsed;
- nesting at most `MAX_DEPTH` deep (the standard parser would otherwise recurse until Python's
  recursion limit, and validators walking the document after it);
- numbers as JSON defines them: `NaN` and `Infinity` (which Python's parser accepts) are refused,
  and so are integers of more than `MAX_INT_DIGITS` digits.

Errors quote at most a short excerpt of what was sent (`excerpt`): a message echoing a 10 MB
value would itself be the problem (gRPC drops a status whose message exceeds its header limit).
"""

from __future__ import annotations

import json
from typing import Any

MAX_BYTES = 64 * 1024
MAX_DEPTH = 32
MAX_INT_DIGITS = 20  # 2**64 has 20 digits; no count, offset or size of ours needs more
EXCERPT_CHARS = 80


class RequestError(ValueError):
    """A request, ticket or other client document that is malformed, over a limit, or asks for
    something impossible; the message says which, and what would be valid."""


def excerpt(value: object, limit: int = EXCERPT_CHARS) -> str:
    """`repr(value)`, cut to about `limit` characters with the full length noted."""
    if isinstance(value, str | bytes):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _refuse_constant(name: str) -> None:
    raise RequestError(f"{name} is not a JSON number; send a finite number")


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RequestError(f"an integer of {len(text.lstrip('-'))} digits is beyond any "
                             f"valid value (at most {MAX_INT_DIGITS} digits)")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise RequestError(f"the number {excerpt(text)} is beyond the range of a double")
    return value


def depth(doc: Any, limit: int = MAX_DEPTH) -> int:
    """How deeply `doc` nests (a scalar is 0), walking no deeper than limit + 1."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        node, level = todo.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            if level <= limit:
                todo.extend((child, level + 1)
                            for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def loads(raw: bytes | str | None, what: str, max_bytes: int = MAX_BYTES) -> Any:
    """The parsed document, or RequestError naming `what` and the rule it broke."""
    if raw is None:
        raw = b""
    if len(raw) > max_bytes:
        raise RequestError(f"{what} is {len(raw)} bytes; at most {max_bytes} are accepted")
    try:
        doc = json.loads(raw, parse_constant=_refuse_constant, parse_int=_int,
                         parse_float=_float)
    except RequestError as exc:
        raise RequestError(f"{what}: {exc}") from None
    except RecursionError:
        raise RequestError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"{what} is not valid JSON: {exc}") from None
    except ValueError as exc:  # anything else the parser refuses
        raise RequestError(f"{what} is not valid JSON: {excerpt(str(exc))}") from None
    if depth(doc) > MAX_DEPTH:
        raise RequestError(f"{what} is nested too deeply (at most {MAX_DEPTH} levels)")
    return doc


def loads_object(raw: bytes | str | None, what: str, empty_is_object: bool = False
                 ) -> dict[str, Any]:
    """A JSON object (with `empty_is_object`, empty input reads as {})."""
    if empty_is_object and not raw:
        return {}
    doc = loads(raw, what)
    if not isinstance(doc, dict):
        raise RequestError(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc
