"""Row filters: every construct gives the rows SQL logic would, every mistake a located error.

Expected rows come from a pure-Python evaluation of the same condition with SQL's three-valued
logic (None is unknown), so the Arrow expression is checked against an independent reading.
"""

from __future__ import annotations

import builtins
import datetime as dt
import decimal
import operator
import random

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from flight_server.processing.filters import (
    MAX_DEPTH,
    MAX_LENGTH,
    FilterError,
    parse,
    parse_filter,
    scalar_columns,
)

N = 60
E, C, R, P, F, S = "gmd/energy", "evr/code_40", "run", "ebeam/photon_energy", "flag", "name"
T, K, L, Q = "time", "entry_1/result_1/nPeaks", "LCLS.photon_energy_eV", 'beam "on"'
EPOCH = dt.datetime(2024, 5, 1, tzinfo=dt.UTC)


def _table() -> pa.Table:
    rng = np.random.default_rng(7)

    def with_nulls(values: list, every: int) -> list:
        return [None if i % every == 3 else v for i, v in enumerate(values)]

    energy = with_nulls(rng.choice([0.0, 1e-3, 0.25, 0.5, 0.75, 1.0, 2.5e3], N).tolist(), 7)
    names = with_nulls(rng.choice(["", "a", "b", "o'brien", "A"], N).tolist(), 9)
    flags = with_nulls((rng.random(N) < 0.5).tolist(), 11)
    times = [EPOCH + dt.timedelta(minutes=int(m)) for m in rng.integers(0, 120, N)]
    return pa.table({
        E: pa.array(energy, pa.float64()),
        C: pa.array(rng.integers(0, 2, N), pa.int64()),
        R: pa.array(rng.choice([7, 8, 9], N), pa.int32()),
        P: pa.array(rng.choice([-1.5, 9000.0, 9500.5, 9600.0], N), pa.float64()),
        F: pa.array(flags, pa.bool_()),
        S: pa.array(names, pa.string()),
        T: pa.array(times, pa.timestamp("ns", tz="UTC")),
        K: pa.array(rng.integers(0, 5, N), pa.uint16()),
        L: pa.array(rng.choice([9000.5, 9001.25], N), pa.float32()),
        Q: pa.array((rng.random(N) < 0.5).tolist(), pa.bool_()),
        "vec": pa.array([[float(i), 1.0] for i in range(N)], pa.list_(pa.float32(), 2)),
        "img": pa.ExtensionArray.from_storage(
            pa.fixed_shape_tensor(pa.uint16(), [2, 2]),
            pa.array([[i, 0, 0, i] for i in range(N)], pa.list_(pa.uint16(), 4))),
    })


TABLE = _table()
SCHEMA = TABLE.schema
ROWS = TABLE.to_pylist()


# SQL three-valued logic in plain Python: None is unknown.
def cmp(op, a, b):
    return None if a is None or b is None else op(a, b)


def AND(*xs):
    return False if any(x is False for x in xs) else None if None in xs else True


def OR(*xs):
    return True if any(x is True for x in xs) else None if None in xs else False


def NOT(x):
    return None if x is None else not x


def gt(c, v):
    return lambda r: cmp(operator.gt, r[c], v)


def eq(c, v):
    return lambda r: cmp(operator.eq, r[c], v)


def isin(c, values):
    return lambda r: None if r[c] is None else r[c] in values


def between(c, lo, hi):
    return lambda r: AND(cmp(operator.ge, r[c], lo), cmp(operator.le, r[c], hi))


def at(minutes: float) -> dt.datetime:
    return EPOCH + dt.timedelta(minutes=minutes)


