"""Codec limits (issue 9, hole 6): what enters is refused unless every reader can decode it again.

No Redis: ``dumps`` / ``encode_fields`` / ``Workflow.json_fields`` / ``loads``, the bounded
``ErrorInfo`` and ``StepContext.record_cost``.
"""

from __future__ import annotations

import json
import math
import random
import sys
import traceback
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pydantic
import pydantic_core
import pytest
from pydantic import BaseModel

from orchestrator import StepContext, Workflow
from orchestrator.codec import (
    MAX_MESSAGE_CHARS,
    MAX_TRACEBACK_CHARS,
    MAX_TYPE_CHARS,
    ErrorInfo,
    HistoryEvent,
    dumps,
    encode_fields,
    loads,
)
from orchestrator.errors import PayloadTooLarge, StepResultError, ValidationError
from orchestrator.limits import MAX_INT_DIGITS, MAX_JSON_DEPTH, json_problem


def nested(depth: int, leaf: Any = 1) -> Any:
    """``leaf`` inside ``depth`` levels of alternating lists and objects."""
    value = leaf
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def digits(n: int) -> int:
    """An integer of exactly ``n`` digits."""
    return int(10 ** (n - 1)) + 7


# -- the three limits, through dumps (the stash path) -------------------------------------


def test_the_limits_are_cpythons_int_limit_and_a_generous_depth() -> None:
    assert MAX_INT_DIGITS == 4300 == sys.get_int_max_str_digits()
    assert 50 <= MAX_JSON_DEPTH <= 200  # pydantic's own JSON parser stops at 200 levels


def test_an_integer_of_at_most_4300_digits_passes_and_a_longer_one_is_refused_with_its_length() -> None:
    assert dumps({"n": digits(MAX_INT_DIGITS)}, what="stash") == f'{{"n":{digits(MAX_INT_DIGITS)}}}'
    assert dumps(-digits(MAX_INT_DIGITS), what="stash").startswith("-1")
    with pytest.raises(ValidationError, match=r"^stash holds an integer of 4,301 digits \(1000000000…0000000007\)"):
        dumps(digits(MAX_INT_DIGITS + 1), what="stash")
    expected = r"stash holds an integer of 5,000 digits \(-100000000…0000000007\).*at most 4,300 digits.*\['a'\]\[1\]"
    with pytest.raises(ValidationError, match=expected):
        dumps({"a": [1, -digits(5000)]}, what="stash")


def test_a_string_of_5000_digits_and_strings_that_look_like_tokens_pass() -> None:
    value = {
        "digits": "1" * 5000,
        "escaped": '\\"' + "2" * 5000 + '"\\',
        "words": "NaN, Infinity and -Infinity are not numbers here",
        "brackets": "[" * 500 + "{" * 500,
        "1" * 5000: "a key of digits",
    }
    assert json.loads(dumps(value, what="stash")) == value


def test_floats_with_many_digits_or_large_exponents_pass() -> None:
    value = [1e308, -1.7976931348623157e308, 5e-324, 0.1, 1234567890.0987654]
    assert json.loads(dumps(value, what="stash")) == value


def test_nesting_up_to_the_limit_passes_and_deeper_is_refused_with_its_depth() -> None:
    assert json.loads(dumps(nested(MAX_JSON_DEPTH), what="stash")) == nested(MAX_JSON_DEPTH)
    with pytest.raises(ValidationError, match=rf"^stash is nested {MAX_JSON_DEPTH + 1} levels deep; at most 100"):
        dumps(nested(MAX_JSON_DEPTH + 1), what="stash")
    with pytest.raises(ValidationError, match=r"stash is nested 200 levels deep"):
        dumps({"wide": list(range(1000)), "deep": nested(199)}, what="stash")


def test_nesting_that_pydantic_cannot_serialize_is_refused_in_terms_of_the_limit() -> None:
    with pytest.raises(ValidationError, match=r"nested too deeply or contains itself.*at most 100 levels"):
        dumps(nested(300), what="stash")


def test_a_wide_document_is_not_mistaken_for_a_deep_one() -> None:
    value = [{"a": [i, {"b": "]]]]" * 40}]} for i in range(2000)]
    assert json_problem(pydantic_core.to_json(value)) is None


class Scored(BaseModel):
    score: float = 0.0
    extra: Any = None


@dataclass
class Point:
    x: float


@pytest.mark.parametrize(
    "value, token, path",
    [
        (math.nan, "NaN", ""),
        ({"a": [1.0, math.inf]}, "Infinity", r" \(at \['a'\]\[1\]\)"),
        ({"a": {"b": -math.inf}}, "-Infinity", r" \(at \['a'\]\['b'\]\)"),
        ([Point(x=1.0), Point(x=math.nan)], "NaN", ""),
    ],
)
def test_nan_and_infinity_are_refused_instead_of_written_as_invalid_json(value: Any, token: str, path: str) -> None:
    assert pydantic_core.to_json(value) != b"null"  # what pydantic would write: a bare NaN token
    with pytest.raises(ValidationError, match=rf"^stash holds {token}; JSON has no NaN or Infinity.*{path}$"):
        dumps(value, what="stash")


