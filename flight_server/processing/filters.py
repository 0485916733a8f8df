"""Row filters: a small boolean language over a run's scalar columns, compiled to Arrow.

A request's `filter` is text from the network, so it is never evaluated: a hand-written tokenizer
and recursive-descent parser accept only the grammar below and build a syntax tree, which is then
checked against the run's schema and turned into a `pyarrow.compute.Expression`. Anything else
(function calls, `;`, comments, backticks, `$(...)`) is a syntax error that quotes its position.

    expr      := or_expr
    or_expr   := and_expr ("or" and_expr)*
    and_expr  := not_expr ("and" not_expr)*
    not_expr  := "not" not_expr | predicate
    predicate := operand ( cmp operand
                         | ["not"] "between" operand "and" operand
                         | ["not"] "in" "(" literal ("," literal)* ")"
                         | "is" ["not"] "null" )?          -- a bare operand must be boolean
    operand   := column | literal | "(" expr ")"
    literal   := ["-"] number | 'string' | true | false
    cmp       := = | == | != | <> | < | <= | > | >=

Keywords are case-insensitive. Columns are bare paths (`gmd/energy`, `LCLS.photon_energy_eV`)
or double-quoted names (`"beam ""on"" flag"`). Logic is SQL's: a comparison with a missing value is
unknown, and rows whose condition is unknown are dropped.
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import reduce

import pyarrow as pa
import pyarrow.compute as pc

from flight_server.errors import InvalidArgument, close_matches, listing

MAX_LENGTH = 4096  # characters; a filter is a condition, not a data set
MAX_DEPTH = 64  # nested parentheses and `not`s; bounds the parser's recursion

KEYWORDS = frozenset({"and", "or", "not", "between", "in", "is", "null", "true", "false"})
COMPARISONS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=", "<": "<", "<=": "<=", ">": ">",
               ">=": ">="}

_IDENT_START = frozenset(string.ascii_letters + "_")
_IDENT_CHARS = _IDENT_START | frozenset(string.digits)
_DIGITS = frozenset(string.digits)
_SPACE = frozenset(" \t\r\n")
_INT64 = (-(2**63), 2**63 - 1)
_CHARACTER_HINTS = {
    ";": "a filter is one condition",
    "&": "use 'and'",
    "|": "use 'or'",
    "!": "use 'not', or '!=' to compare",
    "`": 'quote column names with double quotes, e.g. "my column"',
    "[": "filters apply to scalar columns only",
}
_OPERAND = "a column, a number, a 'string', true, false or '('"
_LITERAL = "a number, a 'string', true or false"
_FUNCS = {"=": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal,
          ">": pc.greater, ">=": pc.greater_equal}
_NULL_BOOL = pc.scalar(pa.scalar(None, pa.bool_()))


class FilterError(InvalidArgument):
    """A filter that cannot be used; a ValueError that reaches clients as INVALID_ARGUMENT.

    `position` is the character offset the message quotes, or None for the filter as a whole.
    """

    def __init__(self, message: str, position: int | None = None) -> None:
        super().__init__(message)
        self.position = position


@dataclass(frozen=True)
class Filter:
    """A compiled filter: the expression, and the columns a reader must load to evaluate it."""

    text: str
    expression: pc.Expression
    columns: tuple[str, ...]


def parse(text: str, schema: pa.Schema) -> pc.Expression:
    """The expression for `text`, checked against `schema`; raises FilterError."""
    return parse_filter(text, schema).expression


def parse_filter(text: str, schema: pa.Schema) -> Filter:
    """Like `parse`, also naming the columns used, which need reading even when not projected."""
    if not isinstance(text, str):
        raise FilterError(f"a filter must be a string, got {type(text).__name__}")
    if len(text) > MAX_LENGTH:
        raise FilterError(f"filter is {len(text)} characters long; the limit is {MAX_LENGTH}")
    if not text.strip():
        raise FilterError("filter is empty; write a condition, e.g. gmd/energy > 0.5")
    tree = _Parser(text).parse()
    compiler = _Compiler(text, schema)
    expression = compiler.condition(tree)
    _check_binds(expression, schema, compiler.used)
    return Filter(text, expression, tuple(compiler.used))


def scalar_columns(schema: pa.Schema) -> list[str]:
    """The columns of `schema` a filter may name."""
    return [f.name for f in schema if _is_scalar(f.type)]


# ---------------------------------------------------------------------------------------------
# Errors quote where: an offset, the text around it and a caret under it.


def _excerpt(text: str, pos: int, width: int = 30) -> str:
    start, end = max(0, pos - width), min(len(text), pos + width)
    shown = "".join(c if c.isprintable() else "?" for c in text[start:end])
    prefix = "..." if start > 0 else ""
    suffix = "..." if end < len(text) else ""
    caret = " " * (len(prefix) + pos - start) + "^"
    return f"\n  {prefix}{shown}{suffix}\n  {caret}"


def _error(text: str, pos: int, message: str) -> FilterError:
    return FilterError(message + _excerpt(text, pos), pos)


# ---------------------------------------------------------------------------------------------
# Tokens


@dataclass(frozen=True)
class _Token:
    kind: str  # name, quoted, number, string, keyword, op, ( ) , - end
    text: str  # as written
    pos: int
    value: object = None  # name, number, unescaped string, lower-case keyword, canonical op

    @property
    def end(self) -> int:
        return self.pos + len(self.text)

    def describe(self) -> str:
        if self.kind == "end":
            return "end of filter"
        shown = self.text if len(self.text) <= 30 else self.text[:27] + "..."
        return repr(shown)


def _tokenize(text: str) -> Iterator[_Token]:
    """Tokens on demand, so the error reported is the first one in the text."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in _SPACE:
            i += 1
        elif c in _IDENT_START:
            j = _scan_path(text, i)
            word = text[i:j]
            if word.lower() in KEYWORDS:
                yield _Token("keyword", word, i, word.lower())
            else:
                yield _Token("name", word, i, word)
            i = j
        elif c in _DIGITS or (c == "." and i + 1 < n and text[i + 1] in _DIGITS):
            token = _scan_number(text, i)
            yield token
            i += len(token.text)
        elif c in "\"'":
            j, value = _scan_quoted(text, i)
            yield _Token("quoted" if c == '"' else "string", text[i:j], i, value)
            i = j
        elif text.startswith(("<=", ">=", "<>", "!=", "=="), i):
            yield _Token("op", text[i:i + 2], i, COMPARISONS[text[i:i + 2]])
            i += 2
        elif c in "<>=":
            yield _Token("op", c, i, COMPARISONS[c])
            i += 1
        elif c in "(),-":
            yield _Token(c, c, i)
            i += 1
        else:
            hint = _CHARACTER_HINTS.get(c, "filters use columns, literals, comparisons, "
                                           "and/or/not, between, in, is null and parentheses")
            raise _error(text, i, f"unexpected character {c!r} at {i}: {hint}")
    yield _Token("end", "", n)