CASES = [
    # every comparison operator
    ("gmd/energy > 0.5", gt(E, 0.5)),
    ("gmd/energy >= 0.5", lambda r: cmp(operator.ge, r[E], 0.5)),
    ("gmd/energy < 0.5", lambda r: cmp(operator.lt, r[E], 0.5)),
    ("gmd/energy <= 0.5", lambda r: cmp(operator.le, r[E], 0.5)),
    ("gmd/energy = 0.5", eq(E, 0.5)),
    ("gmd/energy == 0.5", eq(E, 0.5)),
    ("gmd/energy != 0.5", lambda r: cmp(operator.ne, r[E], 0.5)),
    ("gmd/energy <> 0.5", lambda r: cmp(operator.ne, r[E], 0.5)),
    ("evr/code_40 = 1", eq(C, 1)),
    ("run=7", eq(R, 7)),
    ("gmd/energy>0.5\nand\tevr/code_40=1", lambda r: AND(gt(E, 0.5)(r), r[C] == 1)),
    # booleans: bare columns, literals, not
    ("flag", lambda r: r[F]),
    ("not flag", lambda r: NOT(r[F])),
    ("NOT flag", lambda r: NOT(r[F])),
    ("not not flag", lambda r: r[F]),
    ("flag = true", eq(F, True)),
    ("flag != FALSE", lambda r: cmp(operator.ne, r[F], False)),
    ("true", lambda r: True),
    ("false", lambda r: False),
    ("1 = 1", lambda r: True),
    ("1 = 1.0 and 'a' < 'b'", lambda r: True),
    # and / or and their precedence
    ("gmd/energy > 0.5 and evr/code_40 = 1", lambda r: AND(gt(E, 0.5)(r), r[C] == 1)),
    ("flag or run = 7 and evr/code_40 = 1", lambda r: OR(r[F], AND(r[R] == 7, r[C] == 1))),
    ("(flag or run = 7) and evr/code_40 = 1", lambda r: AND(OR(r[F], r[R] == 7), r[C] == 1)),
    ("not flag and run = 8", lambda r: AND(NOT(r[F]), r[R] == 8)),
    ("not (flag and run = 8)", lambda r: NOT(AND(r[F], r[R] == 8))),
    ("not run = 8 or flag", lambda r: OR(r[R] != 8, r[F])),
    ("flag AND run = 7 Or gmd/energy is null",
     lambda r: OR(AND(r[F], r[R] == 7), r[E] is None)),
    ("((flag))", lambda r: r[F]),
    ("(run) = 7", eq(R, 7)),
    ("(run > 7) = flag", lambda r: cmp(operator.eq, r[R] > 7, r[F])),
    (" or ".join(f"run = {k}" for k in range(250)), lambda r: True),
    (" and ".join(["gmd/energy >= 0"] * 200), lambda r: cmp(operator.ge, r[E], 0)),
    # between
    ("run between 7 and 8", between(R, 7, 8)),
    ("run BETWEEN 8 AND 7", lambda r: False),
    ("run not between 7 and 8", lambda r: NOT(between(R, 7, 8)(r))),
    ("gmd/energy between 0.25 and 1 and flag", lambda r: AND(between(E, 0.25, 1)(r), r[F])),
    ("gmd/energy not between 0.25 and 1", lambda r: NOT(between(E, 0.25, 1)(r))),
    ("name between 'a' and 'b'", between(S, "a", "b")),
    # in
    ("run in (7, 9)", isin(R, {7, 9})),
    ("run IN (7)", isin(R, {7})),
    ("run not in (7, 9)", lambda r: NOT(isin(R, {7, 9})(r))),
    ("run in (7.0, 8.5, 1e30, -3)", isin(R, {7})),
    ("gmd/energy in (0.5, 1)", isin(E, {0.5, 1.0})),
    ("gmd/energy not in (0.5, 1)", lambda r: NOT(isin(E, {0.5, 1.0})(r))),
    ("not gmd/energy in (0.5)", lambda r: NOT(isin(E, {0.5})(r))),
    ("name in ('a', 'o''brien')", isin(S, {"a", "o'brien"})),
    ("name not in ('a', '')", lambda r: NOT(isin(S, {"a", ""})(r))),
    ("flag in (true)", isin(F, {True})),
    ("7 in (7, 8)", lambda r: True),
    ("entry_1/result_1/nPeaks in (3, -1, 2.5, 70000)", isin(K, {3})),
    # is null / is not null
    ("gmd/energy is null", lambda r: r[E] is None),
    ("gmd/energy IS NOT NULL", lambda r: r[E] is not None),
    ("name is null or flag is null", lambda r: r[S] is None or r[F] is None),
    ("not gmd/energy is null", lambda r: r[E] is not None),
    ("(gmd/energy > 0.5) is null", lambda r: r[E] is None),
    # negative numbers and scientific notation
    ("ebeam/photon_energy < -1", lambda r: r[P] < -1),
    ("ebeam/photon_energy = -1.5", eq(P, -1.5)),
    ("ebeam/photon_energy = - 1.5", eq(P, -1.5)),
    ("ebeam/photon_energy in (-1.5, 9000)", isin(P, {-1.5, 9000.0})),
    ("ebeam/photon_energy between -2 and 9.0e3", between(P, -2, 9000)),
    ("gmd/energy >= 1e-3", lambda r: cmp(operator.ge, r[E], 1e-3)),
    ("gmd/energy < 2.5E3", lambda r: cmp(operator.lt, r[E], 2.5e3)),
    ("gmd/energy = 25e-2", eq(E, 0.25)),
    ("gmd/energy = .25", eq(E, 0.25)),
    ("gmd/energy = 1.", eq(E, 1.0)),
    ("ebeam/photon_energy > 9.5e+3", gt(P, 9500)),
    ("evr/code_40 > -9223372036854775808", lambda r: True),
    # literals on the left, column against column
    ("0.5 < gmd/energy", gt(E, 0.5)),
    ("7 = run", eq(R, 7)),
    ("evr/code_40 < run", lambda r: r[C] < r[R]),
    ("gmd/energy < ebeam/photon_energy", lambda r: cmp(operator.lt, r[E], r[P])),
    ("entry_1/result_1/nPeaks > evr/code_40", lambda r: r[K] > r[C]),
    # strings, quoted names, other name forms
    ("name = 'o''brien'", eq(S, "o'brien")),
    ("name = ''", eq(S, "")),
    ("name > 'a'", gt(S, "a")),
    ("name = 'A' or name = 'a'", isin(S, {"a", "A"})),
    ("name = 'x' or '1' = '1'", lambda r: True),  # the classic injection is only a condition
    ('"gmd/energy" > 0.5', gt(E, 0.5)),
    ('"beam ""on"""', lambda r: r[Q]),
    ('"beam ""on""" and "run" = 7', lambda r: AND(r[Q], r[R] == 7)),
    ("LCLS.photon_energy_eV > 9001", lambda r: r[L] > 9001),
    ("LCLS.photon_energy_eV = 9000.5", eq(L, 9000.5)),
    ("entry_1/result_1/nPeaks >= 2", lambda r: r[K] >= 2),
    # times are compared with ISO 8601 strings
    ("time < '2024-05-01T00:30:00Z'", lambda r: r[T] < at(30)),
    ("time >= '2024-05-01 01:00'", lambda r: r[T] >= at(60)),
    ("time between '2024-05-01T00:10:00+00:00' and '2024-05-01T00:20:00Z'",
     lambda r: at(10) <= r[T] <= at(20)),
    ("time in ('2024-05-01T00:05:00Z', '2024-05-01T00:06:00Z')",
     lambda r: r[T] in (at(5), at(6))),
]