@pytest.mark.parametrize(
    "value, path",
    [
        (Scored(score=math.nan), r"\['score'\]"),
        ({"m": Scored(extra={"deep": [math.inf]})}, r"\['m'\]\['extra'\]\['deep'\]\[0\]"),
    ],
)
def test_nan_inside_a_model_that_pydantic_would_silently_store_as_null_is_refused(value: Any, path: str) -> None:
    assert b"null" in pydantic_core.to_json(value)  # the silent data change this prevents
    with pytest.raises(ValidationError, match=r"^stash holds (NaN|Infinity)") as caught:
        dumps(value, what="stash")
    assert caught.match(path)


def test_a_genuine_null_is_fine() -> None:
    assert dumps(Scored(extra=None), what="stash") == '{"score":0.0,"extra":null}'


def test_the_size_limit_is_still_checked_first() -> None:
    with pytest.raises(PayloadTooLarge, match="over the limit of 2048"):
        dumps([math.nan] + ["y"] * 1000, what="stash", limit=2048)


def test_json_problem_agrees_with_pythons_json_on_random_documents() -> None:
    """A reference check: decode with Python's json and judge the decoded tokens."""
    rng = random.Random(9)
    alphabet = '"\\[]{}NaInfity0123456789 -.e'
    problems = 0
    for _ in range(400):
        value = _random_value(rng, alphabet, rng.randint(0, 4))
        if rng.random() < 0.3:
            value = nested(rng.randint(95, 105), value)
        raw = pydantic_core.to_json(value)
        expected = _reference_problem(raw.decode())
        found = json_problem(raw)
        assert (found is not None) == expected, (found, raw[:200])
        problems += expected
    assert 20 < problems < 380  # both kinds of document were tried


def _random_value(rng: random.Random, alphabet: str, depth: int) -> Any:
    roll = rng.random()
    if depth and roll < 0.4:
        if rng.random() < 0.5:
            return [_random_value(rng, alphabet, depth - 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(alphabet) * rng.randint(0, 3): _random_value(rng, alphabet, depth - 1) for _ in range(3)}
    if roll < 0.6:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) + "7" * rng.choice([0, 4400])
    if roll < 0.75:
        return digits(rng.choice([1, 12, MAX_INT_DIGITS, MAX_INT_DIGITS + 1]))
    if roll < 0.85:
        return rng.choice([0.5, -2.25e300, math.nan, math.inf, -math.inf])
    return rng.choice([None, True, False])


def _reference_problem(raw: str) -> bool:
    found = {"bad": False}

    def constant(_: str) -> None:
        found["bad"] = True

    def integer(text: str) -> int:
        found["bad"] = found["bad"] or len(text.lstrip("-")) > MAX_INT_DIGITS
        return 0

    def depth(value: Any) -> int:
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        return 0 if children is None else 1 + max((depth(c) for c in children), default=0)

    decoded = json.loads(raw, parse_constant=constant, parse_int=integer)
    return found["bad"] or depth(decoded) > MAX_JSON_DEPTH


# -- submit and commit: Workflow.json_fields + encode_fields --------------------------------


class Doc(BaseModel):
    data: Any = None
    score: float = 0.0
    items: list[float] = []


doc_flow = Workflow("doc", state=Doc)


@pytest.mark.parametrize(
    "update, expected",
    [
        ({"data": digits(5000)}, r"field 'data' holds an integer of 5,000 digits"),
        ({"data": nested(200)}, r"field 'data' is nested 200 levels deep"),
        ({"data": {"x": [math.nan]}}, r"field 'data' holds NaN.*\(at \['x'\]\[0\]\)"),
        ({"score": math.inf}, r"field 'score' holds Infinity"),
        ({"items": [0.5, -math.inf]}, r"field 'items' holds -Infinity.*\(at \[1\]\)"),
    ],
)
def test_an_update_breaking_a_limit_is_a_step_result_error_naming_the_field(
    update: dict[str, Any], expected: str
) -> None:
    merged = doc_flow.merge(Doc(), update, where="step 's'")
    with pytest.raises(StepResultError, match=rf"^update from step 's' {expected}"):
        doc_flow.json_fields(merged, update.keys(), what="update from step 's'")


def test_a_nan_in_an_untyped_field_is_refused_although_the_json_dump_made_it_none() -> None:
    state: Any = Workflow("free").validate_input({"a": math.nan, "b": 1})
    assert state.model_dump(mode="json")["a"] is None  # the silent change
    with pytest.raises(StepResultError, match=r"input field 'a' holds NaN"):
        Workflow("free").json_fields(state, ["a", "b"], what="input")