def _scan_path(text: str, i: int) -> int:
    """End of a bare column path: identifiers joined by '/' or '.'."""
    n = len(text)
    while True:
        while i < n and text[i] in _IDENT_CHARS:
            i += 1
        if i + 1 < n and text[i] in "/." and text[i + 1] in _IDENT_START:
            i += 1
            continue
        if i < n and text[i] in "/.":
            raise _error(text, i, f"unexpected {text[i]!r} at {i}: a column path continues "
                                  f"with a name; quote other names, e.g. \"gmd/2\"")
        return i


def _scan_number(text: str, start: int) -> _Token:
    n, i, is_float = len(text), start, False
    while i < n and text[i] in _DIGITS:
        i += 1
    if i < n and text[i] == ".":
        is_float = True
        i += 1
        while i < n and text[i] in _DIGITS:
            i += 1
    if i < n and text[i] in "eE":
        j = i + 1
        if j < n and text[j] in "+-":
            j += 1
        if not (j < n and text[j] in _DIGITS):
            raise _error(text, i, f"malformed number at {start}: an exponent needs digits, "
                                  f"e.g. 1e-3")
        is_float, i = True, j
        while i < n and text[i] in _DIGITS:
            i += 1
    if i < n and (text[i] in _IDENT_CHARS or text[i] == "."):
        raise _error(text, i, f"malformed number at {start}: numbers are written like "
                              f"42, -0.5 or 1.5e3")
    written = text[start:i]
    value: int | float = float(written) if is_float else int(written)
    if isinstance(value, float) and math.isinf(value):
        raise _error(text, start, f"number {written} at {start} is out of range")
    return _Token("number", written, start, value)