def expected(condition) -> list[int]:
    return [i for i, row in enumerate(ROWS) if condition(row) is True]


@pytest.mark.parametrize(("text", "condition"), CASES, ids=[c[0][:60] for c in CASES])
def test_filter_selects_the_rows_python_would(text: str, condition) -> None:
    expr = parse(text, SCHEMA)
    assert isinstance(expr, pc.Expression)
    want = expected(condition)
    assert TABLE.filter(expr).equals(TABLE.take(pa.array(want, pa.int64()))), text


def test_cases_are_not_trivial() -> None:
    """A table where every case matched all rows or none would prove little."""
    sizes = {text: len(expected(cond)) for text, cond in CASES}
    partial = [t for t, n in sizes.items() if 0 < n < N]
    assert len(partial) > 0.8 * len(sizes)


def test_keywords_are_case_insensitive() -> None:
    lower = "not flag and run in (7, 8) or gmd/energy is not null and run between 7 and 8"
    for text in (lower.upper().replace("FLAG", "flag").replace("RUN", "run")
                 .replace("GMD/ENERGY", "gmd/energy"),
                 "NoT flag AnD run In (7, 8) oR gmd/energy Is NoT NuLl aNd run BeTwEeN 7 AnD 8"):
        assert TABLE.filter(parse(text, SCHEMA)).equals(TABLE.filter(parse(lower, SCHEMA)))
    assert TABLE.filter(parse("flag = TRUE", SCHEMA)).equals(
        TABLE.filter(parse("flag = true", SCHEMA)))