def test_fields_within_the_limits_are_encoded_once_and_as_before() -> None:
    state = doc_flow.merge(Doc(), {"data": {"n": digits(MAX_INT_DIGITS), "s": "9" * 5000}, "score": 0.25}, where="s")
    values = doc_flow.json_fields(state, ["data", "score"], what="update")
    assert values == {"data": {"n": digits(MAX_INT_DIGITS), "s": "9" * 5000}, "score": 0.25}
    fields = encode_fields(values, what="update", limit=1 << 20)
    assert fields == {"data": pydantic_core.to_json(values["data"]).decode(), "score": "0.25"}


def test_an_update_is_encoded_without_serializing_the_fields_it_leaves_alone() -> None:
    """A step's commit serializes the fields it updates, not the whole state (an agent's state
    can hold a long history): a field it does not touch is not even read by the dump."""
    calls: list[str] = []

    class Tracked(BaseModel):
        history: list[str] = []
        score: float = 0.0

        @pydantic.field_serializer("history")
        def _count(self, value: list[str]) -> list[str]:
            calls.append("history")
            return value

    flow = Workflow("tracked", state=Tracked)
    state = flow.merge(Tracked(history=["turn"] * 1000), {"score": 0.5}, where="s")
    calls.clear()  # merge() validates the whole merged state, by design
    assert flow.json_fields(state, ["score"], what="update") == {"score": 0.5}
    assert flow.json_fields(state, [], what="update") == {}
    assert calls == []
    assert flow.json_fields(state, ["history"], what="update") == {"history": ["turn"] * 1000}
    assert calls == ["history"]


def test_encode_fields_checks_plain_values_too_and_names_the_field() -> None:
    assert encode_fields({"a": [1, "NaN"]}, what="input", limit=100) == {"a": '[1,"NaN"]'}
    with pytest.raises(ValidationError, match=r"^input field 'b' holds NaN"):
        encode_fields({"a": 1, "b": [math.nan]}, what="input", limit=100)
    with pytest.raises(PayloadTooLarge):
        encode_fields({"a": "x" * 200, "b": [math.nan]}, what="input", limit=100)


# -- reading back: loads -------------------------------------------------------------------


def test_loads_turns_every_decoding_failure_into_a_validation_error_naming_what() -> None:
    with pytest.raises(ValidationError, match=r"^state field 'a' cannot be decoded: Exceeds the limit \(4300 digits\)"):
        loads("9" * 5000, what="state field 'a'")
    with pytest.raises(ValidationError, match=r"^stash cannot be decoded: it is nested too deeply"):
        loads("[" * 100_000 + "]" * 100_000, what="stash")
    with pytest.raises(ValidationError, match=r"^stash is not valid JSON"):
        loads("{", what="stash")
    with pytest.raises(ValidationError, match=r"^stash cannot be decoded"):
        loads(None, what="stash")  # type: ignore[arg-type]


def test_loads_stays_lenient_with_what_older_versions_stored() -> None:
    assert math.isnan(loads("NaN", what="x"))
    assert loads(str(digits(MAX_INT_DIGITS)), what="x") == digits(MAX_INT_DIGITS)


# -- errors stored bounded ------------------------------------------------------------------


def raise_huge(size: int) -> None:
    raise RuntimeError("m" * size)


def test_a_huge_error_message_is_stored_cut_with_its_original_length() -> None:
    try:
        raise_huge(8 << 20)
    except RuntimeError as exc:
        info = ErrorInfo.from_exception(exc, retryable=True)
    assert info.message == "m" * MAX_MESSAGE_CHARS + "… [truncated: 8,388,608 chars in all]"
    assert len(info.traceback) < MAX_TRACEBACK_CHARS + 60
    assert "in raise_huge" in info.traceback  # the raise site survives: the message was cut in place
    assert info.traceback.endswith("RuntimeError: " + info.message + "\n")
    assert len(info.model_dump_json()) < 8 * 1024


def test_a_long_traceback_keeps_its_tail_with_the_raise_site_and_says_how_long_it_was() -> None:
    def fail_in_layers(layer: int) -> None:
        if layer == 0:
            raise_huge(10)
        try:
            fail_in_layers(layer - 1)
        except RuntimeError as exc:
            raise RuntimeError(f"layer {layer} failed: " + "x" * 200) from exc

    try:
        fail_in_layers(40)
    except RuntimeError as exc:
        info = ErrorInfo.from_exception(exc, retryable=True)
        full = len("".join(traceback.format_exception(exc)))
    assert full > 3 * MAX_TRACEBACK_CHARS
    assert info.traceback.startswith(f"[truncated: {full:,} chars in all] …")
    assert len(info.traceback) == MAX_TRACEBACK_CHARS + len(f"[truncated: {full:,} chars in all] …")
    assert info.traceback.endswith("RuntimeError: layer 40 failed: " + "x" * 200 + "\n")


