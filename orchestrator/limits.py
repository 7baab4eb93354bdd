"""Codec limits: the JSON every reader can decode again, checked on the text we are about to store.

A value that is accepted but cannot be decoded again fails every later attempt of its run,
far from the code that produced it; NaN written through a model silently becomes null. So
what enters (input, update, stash) is refused when it holds

- an integer of more than :data:`MAX_INT_DIGITS` digits,
- more than :data:`MAX_JSON_DEPTH` levels of nesting,
- NaN or ±Infinity anywhere (JSON has no such values).

The checks run on every commit, so the common case is a few substring searches and counts
over the bytes (C speed, no parsing, nothing allocated per token); the text is only taken
apart when something looks suspicious, and a string holding 5,000 digits or the word NaN is
fine because strings are cut out before numbers are judged.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from itertools import accumulate
from typing import Any

from pydantic import BaseModel

# CPython's default int<->str limit (sys.get_int_max_str_digits()): json.loads raises ValueError
# on a longer integer, so whatever we accept, every worker on a default interpreter can decode.
MAX_INT_DIGITS = 4300
# Python's json gives up near 1,000 levels (the recursion limit), Lua's cjson at 1,000,
# pydantic's serializer at 254 and its JSON parser at 200. A step record holds an update two
# levels below its top, so 100 leaves every reader room and is far beyond any real state.
MAX_JSON_DEPTH = 100

_NO_NAN = "JSON has no NaN or Infinity (stored, they would turn into null or break readers)"
_LONG_RUN = b"0" * (MAX_INT_DIGITS + 1)
_DIGITS_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")
_ALL_BUT_QUOTES_AND_BRACKETS = bytes(c for c in range(256) if c not in b'"[]{}')
_ESCAPED_BACKSLASH = b"\\\\"
_ESCAPED_QUOTE = b'\\"'
_QUOTED = re.compile(rb'"[^"]*"')
_DIGITS = re.compile(rb"[0-9]+")
_TOO_LONG_INT = 10**MAX_INT_DIGITS


def json_problem(raw: bytes) -> str | None:
    """What in the compact JSON ``raw`` (as pydantic writes it) breaks a limit, or None.

    The result is a phrase to follow a name: ``holds an integer of 5,000 digits (...); ...``.
    """
    # a one-byte search (memchr) first: several times faster than a search for the word
    suspect = (b"N" in raw and b"NaN" in raw) or (b"I" in raw and b"Infinity" in raw)
    if len(raw) > MAX_INT_DIGITS:
        suspect = suspect or _LONG_RUN in raw.translate(_DIGITS_AS_ZERO)
    deep = raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH  # else it cannot be deeper
    if not (suspect or deep):
        return None
    plain = _unescaped(raw)
    token = _bad_token(plain) if suspect else None
    if token is not None:
        return _describe_token(token)
    depth = _depth_over_limit(plain) if deep else None
    if depth is not None:
        return (
            f"is nested {depth} levels deep; at most {MAX_JSON_DEPTH} levels of lists and objects are "
            "allowed (MAX_JSON_DEPTH) so that every reader can decode it: flatten it or store it as a string"
        )
    return None


def _unescaped(raw: bytes) -> bytes:
    """``raw`` without escaped backslashes and quotes, so that every quote left opens or closes a
    string (JSON escapes pair up from the left, as ``bytes.replace`` removes them)."""
    if b"\\" not in raw:  # one byte, memchr: the common case
        return raw
    if _ESCAPED_BACKSLASH in raw:
        raw = raw.replace(_ESCAPED_BACKSLASH, b"")
    if _ESCAPED_QUOTE in raw:
        raw = raw.replace(_ESCAPED_QUOTE, b"")
    return raw


def _outside_strings(plain: bytes, needle: bytes) -> int:
    """Where ``needle`` first occurs outside a string of ``plain`` (even quotes before it), or -1.

    Linear: after an occurrence inside a string the search goes on after that string's end.
    """
    at, quotes, counted_to = plain.find(needle), 0, 0
    while at >= 0:
        quotes += plain.count(b'"', counted_to, at)
        counted_to = at
        if quotes % 2 == 0:
            return at
        end = plain.find(b'"', at)
        at = plain.find(needle, end) if end >= 0 else -1
    return -1


def _bad_token(plain: bytes) -> str | None:
    """The first integer that is too long, else NaN / Infinity / -Infinity, outside strings."""
    start = _outside_strings(plain.translate(_DIGITS_AS_ZERO), _LONG_RUN)
    if start >= 0:
        digits = _DIGITS.match(plain, start)
        assert digits is not None
        sign = "-" if plain[start - 1 : start] == b"-" else ""
        return sign + digits.group().decode()
    at = _outside_strings(plain, b"Infinity")
    if at >= 0:
        return "-Infinity" if plain[at - 1 : at] == b"-" else "Infinity"
    return "NaN" if _outside_strings(plain, b"NaN") >= 0 else None


def _describe_token(token: str) -> str:
    """The problem with a token: ``holds an integer of 5,000 digits (1234567890…1234567890); ...``."""
    digits = token.lstrip("-")
    if not digits.isdigit():
        spelled = {"NaN": "nan", "Infinity": "inf"}.get(token, "-inf")
        return f"holds {token}; {_NO_NAN}: use None, or a string such as {spelled!r}"
    return (
        f"holds an integer of {len(digits):,} digits ({token[:10]}…{token[-10:]}); integers may have at most "
        f"{MAX_INT_DIGITS:,} digits (MAX_INT_DIGITS, what Python's json decodes by default): store it as a string"
    )


def _depth_over_limit(plain: bytes) -> int | None:
    """The nesting depth of ``plain`` (JSON without escapes) if it is over MAX_JSON_DEPTH, else None.

    Keeps only quotes and brackets and cuts out the strings: first the many that hold no
    bracket (two quotes in a row; removing a closing and the next opening quote only joins two
    strings), then the rest. Then peels the innermost pairs, one level per pass, and stops as
    soon as what is left cannot reach the limit: a wide document costs a pass or two.
    """
    reduced = plain.translate(None, _ALL_BUT_QUOTES_AND_BRACKETS).replace(b'""', b"")
    if b'"' in reduced:
        reduced = _QUOTED.sub(b"", reduced)
    brackets = reduced.replace(b"{", b"[").replace(b"}", b"]")
    remaining, level = brackets, 0
    while level + len(remaining) // 2 > MAX_JSON_DEPTH:
        if level == MAX_JSON_DEPTH:  # too deep: the exact depth, for the message
            return max(accumulate(1 if c == ord("[") else -1 for c in brackets))
        remaining = remaining.replace(b"[]", b"")
        level += 1
    return None


def non_finite_problem(value: Any) -> str | None:
    """The problem if a float NaN or ±Infinity is anywhere inside ``value``, else None.

    For the case the text cannot show: inside a pydantic model (and in a JSON-mode dump of an
    untyped field) pydantic writes NaN as null, so the value itself has to be searched.
    Iterative and path-free; the path is found afterwards, for the message, by :func:`where`.
    """
    if not _has_non_finite(value):
        return None
    found = locate(value, _is_non_finite)
    return _describe_token(_float_token(found[1]) if found else "NaN")


def _has_non_finite(value: Any) -> bool:
    """Containers go on the stack, scalars are judged in the loop: about 50 ns per item."""
    if isinstance(value, float):
        return not math.isfinite(value)
    stack = [value]
    while stack:
        item = stack.pop()
        kind = type(item)
        children = item.values() if kind is dict else item if kind is list or kind is tuple else _children(item)
        for child in children:
            kind = type(child)
            if kind is str or kind is int or child is None or kind is bool:
                continue
            if kind is float:
                if child - child != 0.0:  # NaN and ±Infinity; faster than math.isfinite
                    return True
            elif isinstance(child, float):  # a float subclass (numpy.float64)
                if not math.isfinite(child):
                    return True
            else:
                stack.append(child)
    return False


def _children(item: Any) -> Iterable[Any]:
    """What a JSON serializer descends into (dict, list and tuple are handled inline)."""
    if isinstance(item, Mapping):
        return item.values()
    if isinstance(item, list | tuple | set | frozenset):
        return item
    if isinstance(item, BaseModel):
        return [*item.__dict__.values(), *(item.__pydantic_extra__ or {}).values()]
    if dataclasses.is_dataclass(item) and not isinstance(item, type):
        return [getattr(item, f.name) for f in dataclasses.fields(item)]
    return ()


def where(value: Any, problem: str) -> str:
    """`` (at ['a'][3])`` for a number problem found inside ``value``; '' when not found."""
    if "levels deep" in problem:
        return ""
    found = locate(value, is_long_int if "integer of" in problem else _is_non_finite)
    return f" (at {found[0]})" if found and found[0] else ""


def locate(value: Any, predicate: Callable[[Any], bool], path: str = "") -> tuple[str, Any] | None:
    """The path (``['a'][3]``, '' for ``value`` itself) and value of the first item that matches.

    Recursive and slow on purpose, for messages only: it runs once a problem is known, on a
    value that was already serialized (so acyclic and at most a few hundred levels deep).
    """
    if predicate(value):
        return path, value
    if isinstance(value, Mapping):
        pairs: Iterable[tuple[Any, Any]] = value.items()
    elif isinstance(value, BaseModel):
        pairs = {**value.__dict__, **(value.__pydantic_extra__ or {})}.items()
    elif isinstance(value, list | tuple):
        pairs = enumerate(value)
    else:
        return None
    for key, item in pairs:
        found = locate(item, predicate, f"{path}[{_short_repr(key)}]")
        if found is not None:
            return found
    return None


def _short_repr(key: Any, limit: int = 40) -> str:
    """A key for a path in a message: its repr cut to ``limit`` chars (an int too long to print is named)."""
    text = f"<an integer of more than {MAX_INT_DIGITS:,} digits>" if is_long_int(key) else repr(key)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _float_token(value: float) -> str:
    """How pydantic writes a non-finite float."""
    return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def is_long_int(value: Any) -> bool:
    """An int with more than MAX_INT_DIGITS digits (which ``str()`` refuses to print)."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _TOO_LONG_INT