def _scan_quoted(text: str, start: int) -> tuple[int, str]:
    """A quoted name or string, where a doubled quote stands for one."""
    quote, parts, i = text[start], [], start + 1
    while True:
        end = text.find(quote, i)
        if end < 0:
            what = "column name" if quote == '"' else "string"
            raise _error(text, start, f"unterminated {what} starting at {start}: close it with "
                                      f"{quote}, and write {quote}{quote} for a {quote} inside")
        if text.startswith(quote * 2, end):
            parts.append(text[i:end + 1])
            i = end + 2
            continue
        parts.append(text[i:end])
        return end + 1, "".join(parts)


# ---------------------------------------------------------------------------------------------
# Syntax tree


@dataclass(frozen=True)
class _Column:
    name: str
    pos: int


@dataclass(frozen=True)
class _Literal:
    value: int | float | str | bool
    text: str
    pos: int


@dataclass(frozen=True)
class _Compare:
    op: str
    left: _Node
    right: _Node
    pos: int


@dataclass(frozen=True)
class _Between:
    operand: _Node
    low: _Node
    high: _Node
    negated: bool
    pos: int


@dataclass(frozen=True)
class _In:
    operand: _Node
    values: tuple[_Literal, ...]
    negated: bool
    pos: int


@dataclass(frozen=True)
class _IsNull:
    operand: _Node
    negated: bool
    pos: int


@dataclass(frozen=True)
class _Not:
    operand: _Node
    pos: int


@dataclass(frozen=True)
class _Logic:
    op: str  # and, or
    items: tuple[_Node, ...]
    pos: int


_Node = _Column | _Literal | _Compare | _Between | _In | _IsNull | _Not | _Logic