def test_a_huge_message_in_a_cause_is_cut_too() -> None:
    try:
        try:
            raise_huge(1 << 20)
        except RuntimeError as inner:
            raise ValueError("outer") from inner
    except ValueError as exc:
        info = ErrorInfo.from_exception(exc, retryable=False)
    assert info.message == "outer"
    assert "ValueError: outer" in info.traceback and "[truncated: 1,048,576 chars in all]" in info.traceback
    assert len(info.traceback) < MAX_TRACEBACK_CHARS + 60


def test_a_short_error_is_stored_as_it_is_and_old_records_still_parse() -> None:
    try:
        raise KeyError("k")
    except KeyError as exc:
        info = ErrorInfo.from_exception(exc, retryable=True)
    assert info.type == "KeyError" and info.message == "'k'" and "truncated" not in info.traceback
    old = '{"type":"error","error":{"type":"X","message":"' + "y" * 9000 + '","traceback":"","retryable":true}}'
    assert HistoryEvent.model_validate_json(old).error is not None


def test_a_long_type_name_and_a_failing_str_are_handled() -> None:
    class Broken(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no str")

    Broken.__qualname__ = "B" * 1000
    info = ErrorInfo.from_exception(Broken(), retryable=True)
    assert info.type == "B" * MAX_TYPE_CHARS + "… [truncated: 1,000 chars in all]"
    assert info.message.endswith(": str() failed>")


# -- record_cost ----------------------------------------------------------------------------


def context() -> StepContext:
    async def save_async(raw: str) -> bool:
        return True

    return StepContext(
        run_id="r1",
        workflow="w",
        step="s",
        visit=1,
        attempt=1,
        fencing_token=1,
        snapshot=None,
        worker_id="w1",
        max_payload_bytes=1 << 20,
        save_stash=lambda raw: True,
        save_stash_async=save_async,
    )


def test_record_cost_sums_finite_amounts_per_unit() -> None:
    ctx = context()
    ctx.record_cost(tokens=1200, usd=0.004)
    ctx.record_cost(tokens=300, usd=Decimal("0.001"), gpu_s=Fraction(1, 2))  # type: ignore[arg-type]
    assert ctx.cost == {"tokens": 1500.0, "usd": pytest.approx(0.005), "gpu_s": 0.5}


@pytest.mark.parametrize("amount", [math.nan, math.inf, -math.inf, True, "1", None, -1, 10**400, Decimal("NaN")])
def test_record_cost_refuses_amounts_that_are_not_finite_numbers_naming_unit_and_value(amount: Any) -> None:
    ctx = context()
    ctx.record_cost(usd=1)
    with pytest.raises(ValidationError, match=r"record_cost\(\) in step 's' \(run 'r1'\): usd=.* is refused") as caught:
        ctx.record_cost(tokens=5, usd=amount)
    assert caught.value.run_id == "r1" and caught.value.step == "s"
    assert ctx.cost == {"usd": 1.0}  # all or nothing: tokens was not recorded either


@pytest.mark.parametrize("unit", ["a|b", "1x", "x" * 65, "", "usd dollars", "ü"])
def test_record_cost_refuses_unit_names_that_are_not_safe_identifiers(unit: str) -> None:
    ctx = context()
    with pytest.raises(ValidationError, match=r"record_cost\(\) in step 's' .*: unit .* is invalid"):
        ctx.record_cost(**{unit: 1})
    assert ctx.cost == {}


def test_record_cost_refuses_a_running_total_that_would_overflow() -> None:
    ctx = context()
    ctx.record_cost(usd=1.5e308)
    with pytest.raises(ValidationError, match=r"usd=1.5e\+308 is refused.*total so far is 1.5e\+308"):
        ctx.record_cost(usd=1.5e308)
    assert ctx.cost == {"usd": 1.5e308}


def test_a_stash_that_breaks_a_limit_raises_before_anything_is_saved() -> None:
    saved: list[str] = []

    async def save_async(raw: str) -> bool:
        saved.append(raw)
        return True

    def save(raw: str) -> bool:
        saved.append(raw)
        return True

    ctx = context()
    ctx._save_stash = save
    ctx._save_stash_async = save_async
    with pytest.raises(ValidationError, match=r"^stash of step 's' \(run 'r1'\) holds an integer of 5,000 digits"):
        ctx.stash({"n": digits(5000)})
    with pytest.raises(ValidationError, match=r"holds NaN"):
        ctx.stash([math.nan])
    ctx.stash({"n": "5" * 5000})
    assert saved == ['{"n":"' + "5" * 5000 + '"}']