def test_columns_used_are_reported_once_in_order() -> None:
    f = parse_filter("flag and gmd/energy > 0 or not flag and \"run\" in (7)", SCHEMA)
    assert f.columns == (F, E, R)
    assert parse_filter("true", SCHEMA).columns == ()


def test_scalar_columns_leave_out_lists_and_tensors() -> None:
    assert scalar_columns(SCHEMA) == [E, C, R, P, F, S, T, K, L, Q]


def test_numbers_compare_without_run_time_cast_failures() -> None:
    """Arrow's implicit casts fail on values such as 2**64-1; the filter must not."""
    table = pa.table({
        "u64": pa.array([0, 5, 2**64 - 1, None], pa.uint64()),
        "i64": pa.array([-(2**63), 5, 2**63 - 1, 1], pa.int64()),
        "i8": pa.array([-128, 5, 127, None], pa.int8()),
        "f16": pa.array(np.array([0.5, 5, 100, 1], np.float16)),
        "dec": pa.array([decimal.Decimal("0.50"), decimal.Decimal("5.00"), None,
                         decimal.Decimal("-1.25")], pa.decimal128(10, 2)),
        "dict": pa.array(["a", "b", "a", None]).dictionary_encode(),
    })
    cases = {
        "u64 > -1": [0, 1, 2],
        "u64 >= 5": [1, 2],
        "u64 = 5.0": [1],
        "u64 > 1e19": [2],
        "u64 in (-1, 5, 5.5)": [1],
        "u64 > i64": [0, 2],
        "u64 = i8": [1],
        "i64 > 0.5": [1, 2, 3],
        "i64 in (-9223372036854775808)": [0],
        "i8 < 1000 and i8 > -1000": [0, 1, 2],
        "i8 in (127, 1000, -129)": [2],
        "f16 > 1.5": [1, 2],
        "f16 in (0.5, 100)": [0, 2],
        "dec > 1": [1],
        "dec between -2 and 0.5": [0, 3],
        "dec in (0.5, -1.25)": [0, 3],
        "dict = 'a'": [0, 2],
        "dict in ('b')": [1],
    }
    for text, rows in cases.items():
        want = table.take(pa.array(rows, pa.int64()))
        assert table.filter(parse(text, table.schema)).equals(want), text


# ---------------------------------------------------------------------------------------------
# Errors


def refused(text, *phrases: str) -> FilterError:
    with pytest.raises(FilterError) as info:
        parse(text, SCHEMA)
    message = str(info.value)
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"
    return info.value


def test_error_quotes_position_excerpt_and_caret() -> None:
    error = refused("gmd/energy >> 1", "unexpected '>' at 12", "expected a column, a number")
    assert error.position == 12
    _, excerpt, caret = str(error).split("\n")
    assert excerpt == "  gmd/energy >> 1"
    assert caret == "  " + " " * 12 + "^"
    assert isinstance(error, ValueError) and isinstance(error, pa.ArrowInvalid)