class _Parser:
    """Recursive descent over the token list; depth-limited so input cannot exhaust the stack."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.current = next(self.tokens)
        self.depth = 0
        self.bare = False  # the last predicate was a bare operand, so a comparison may follow

    def parse(self) -> _Node:
        tree = self.or_expr()
        token = self.peek()
        if token.kind != "end":
            if token.kind == ")":
                raise self.unexpected(token, "there is no '(' for it to close")
            raise self.unexpected(token, "expected " + self.follow("the end of the filter"))
        return tree

    # -- helpers

    def peek(self) -> _Token:
        return self.current

    def take(self) -> _Token:
        token = self.current
        if token.kind != "end":
            self.current = next(self.tokens)
        return token

    def keyword(self, word: str) -> _Token | None:
        token = self.peek()
        if token.kind == "keyword" and token.value == word:
            return self.take()
        return None

    def expect_keyword(self, word: str, why: str) -> _Token:
        token = self.keyword(word)
        if token is None:
            raise self.unexpected(self.peek(), f"expected '{word}' {why}")
        return token

    def unexpected(self, token: _Token, valid: str) -> FilterError:
        return _error(self.text, token.pos, f"unexpected {token.describe()} at {token.pos}: "
                                            f"{valid}")

    def follow(self, closer: str) -> str:
        ops = "a comparison (= != < <= > >=), 'between', 'in', 'is null', " if self.bare else ""
        return f"{ops}'and', 'or' or {closer}"

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise _error(self.text, token.pos, f"filter nests deeper than {MAX_DEPTH} levels "
                                               f"at {token.pos}; simplify it")

    # -- grammar

    def or_expr(self) -> _Node:
        return self.logic("or", self.and_expr)

    def and_expr(self) -> _Node:
        return self.logic("and", self.not_expr)

    def logic(self, word: str, operand: Callable[[], _Node]) -> _Node:
        pos = self.peek().pos
        items = [operand()]
        while self.keyword(word):
            items.append(operand())
        return items[0] if len(items) == 1 else _Logic(word, tuple(items), pos)

    def not_expr(self) -> _Node:
        token = self.keyword("not")
        if token is None:
            return self.predicate()
        self.enter(token)
        node = _Not(self.not_expr(), token.pos)
        self.depth -= 1
        self.bare = False
        return node

    def predicate(self) -> _Node:
        left = self.operand()
        token = self.peek()
        self.bare = False
        if token.kind == "op":
            self.take()
            return _Compare(token.value, left, self.operand(), token.pos)
        if token.kind != "keyword" or token.value not in ("not", "between", "in", "is"):
            self.bare = True
            return left
        self.take()
        if token.value == "is":
            negated = self.keyword("not") is not None
            self.expect_keyword("null", "after 'is' (write 'is null' or 'is not null')")
            return _IsNull(left, negated, token.pos)
        negated = token.value == "not"
        word = self.take() if negated else token
        if word.kind != "keyword" or word.value not in ("between", "in"):
            raise self.unexpected(word, "expected 'between' or 'in' after 'not'; to negate a "
                                        "comparison write not (a = b)")
        if word.value == "between":
            low = self.operand()
            self.expect_keyword("and", "between the bounds, e.g. x between 1 and 2")
            return _Between(left, low, self.operand(), negated, token.pos)
        opening = self.take()
        if opening.kind != "(":
            raise self.unexpected(opening, "expected '(' after 'in', e.g. x in (1, 2)")
        values = [self.literal(_LITERAL)]
        while self.peek().kind == ",":
            self.take()
            values.append(self.literal(_LITERAL))
        closing = self.take()
        if closing.kind != ")":
            raise self.unexpected(closing, f"expected ',' or ')' to close the 'in' list opened "
                                           f"at {opening.pos}")
        return _In(left, tuple(values), negated, token.pos)

    def operand(self) -> _Node:
        token = self.peek()
        if token.kind in ("name", "quoted"):
            self.take()
            if not token.value:
                raise _error(self.text, token.pos, f"empty column name at {token.pos}")
            return _Column(str(token.value), token.pos)
        if token.kind == "(":
            self.take()
            self.enter(token)
            node = self.or_expr()
            closing = self.peek()
            if closing.kind != ")":
                raise self.unexpected(closing, "expected " + self.follow(
                    f"')' to close the '(' at {token.pos}"))
            self.take()
            self.depth -= 1
            self.bare = False
            return node
        if token.kind == "keyword" and token.value == "null":
            raise self.unexpected(token, "test for missing values with 'is null', "
                                         "e.g. gmd/energy is null")
        return self.literal(_OPERAND)

    def literal(self, expected: str) -> _Literal:
        token = self.take()
        if token.kind == "-":
            number = self.take()
            if number.kind != "number":
                raise self.unexpected(number, "expected a number after '-'")
            assert isinstance(number.value, int | float)
            return self._number(-number.value, self.text[token.pos:number.end], token.pos)
        if token.kind == "number":
            assert isinstance(token.value, int | float)
            return self._number(token.value, token.text, token.pos)
        if token.kind == "string":
            return _Literal(str(token.value), token.text, token.pos)
        if token.kind == "keyword" and token.value in ("true", "false"):
            return _Literal(token.value == "true", token.text, token.pos)
        raise self.unexpected(token, f"expected {expected}")

    def _number(self, value: int | float, written: str, pos: int) -> _Literal:
        if isinstance(value, int) and not _INT64[0] <= value <= _INT64[1]:
            raise _error(self.text, pos, f"integer {written} at {pos} is out of range "
                                         f"(64-bit); write it as a decimal, e.g. 1e20")
        return _Literal(value, written, pos)


# ---------------------------------------------------------------------------------------------
# Types and compilation


@dataclass(frozen=True)
class _Value:
    """A compiled operand: its expression, Arrow type, comparison kind and where it came from."""

    expr: pc.Expression
    type: pa.DataType
    kind: str  # number, string, boolean, time, or the type's own name for the rest
    node: _Node

    @property
    def literal(self) -> _Literal | None:
        return self.node if isinstance(self.node, _Literal) else None

    def describe(self) -> str:
        node = self.node
        if isinstance(node, _Column):
            return f"{self.type} column {node.name!r}"
        if isinstance(node, _Literal):
            return f"{self.kind} {node.text}"
        return "a condition"


def _is_scalar(t: pa.DataType) -> bool:
    if isinstance(t, pa.BaseExtensionType) or pa.types.is_nested(t):
        return False
    if pa.types.is_dictionary(t):
        return _is_scalar(t.value_type)
    return True


def _kind(t: pa.DataType) -> str:
    if pa.types.is_dictionary(t):
        return _kind(t.value_type)
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_boolean(t):
        return "boolean"
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return "time"
    return str(t)


def _base(t: pa.DataType) -> pa.DataType:
    return t.value_type if pa.types.is_dictionary(t) else t


def _fits(value: int, t: pa.DataType) -> bool:
    bits = t.bit_width
    if pa.types.is_unsigned_integer(t):
        return 0 <= value < 2**bits
    return -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)


def _as_float64(value: _Value) -> pc.Expression:
    """Exact Arrow promotions fail at run time on big integers; compare as doubles instead."""
    if value.literal is not None:
        return pc.scalar(float(value.literal.value))
    if _base(value.type) == pa.float64():
        return value.expr
    return value.expr.cast(pa.float64(), safe=False)


def _numeric_pair(a: _Value, b: _Value) -> tuple[pc.Expression, pc.Expression]:
    """Operands Arrow can compare without a cast that may fail on some row's value."""
    ta, tb = _base(a.type), _base(b.type)
    for lit, col, t in ((a, b, tb), (b, a, ta)):
        literal = lit.literal
        if (literal is not None and type(literal.value) is int and col.literal is None
                and pa.types.is_integer(t) and _fits(literal.value, t)):
            typed = pc.scalar(pa.scalar(literal.value, t))
            return (typed, col.expr) if lit is a else (col.expr, typed)
    if pa.types.is_integer(ta) and pa.types.is_integer(tb):
        unsigned64 = pa.uint64() in (ta, tb)
        signed = pa.types.is_signed_integer(ta) or pa.types.is_signed_integer(tb)
        if not (unsigned64 and signed):
            return a.expr, b.expr
    elif ta in (pa.float32(), pa.float64()) and tb in (pa.float32(), pa.float64()):
        return a.expr, b.expr
    return _as_float64(a), _as_float64(b)


