"""Pure logic: retry policy, routing, state merging, keys, settings, codec, fault rules."""

from __future__ import annotations

import asyncio
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import redis
from pydantic import BaseModel
from redis.crc import key_slot

import orchestrator
from orchestrator import End, Goto, NonRetryableError, Retry, RetryAfter, Settings, Workflow, scripts
from orchestrator.codec import Dispatch, dumps
from orchestrator.connection import parse_sentinel_url, redact_url
from orchestrator.errors import ConfigError, DefinitionError, PayloadTooLarge, StepResultError, ValidationError
from orchestrator.faults import Faults, InjectedFault
from orchestrator.keys import Keys, idempotency_key

ROOT = Path(orchestrator.__file__).parent


# -- retry ------------------------------------------------------------------------------


def test_backoff_grows_exponentially_to_the_cap_with_bounded_jitter() -> None:
    policy = Retry(max_attempts=10, backoff_s=1.0, multiplier=2.0, backoff_max_s=10.0, jitter=0.5)
    rng = random.Random(7)
    for failures, base in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 10.0), (9, 10.0)]:
        for _ in range(50):
            delay = policy.delay_s(failures, rng)
            assert base * 0.5 <= delay <= base


def test_decide_stops_at_max_attempts_and_on_non_retryable_errors() -> None:
    policy = Retry(max_attempts=3, non_retryable=(KeyError,))
    assert policy.decide(RuntimeError("x"), 1) is not None
    assert policy.decide(RuntimeError("x"), 2) is not None
    assert policy.decide(RuntimeError("x"), 3) is None
    assert policy.decide(KeyError("x"), 1) is None
    assert policy.decide(NonRetryableError("x"), 1) is None
    assert policy.decide(StepResultError("x"), 1) is None