def test_error_excerpt_of_long_filter_is_short_and_points_at_the_fault() -> None:
    text = "flag and " * 100 + "run = = 7" + " and flag" * 100
    error = refused(text, f"unexpected '=' at {text.index('= =') + 2}")
    _, excerpt, caret = str(error).split("\n")
    assert len(excerpt) < 80 and excerpt.startswith("  ...") and excerpt.endswith("...")
    assert excerpt[caret.index("^")] == "="
    assert excerpt[caret.index("^") - 2] == "="


INJECTIONS = [
    ("__import__('os').system('x')", "unexpected '(' at 10"),
    ("exec('import os')", "unexpected '(' at 4"),
    ("eval('1') = 1", "unexpected '(' at 4"),
    ("1; DROP TABLE x", "unexpected character ';' at 1"),
    ("flag; DROP TABLE x --", "unexpected character ';' at 4"),
    ("gmd/energy > 0 -- comment", "unexpected '-' at 15", "expected 'and', 'or' or the end"),
    ("gmd/energy > 0 /* comment */", "unexpected character '/' at 15"),
    ("flag # comment", "unexpected character '#' at 5"),
    ("`rm -rf /`", "unexpected character '`' at 0", "double quotes"),
    ("$(rm -rf /)", "unexpected character '$' at 0"),
    ("flag and ${HOME}", "unexpected character '$' at 9"),
    ("flag || true", "unexpected character '|' at 5", "use 'or'"),
    ("flag && true", "unexpected character '&' at 5", "use 'and'"),
    ("lambda: 1", "unexpected character ':' at 6"),
    ("flag.__class__.__mro__ = 1", "unknown column 'flag.__class__.__mro__'"),
    ("(flag", "unexpected end of filter at 5", "')' to close the '(' at 0"),
    ("((flag) and run = 7", "')' to close the '(' at 0"),
    ("flag)", "unexpected ')' at 4", "no '(' for it to close"),
    ("run in (7, 8", "expected ',' or ')' to close the 'in' list opened at 7"),
    ("'; DROP TABLE x", "unterminated string starting at 0"),
    ('"gmd/energy > 0', "unterminated column name starting at 0"),
]


@pytest.mark.parametrize("case", INJECTIONS, ids=lambda c: c[0])
def test_injection_attempts_are_syntax_errors(case, monkeypatch) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("a filter was evaluated as Python")

    monkeypatch.setattr(builtins, "eval", forbidden)
    monkeypatch.setattr(builtins, "exec", forbidden)
    refused(*case)


@pytest.mark.parametrize(("text", "phrases"), [
    ("run =", ["unexpected end of filter at 5", "expected a column"]),
    ("run = = 1", ["unexpected '=' at 6"]),
    ("run < 1 < 2", ["unexpected '<' at 8", "expected 'and', 'or' or the end"]),
    ("run 7", ["unexpected '7' at 4", "a comparison (= != < <= > >=)", "'between'"]),
    ("flag flag", ["unexpected 'flag' at 5"]),
    ("and flag", ["unexpected 'and' at 0"]),
    ("flag and", ["unexpected end of filter at 8"]),
    ("flag or or flag", ["unexpected 'or' at 8"]),
    ("not", ["unexpected end of filter at 3"]),
    ("run between 1", ["expected 'and' between the bounds"]),
    ("run between 1 or 2", ["unexpected 'or' at 14", "expected 'and'"]),
    ("run in 7", ["expected '(' after 'in'"]),
    ("run in ()", ["unexpected ')' at 8", "expected a number, a 'string', true or false"]),
    ("run in (gmd/energy)", ["unexpected 'gmd/energy' at 8", "expected a number"]),
    ("run in (1,)", ["unexpected ')' at 10"]),
    ("run is 7", ["expected 'null' after 'is'"]),
    ("run is not true", ["unexpected 'true' at 11", "'is not null'"]),
    ("run not = 7", ["expected 'between' or 'in' after 'not'"]),
    ("run = null", ["unexpected 'null' at 6", "is null"]),
    ("-run > 1", ["expected a number after '-'"]),
    ("run > --1", ["unexpected '-' at 7", "expected a number after '-'"]),
    ("run > 1.2.3", ["malformed number at 6"]),
    ("run > 1e", ["malformed number at 6", "exponent needs digits"]),
    ("run > 0x10", ["malformed number at 6"]),
    ("run > 7abc", ["malformed number at 6"]),
    ("run > 1e999", ["out of range"]),
    ("run = 9223372036854775808", ["integer 9223372036854775808 at 6 is out of range"]),
    ("gmd/ > 1", ["unexpected '/' at 3", "quote other names"]),
    ("gmd//energy > 1", ["unexpected '/' at 3"]),
    ("gmd/2 > 1", ["unexpected '/' at 3"]),
    ('"" = 1', ["empty column name at 0"]),
    ("run ! 1", ["unexpected character '!' at 4", "'!='"]),
    ("vec[0] > 1", ["unexpected character '[' at 3", "scalar columns only"]),
    ("run > 1 + 2", ["unexpected character '+' at 8"]),
    ("run \u2265 7", ["unexpected character '\u2265' at 4"]),
    ("flag\x00", ["unexpected character '\\x00' at 4"]),
])
def test_syntax_errors_say_what_and_where(text: str, phrases: list[str]) -> None:
    refused(text, *phrases)