_EXAMPLES = {"number": "a number, e.g. 0.5", "string": "a 'string'",
             "boolean": "true or false", "time": "a 'string' such as '2024-05-01T12:00:00Z'"}


def _render(name: str) -> str:
    """A column name as a filter would write it, for examples in messages."""
    parts = name.replace(".", "/").split("/")
    bare = name.lower() not in KEYWORDS and all(
        p and p[0] in _IDENT_START and set(p) <= _IDENT_CHARS for p in parts)
    return name if bare else '"' + name.replace('"', '""') + '"'


class _Compiler:
    """Syntax tree -> Expression, checking names and types against the schema."""

    def __init__(self, text: str, schema: pa.Schema) -> None:
        self.text = text
        self.schema = schema
        self.scalars = scalar_columns(schema)
        self.used: list[str] = []

    def error(self, pos: int, message: str) -> FilterError:
        return _error(self.text, pos, message)

    # -- conditions

    def condition(self, node: _Node) -> pc.Expression:
        value = self.value(node)
        if value.kind == "boolean":
            return value.expr
        if isinstance(node, _Column):
            raise self.error(node.pos, f"column {node.name!r} at {node.pos} is {value.type}, "
                                       f"not boolean: compare it, e.g. {_render(node.name)} "
                                       f"> 0 or {_render(node.name)} is not null")
        raise self.error(_pos(node), f"{value.describe()} at {_pos(node)} is not a condition: "
                                     f"compare it with something, e.g. gmd/energy > 0.5")

    def value(self, node: _Node) -> _Value:
        if isinstance(node, _Column):
            return self.column(node)
        if isinstance(node, _Literal):
            return self.literal(node)
        boolean = pa.bool_()
        if isinstance(node, _Logic):
            combine = pc.and_kleene if node.op == "and" else pc.or_kleene
            return _Value(_balanced(combine, [self.condition(n) for n in node.items]),
                          boolean, "boolean", node)
        if isinstance(node, _Not):
            return _Value(pc.invert(self.condition(node.operand)), boolean, "boolean", node)
        if isinstance(node, _Compare):
            expr = self.compare(node.op, self.value(node.left), self.value(node.right),
                                node.pos)
        elif isinstance(node, _Between):
            operand = self.value(node.operand)
            expr = pc.and_kleene(self.compare(">=", operand, self.value(node.low), node.pos),
                                 self.compare("<=", operand, self.value(node.high), node.pos))
            expr = pc.invert(expr) if node.negated else expr
        elif isinstance(node, _In):
            expr = self.member(node)
        else:
            operand = self.value(node.operand)
            expr = pc.is_valid(operand.expr) if node.negated else pc.is_null(operand.expr)
        return _Value(expr, boolean, "boolean", node)

    # -- operands

    def column(self, node: _Column) -> _Value:
        name = node.name
        indices = self.schema.get_all_field_indices(name)
        if not indices:
            same_case = [n for n in self.scalars if n.lower() == name.lower()]
            hint = (f" Did you mean {same_case[0]!r}?" if same_case
                    else close_matches(name, self.scalars))
            raise self.error(node.pos, f"unknown column {name!r} at {node.pos}.{hint} "
                                       f"Scalar columns: {listing(self.scalars)}")
        if len(indices) > 1:
            raise self.error(node.pos, f"column name {name!r} at {node.pos} is ambiguous: "
                                       f"the run has {len(indices)} columns of that name")
        field = self.schema.field(indices[0])
        if not _is_scalar(field.type):
            raise self.error(node.pos, f"column {name!r} at {node.pos} is {field.type}; "
                                       f"filters apply to scalar columns only: "
                                       f"{listing(self.scalars)}")
        if name not in self.used:
            self.used.append(name)
        return _Value(pc.field(name), field.type, _kind(field.type), node)

    def literal(self, node: _Literal) -> _Value:
        v = node.value
        if isinstance(v, bool):
            t = pa.bool_()
        elif isinstance(v, int):
            t = pa.int64()
        elif isinstance(v, float):
            t = pa.float64()
        else:
            t = pa.string()
        return _Value(pc.scalar(pa.scalar(v, t)), t, _kind(t), node)

    def as_time(self, value: _Value, t: pa.DataType) -> _Value:
        """A string literal read as a time of type `t`, so times need no literal syntax."""
        literal = value.literal
        assert literal is not None
        return _Value(pc.scalar(self.time_scalar(literal, t)), t, "time", literal)

    def time_scalar(self, literal: _Literal, t: pa.DataType) -> pa.Scalar:
        attempts = [t]
        if pa.types.is_timestamp(t) and t.tz is not None:
            attempts.append(pa.timestamp(t.unit))  # no zone written: the column's own zone
        for attempt in attempts:
            try:
                return pa.scalar(str(literal.value)).cast(attempt).cast(t)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                continue
        raise self.error(literal.pos, f"{literal.text} at {literal.pos} is not a {t}: write "
                                      f"ISO 8601, e.g. '2024-05-01T12:00:00Z'")

    def unify(self, a: _Value, b: _Value, pos: int) -> tuple[_Value, _Value]:
        """The two operands of a comparison, or an error when their kinds cannot be compared."""
        if a.kind == "time" and b.kind == "string" and b.literal is not None:
            return a, self.as_time(b, _base(a.type))
        if b.kind == "time" and a.kind == "string" and a.literal is not None:
            return self.as_time(a, _base(b.type)), b
        if a.kind != b.kind:
            at = b.literal.pos if b.literal else a.literal.pos if a.literal else pos
            example = _EXAMPLES.get(a.kind if b.literal or not a.literal else b.kind)
            valid = f": compare it with {example}" if example else ""
            raise self.error(at, f"cannot compare {a.describe()} with {b.describe()} at "
                                 f"{at}{valid}")
        return a, b

    def compare(self, op: str, a: _Value, b: _Value, pos: int) -> pc.Expression:
        a, b = self.unify(a, b, pos)
        if a.kind == "number":
            left, right = _numeric_pair(a, b)
        else:
            left, right = a.expr, b.expr
        return _FUNCS[op](left, right)

    def member(self, node: _In) -> pc.Expression:
        operand = self.value(node.operand)
        first = self.literal(node.values[0])
        for literal in node.values[1:]:
            value = self.literal(literal)
            if value.kind != first.kind:
                raise self.error(literal.pos, f"'in' list at {node.pos} mixes {first.kind}s "
                                              f"and {value.kind}s: {literal.text} at "
                                              f"{literal.pos}; list only numbers, only "
                                              f"strings or only true/false")
        self.unify(operand, first, node.pos)
        t = _base(operand.type)
        expr = operand.expr
        raw = [literal.value for literal in node.values]
        if operand.kind == "number":
            if pa.types.is_integer(t):
                # values no row of this type can hold match nothing: leave them out
                whole = [int(x) for x in raw if float(x).is_integer()]
                value_set = pa.array([x for x in whole if _fits(x, t)], t)
            else:
                expr = _as_float64(operand)
                value_set = pa.array([float(x) for x in raw], pa.float64())
        elif operand.kind == "time":
            value_set = pa.array([self.time_scalar(v, t) for v in node.values], t)
        elif operand.kind in ("string", "boolean"):
            value_set = pa.array(raw, t)
        else:
            raise self.error(node.pos, f"'in' at {node.pos} does not apply to "
                                       f"{operand.describe()}")
        found = pc.is_in(expr, value_set=value_set)
        if operand.literal is None:  # SQL: a missing value is in no list and not outside it
            found = pc.if_else(pc.is_null(expr), _NULL_BOOL, found)
        return pc.invert(found) if node.negated else found


def _pos(node: _Node) -> int:
    if isinstance(node, _Logic):
        return _pos(node.items[0])
    return node.pos


def _balanced(combine: Callable[..., pc.Expression],
              items: list[pc.Expression]) -> pc.Expression:
    """Combine without a chain as deep as the list, which Arrow would walk recursively."""
    if len(items) <= 2:
        return reduce(combine, items)
    mid = len(items) // 2
    return combine(_balanced(combine, items[:mid]), _balanced(combine, items[mid:]))


def _check_binds(expression: pc.Expression, schema: pa.Schema, used: list[str]) -> None:
    """Bind against the columns used, so a type pair Arrow has no kernel for fails here."""
    fields = pa.schema([schema.field(name) for name in used])
    try:
        fields.empty_table().filter(expression)
    except (pa.ArrowException, TypeError) as exc:
        raise FilterError(f"filter cannot be evaluated on these columns: {exc}") from None