def test_a_retry_after_is_honoured_never_shortened_and_bad_values_are_ignored() -> None:
    policy = Retry(max_attempts=5, backoff_s=0.1, jitter=0)
    assert policy.decide(RetryAfter(30), 1) == 30  # the provider's word beats a short backoff
    assert policy.decide(RetryAfter(0.01), 3) == pytest.approx(0.4)  # a longer backoff stays
    assert policy.decide(RetryAfter(10), 5) is None  # and it still counts as an attempt

    class Provider429(Exception):
        retry_after = 7  # any exception that carries the attribute (seconds)

    assert policy.decide(Provider429(), 1) == 7
    for bad in (float("nan"), -1, True, "5"):
        assert policy.decide(RetryAfter(bad), 1) == pytest.approx(0.1)  # type: ignore[arg-type]
    assert policy.decide(RetryAfter(10**9), 1) == 86400  # at most a day


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"max_attempts": 0}, "max_attempts=0"),
        ({"jitter": 2}, "jitter=2"),
        ({"multiplier": 0.5}, "multiplier=0.5"),
        ({"non_retryable": ("x",)}, "exception class"),
    ],
)
def test_invalid_retry_policy_names_the_field(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(DefinitionError, match=re.escape(fragment)):
        Retry(**kwargs)  # type: ignore[arg-type]


# -- workflow definitions and routing ---------------------------------------------------


class S(BaseModel):
    n: int = 0
    tags: list[str] = []


def make() -> Workflow[S]:
    wf = Workflow("w", state=S)

    @wf.step
    def a(ctx: object, s: S) -> dict[str, int]:
        return {"n": 1}

    @wf.step
    async def b(ctx: object, s: S) -> None:
        return None

    @wf.step
    def c(ctx: object, s: S) -> None:
        return None

    return wf


def test_steps_run_in_declaration_order_and_goto_and_end_route() -> None:
    wf = make()
    a, b, c = wf.steps
    assert wf.first_step == "a" and b.is_async and not a.is_async
    assert wf.interpret(a, {"n": 1}).next_step == "b"
    assert wf.interpret(c, None).next_step is None
    assert wf.interpret(b, Goto("a", {"n": 2})).next_step == "a"
    assert wf.interpret(b, Goto("a", {"n": 2})).update == {"n": 2}
    assert wf.interpret(a, End({"n": 3})).next_step is None


def test_goto_to_an_unknown_step_names_the_known_steps() -> None:
    wf = make()
    with pytest.raises(DefinitionError, match=r"step 'zzz' is not in workflow 'w' \(steps: a, b, c\)"):
        wf.interpret(wf.steps[0], Goto("zzz"))


def test_a_step_returning_a_non_mapping_is_a_clear_error() -> None:
    wf = make()
    with pytest.raises(StepResultError, match="returned int; expected a dict"):
        wf.interpret(wf.steps[0], 42)


def test_merge_rejects_unknown_fields_and_bad_types_naming_them() -> None:
    wf = make()
    with pytest.raises(StepResultError, match=r"unknown field\(s\) \['nope'\]"):
        wf.merge(S(), {"nope": 1}, where="step a")
    with pytest.raises(StepResultError, match="n: Input should be a valid integer"):
        wf.merge(S(), {"n": "many"}, where="step a")
    assert wf.merge(S(n=1, tags=["x"]), {"n": 2}, where="a") == S(n=2, tags=["x"])


def test_definition_errors_are_caught_when_the_workflow_is_declared() -> None:
    wf = make()
    with pytest.raises(DefinitionError, match="defined twice"):
        wf.step(lambda ctx, s: None, name="a")
    with pytest.raises(DefinitionError, match="expected a function of \\(ctx, state\\)"):
        wf.step(lambda ctx: None, name="d")
    with pytest.raises(DefinitionError, match="workflow name"):
        Workflow("bad name")
    with pytest.raises(DefinitionError, match="queue"):
        Workflow("ok", queue="{bad}")


def test_input_validation_names_the_field_and_value() -> None:
    with pytest.raises(ValidationError, match=r"input of workflow 'w' is invalid: n: .*\(got 'x'\)"):
        make().validate_input({"n": "x"})


# -- keys -------------------------------------------------------------------------------


def test_every_key_a_run_script_touches_shares_the_runs_partition_slot() -> None:
    keys = Keys("orch")
    for run_id in ("acme-q4", "r1", "x" * 200):
        slots = {key_slot(k.encode()) for k in vars(keys.run(run_id)).values()}
        slots |= {key_slot(k.encode()) for k in vars(keys.queue_of("default", run_id)).values()}
        part = keys.part_of(run_id)
        slots |= {key_slot(k.encode()) for k in (part.active, part.done, part.dead, part.stats, part.stats_detail)}
        assert len(slots) == 1, run_id


def test_partitions_spread_evenly_over_the_slot_space() -> None:
    """Partition i's tag lands in the i-th 1/P of the 16,384 slots, so P partitions spread over
    any number of equal-range shards as evenly as P allows (plain tags fall 4/5/7 over 3)."""
    for partitions in (1, 3, 16, 64):
        keys = Keys("orch", partitions)
        for p in range(partitions):
            assert key_slot(keys.tag(p).encode()) * partitions // 16384 == p
    keys = Keys("orch", 16)
    shares = Counter(keys.partition_of(f"run-{i}") for i in range(16_000))
    assert set(shares) == set(range(16)) and max(shares.values()) < 1.1 * 1000


def test_idempotency_key_is_run_and_step_plus_visit_after_the_first() -> None:
    assert idempotency_key("r", "send", 1) == "r:send"
    assert idempotency_key("r", "send", 3) == "r:send:3"


def test_the_key_prefix_literal_appears_only_in_keys_py() -> None:
    offenders = []
    for path in ROOT.rglob("*.py"):
        if path.name == "keys.py":
            continue
        text = path.read_text()
        if re.search(r"""["'][^"'\n]*:(run|queue|runs|fleet|stats|rejected):\{""", text):
            offenders.append(str(path))
    for path in (ROOT / "scripts").glob("*.lua"):
        if re.search(r"""['"]\w+:(run|queue|runs):""", path.read_text()):
            offenders.append(str(path))
    assert offenders == []


# -- settings, urls, codec, faults ------------------------------------------------------


def test_every_setting_is_documented_in_the_readme_with_its_default() -> None:
    """The README's configuration table is the reference users read: no setting missing from it."""
    readme = (ROOT.parent / "README.md").read_text()
    table = readme[readme.index("| Setting | Default |") : readme.index("\n\n", readme.index("| Setting | Default |"))]
    documented = set(re.findall(r"`([a-z_]+)`", table))
    internal = {"faults"}  # test-only: armed crash points
    assert set(Settings.model_fields) - internal - documented == set()


def test_every_setting_has_a_cli_flag_of_the_same_name() -> None:
    """``ORCHESTRATOR_LEASE_S`` is ``--lease-s`` on the commands that use it (faults: env only, tests)."""
    import click

    from orchestrator.cli import cli

    flags: set[str] = set()

    def walk(command: click.Command) -> None:
        flags.update(opt for p in command.params if isinstance(p, click.Option) for opt in p.opts)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    walk(cli)
    assert {f"--{name.replace('_', '-')}" for name in Settings.model_fields if name != "faults"} - flags == set()


def test_settings_refuse_a_lease_that_heartbeats_cannot_keep_alive() -> None:
    with pytest.raises(ConfigError, match=r"lease_s \(2.0\) must be more than 3 x heartbeat_interval_s"):
        Settings(lease_s=2.0, heartbeat_interval_s=1.0)
    with pytest.raises(ConfigError, match="namespace"):
        Settings(namespace="a b")


def test_settings_read_env_and_plain_redis_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://:secret@h:1/0")
    monkeypatch.setenv("ORCHESTRATOR_LEASE_S", "9")
    s = Settings()
    assert s.plain_url() == "redis://:secret@h:1/0" and s.lease_s == 9
    assert "secret" not in repr(s) and "secret" not in s.redacted_url and "secret" not in str(s.redis_url)


def test_redact_url_hides_passwords() -> None:
    assert redact_url("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact_url("rediss://:pw@host/0") == "rediss://:***@host/0"
    assert redact_url("redis://host/0?password=pw") == "redis://host/0?password=***"


def test_sentinel_url_parsing() -> None:
    t = parse_sentinel_url("redis+sentinel://:pw@s1:26379,s2:26380/mymaster/2")
    assert t.hosts == [("s1", 26379), ("s2", 26380)] and t.service == "mymaster" and t.db == 2
    assert t.password == "pw"


def test_dumps_names_the_thing_that_is_not_json_or_too_large() -> None:
    with pytest.raises(ValidationError, match="stash of x is not JSON-serializable"):
        dumps(object(), what="stash of x")
    with pytest.raises(PayloadTooLarge, match="over the limit of 2048"):
        dumps("y" * 5000, what="input", limit=2048)


def test_dispatch_refuses_malformed_entries() -> None:
    Dispatch.model_validate({"run": "r", "wf": "w", "step": "s", "visit": "1"})
    for bad in (
        {},
        {"run": "r{x}", "wf": "w", "step": "s", "visit": "1"},
        {"run": "r", "wf": "w", "step": "s", "visit": "0"},
        {"run": "r", "wf": "w", "step": "s", "visit": "1", "extra": "x"},
    ):
        with pytest.raises(Exception, match="validation error"):
            Dispatch.model_validate(bad)


def test_fault_rules_fire_only_when_armed_for_that_step_and_hit() -> None:
    Faults("").hit("before_commit")
    faults = Faults("before_commit=raise@s1#2")
    faults.hit("before_commit", "s1")
    faults.hit("before_commit", "s2")
    with pytest.raises(InjectedFault):
        faults.hit("before_commit", "s1")
    faults.hit("before_commit", "s1")
    with pytest.raises(ValueError, match="unknown"):
        Faults("nowhere=kill")


def test_public_api_is_pinned() -> None:
    assert orchestrator.__all__ == sorted(orchestrator.__all__)
    assert set(orchestrator.__all__) == {
        "Child",
        "ChildResult",
        "ClaimLost",
        "Client",
        "ConfigError",
        "DefinitionError",
        "End",
        "Goto",
        "InvalidTransition",
        "ItemResult",
        "Map",
        "NonRetryableError",
        "OrchestratorError",
        "PayloadTooLarge",
        "RedisRefused",
        "RedisUnavailable",
        "Retry",
        "RetryAfter",
        "Run",
        "RunCancelled",
        "RunConflict",
        "RunFailed",
        "RunHistory",
        "RunInfo",
        "RunNotFound",
        "Settings",
        "Sleep",
        "StartChildren",
        "WaitFor",
        "StepContext",
        "StepResultError",
        "Supervisor",
        "ValidationError",
        "WaitTimeout",
        "Worker",
        "Workflow",
    }


def test_no_pickle_anywhere_in_the_library() -> None:
    for path in ROOT.rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)", path.read_text(), re.M), path


def test_unknown_orchestrator_variables_are_named_with_a_guess() -> None:
    from orchestrator.settings import unknown_variables

    env = {"ORCHESTRATOR_DRAIN_GRACE": "5", "ORCHESTRATOR_LEASE_S": "9", "ORCHESTRATOR_DEMO_DB": "x", "HOME": "/"}
    assert unknown_variables(env) == [
        "ORCHESTRATOR_DRAIN_GRACE is not a setting and is ignored; did you mean ORCHESTRATOR_DRAIN_GRACE_S?"
    ]


class _PipelineReplying:
    """A pipeline stand-in whose replies are given: what a cluster's pipeline hands back when one
    node fails (its error as that call's reply) and the others answer."""

    def __init__(self, replies: list[object]) -> None:
        self.replies = replies

    def pipeline(self, transaction: bool = False) -> _PipelineReplying:
        return self

    def execute_command(self, *args: object) -> None:
        pass

    def execute(self, raise_on_error: bool = True) -> list[object]:
        return self.replies


def test_a_node_error_among_pipeline_replies_is_raised_not_returned_as_a_reply() -> None:
    failure = redis.exceptions.ClusterError("slot 42 still split after the retries")
    calls = [scripts.command("HGET", "k", "f"), scripts.command("HGET", "k2", "f")]
    with pytest.raises(redis.exceptions.ClusterError):
        scripts.execute(_PipelineReplying(["v", failure]), calls)  # type: ignore[arg-type]
    assert scripts.execute(_PipelineReplying(["v", failure]), calls, raise_on_error=False) == ["v", failure]  # type: ignore[arg-type]


LUA_BUILTINS = frozenset(
    [
        "assert",
        "error",
        "ipairs",
        "next",
        "pairs",
        "pcall",
        "select",
        "setmetatable",
        "tonumber",
        "tostring",
        "type",
        "unpack",
        "collectgarbage",
        "function",
        "if",
        "elseif",
        "while",
        "return",
        "and",
        "or",
        "not",
    ]
)


def test_every_script_carries_each_prelude_helper_it_calls() -> None:
    """Scripts get only the prelude definitions they use (scripts._needed): a helper called but
    left out would fail only when that path runs, perhaps a rare one. Every name called as a
    function in a script's source must be defined in that source or be Lua's own."""
    for name in scripts.names():
        source = scripts.load(name).source
        code = re.sub(r"'[^'\n]*'|\"[^\"\n]*\"", "''", source)  # string literals out
        code = "\n".join(line.split("--", 1)[0] for line in code.splitlines())
        declared = re.findall(r"\blocal (?:function )?([A-Za-z_]\w*(?:\s*,\s*[A-Za-z_]\w*)*)", code)
        defined = {part.strip() for names in declared for part in names.split(",")}
        called = set(re.findall(r"(?<![.:\w])([A-Za-z_]\w*)\s*\(", code))
        missing = called - defined - LUA_BUILTINS
        assert not missing, f"{name}.lua calls {sorted(missing)} without defining them"


def test_the_event_loop_setting_picks_uvloop_where_installed_and_says_so_where_it_is_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    import uvloop

    from orchestrator.worker.loop import loop_factory

    assert loop_factory("auto") is uvloop.new_event_loop and loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as on a platform without it: import fails
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="event_loop is 'uvloop' but uvloop is not installed"):
        loop_factory("uvloop")
    with pytest.raises(ConfigError, match="event_loop"):
        Settings(event_loop="trio")  # type: ignore[arg-type]


def test_a_write_on_a_closed_uvloop_transport_is_a_connection_error_retried_as_one() -> None:
    """uvloop raises RuntimeError("... the handler is closed") for a write on a connection the
    peer reset, where asyncio's loop stays quiet; redis-py lets it through, and a network blip
    stopped a worker (caught by tests/chaos/test_lost_replies.py on the dependency floors)."""
    from orchestrator.connection import _async_retry

    closed = RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")
    raised: list[BaseException] = []

    async def flaky(failures: list[BaseException]) -> str:
        if failures:
            raise failures.pop()
        return "answered"

    async def disconnect(error: BaseException) -> None:  # redis-py drops the connection before a retry
        raised.append(error)

    async def main() -> tuple[str, type[BaseException]]:
        retry = _async_retry()
        failures: list[BaseException] = [closed, closed]
        answer = await retry.call_with_retry(lambda: flaky(failures), disconnect)
        other: list[BaseException] = [RuntimeError("something else")]
        with pytest.raises(RuntimeError, match="something else"):
            await retry.call_with_retry(lambda: flaky(other), disconnect)
        return answer, type(raised[0])

    answer, kind = asyncio.run(main())
    assert answer == "answered" and len(raised) == 2 and issubclass(kind, redis.ConnectionError)