def test_empty_and_non_text_filters() -> None:
    refused("", "filter is empty", "e.g. gmd/energy > 0.5")
    refused(" \n\t", "filter is empty")
    with pytest.raises(FilterError, match="must be a string, got bytes"):
        parse(b"flag", SCHEMA)  # type: ignore[arg-type]


def test_length_is_limited_before_any_parsing() -> None:
    assert parse("flag" + " " * (MAX_LENGTH - 4), SCHEMA) is not None
    refused("flag" + " " * (MAX_LENGTH - 3), f"filter is {MAX_LENGTH + 1} characters long",
            f"the limit is {MAX_LENGTH}")
    huge = "gmd/energy > 0 or " * (10 * 2**20 // 18)
    error = refused(huge, f"the limit is {MAX_LENGTH}")
    assert len(str(error)) < 200


def test_nesting_depth_is_limited() -> None:
    ok = "(" * MAX_DEPTH + "flag" + ")" * MAX_DEPTH
    assert TABLE.filter(parse(ok, SCHEMA)).equals(TABLE.filter(parse("flag", SCHEMA)))
    refused("(" * (MAX_DEPTH + 1) + "flag" + ")" * (MAX_DEPTH + 1),
            f"nests deeper than {MAX_DEPTH} levels at {MAX_DEPTH}")
    refused("not " * (MAX_DEPTH + 1) + "flag", f"nests deeper than {MAX_DEPTH} levels")
    refused("(" * 1000, f"nests deeper than {MAX_DEPTH} levels")
    assert parse("not " * MAX_DEPTH + "flag", SCHEMA) is not None


def test_unknown_column_suggests_and_lists_scalar_columns() -> None:
    error = refused("flag and gmd/energi > 0.5", "unknown column 'gmd/energi' at 9",
                    "Did you mean 'gmd/energy'?", "Scalar columns: gmd/energy, evr/code_40, run")
    assert error.position == 9
    assert "vec" not in str(error) and "img" not in str(error)
    refused("FLAG", "unknown column 'FLAG'", "Did you mean 'flag'?")
    refused("gmd.energy > 0", "Did you mean 'gmd/energy'?")
    message = str(refused("zzz = 1", "unknown column 'zzz'", "Scalar columns:"))
    assert "Did you mean" not in message
    refused("Flag", "unknown column 'Flag'", "Did you mean 'flag'?")


@pytest.mark.parametrize(("text", "column"), [
    ("vec > 1", "vec"), ("img is null", "img"), ("flag and img = 1", "img"),
    ("run in (1) or vec in (1)", "vec")])
def test_non_scalar_columns_are_refused(text: str, column: str) -> None:
    error = refused(text, f"column '{column}' at {text.index(column)}",
                    "filters apply to scalar columns only", "gmd/energy, evr/code_40")
    assert error.position == text.index(column)


@pytest.mark.parametrize(("text", "phrases"), [
    ("run = 'seven'", ["cannot compare int32 column 'run' with string 'seven' at 6",
                       "compare it with a number"]),
    ("'x' < gmd/energy", ["cannot compare string 'x' with double column 'gmd/energy' at 0",
                          "compare it with a number"]),
    ("name = 1", ["cannot compare string column 'name' with number 1 at 7",
                  "compare it with a 'string'"]),
    ("name > -0.5", ["with number -0.5 at 7"]),
    ("flag = 1", ["cannot compare bool column 'flag' with number 1", "true or false"]),
    ("run = true", ["cannot compare int32 column 'run' with boolean true"]),
    ("run = name", ["cannot compare int32 column 'run' with string column 'name' at 4"]),
    ("run between 1 and 'z'", ["with string 'z' at 18"]),
    ("name between 'a' and 2", ["with number 2 at 21"]),
    ("time > 5", ["cannot compare timestamp[ns, tz=UTC] column 'time' with number 5",
                  "'2024-05-01T12:00:00Z'"]),
    ("time > 'yesterday'", ["'yesterday' at 7 is not a timestamp[ns, tz=UTC]", "ISO 8601"]),
    ("(run > 1) = 1", ["cannot compare a condition with number 1"]),
    ("run in (1, 'a')", ["'in' list at 4 mixes numbers and strings: 'a' at 11"]),
    ("name in ('a', true)", ["mixes strings and booleans: true at 14"]),
    ("name in (1, 2)", ["cannot compare string column 'name' with number 1 at 9"]),
    ("flag in ('yes')", ["cannot compare bool column 'flag' with string 'yes'"]),
    ("time in ('2024-05-01T00:05:00Z', 'soon')", ["'soon' at 33 is not a timestamp"]),
])
def test_type_mismatches_are_refused(text: str, phrases: list[str]) -> None:
    refused(text, *phrases)


@pytest.mark.parametrize(("text", "phrases"), [
    ("run", ["column 'run' at 0 is int32, not boolean", "e.g. run > 0"]),
    ("gmd/energy and flag", ["column 'gmd/energy' at 0 is double, not boolean"]),
    ("flag or not name", ["column 'name' at 12 is string"]),
    ('"in" or flag', ["unknown column 'in'"]),
    ("1", ["number 1 at 0 is not a condition"]),
    ("flag and 'x'", ["string 'x' at 9 is not a condition"]),
    ("(run)", ["column 'run' at 1 is int32, not boolean"]),
])
def test_a_condition_must_be_boolean(text: str, phrases: list[str]) -> None:
    refused(text, *phrases)


def test_odd_column_names_are_quoted_in_hints() -> None:
    schema = pa.schema([("and", pa.int32()), ("beam on", pa.float64()), ("ok.x/y", pa.int8())])
    with pytest.raises(FilterError, match='e.g. "and" > 0'):
        parse('"and"', schema)
    with pytest.raises(FilterError, match='e.g. "beam on" > 0'):
        parse('"beam on"', schema)
    with pytest.raises(FilterError, match=r"e.g. ok\.x/y > 0"):
        parse("ok.x/y", schema)
    assert parse('"and" = 1 and "beam on" > 0 and ok.x/y < 3', schema) is not None


def test_random_token_soup_gives_an_expression_or_a_filter_error() -> None:
    """Whatever arrives, the parser answers with a FilterError, never another exception."""
    atoms = [E, R, F, S, T, "vec", "img", "and", "or", "not", "between", "in", "is", "null",
             "true", "false", "(", ")", ",", "-", "1", "0.5", "1e3", "'a'", "'2024-05-01Z'",
             "=", "!=", "<", ">=", "<>", '"run"', "x", ";", "$", ".", "/", "'", '"', "1e"]
    rng = random.Random(1)
    valid = 0
    for _ in range(3000):
        text = " ".join(rng.choice(atoms) for _ in range(rng.randint(1, 10)))
        try:
            TABLE.filter(parse(text, SCHEMA))
            valid += 1
        except FilterError:
            pass
    assert valid > 10
