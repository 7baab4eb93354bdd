"""A Redis password never reaches output: every error path of the CLI and the library that a
password-bearing URL can reach is run, and all of stdout, stderr and the logs is searched for it.

Two passwords: a plain distinctive one and one with an ``@`` inside (which a regex-based mask
missed), each also behind an upper-case scheme (``REDIS://``, also missed).
"""

from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from orchestrator import Client, ConfigError, OrchestratorError, RedisRefused, RedisUnavailable, Settings
from orchestrator.connection import connect, redact_url
from orchestrator.embedded import RedisServer, free_port
from orchestrator.logs import configure
from orchestrator.redact import Secrets, mask
from tests.conftest import fast_settings
from tests.harness import REPO, Proc, process_env, run_cli, start_supervisor, start_worker
from tests.helpers import wait_until
from workers.testflows import chain

PASSWORDS = ["Xq7-S3cr3t-pW9", "p@ss-W0rd-Zk4"]
WRONG = "Wr0ng-Secret-88"


def leaks(text: str, *secrets: str) -> list[str]:
    """The secrets (or their percent-encoded forms) found in ``text``."""
    found = []
    for secret in secrets:
        for form in {secret, secret.replace("@", "%40")}:
            if form in text:
                found.append(form)
    return found


def variants(url: str) -> list[str]:
    """``url`` as written and behind upper- and mixed-case schemes."""
    scheme, rest = url.split("://", 1)
    return [url, f"{scheme.upper()}://{rest}", f"{scheme.capitalize()}://{rest}"]


@pytest.fixture(params=PASSWORDS, ids=["plain", "at-sign"])
def protected(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis", appendfsync=None, password=request.param) as server:
        yield server


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, timeout=timeout)


def error_paths(protected: RedisServer, tmp_path: Path) -> list[tuple[str, list[str], dict[str, str]]]:
    """``(what, arguments, environment)`` of every CLI error path a password-bearing URL reaches."""
    password = protected.password or ""
    good = fast_settings(protected.url)
    unreachable = protected.url.replace(f":{protected.port}/", f":{free_port()}/")
    wrong = protected.url.replace(password, WRONG)
    missing = protected.url.replace(f":{password}@", "")
    (tmp_path / "leaky_import.py").write_text(
        "import os\nraise RuntimeError('cannot start with ' + os.environ['ORCHESTRATOR_REDIS_URL'] + "
        "' password ' + os.environ['LEAKY_PASSWORD'])\n"
    )
    cases: list[tuple[str, list[str], dict[str, str]]] = []
    for url in variants(protected.url):  # every command on the URL as written, a few on the others
        env = process_env(good, ORCHESTRATOR_REDIS_URL=url, ORCHESTRATOR_LOG_LEVEL="DEBUG")
        slow_beats = {**env, "ORCHESTRATOR_HEARTBEAT_INTERVAL_S": "1.0"}  # so that --lease-s 1 is refused
        cases += [
            ("bad namespace", ["--namespace", "bad ns!", "stats"], env),
            ("cross-field settings", ["worker", "workers.testflows:chain", "--lease-s", "1"], slow_beats),
            ("cross-field, url after", ["supervisor", "--lease-s", "1", "--redis-url", url], slow_beats),
        ]
        if url == protected.url:
            cases += [
                ("bad setting from env", ["status", "r1"], {**env, "ORCHESTRATOR_LEASE_S": "soon"}),
                ("typo of the url variable", ["status", "r1"], {**env, "ORCHESTRATOR_REDIS_UR": url}),
                ("status of a missing run", ["status", "r1"], env),
                ("json logs", ["--log-format", "json", "runs", "list"], env),
            ]
    every = (["status", "r1"], ["history", "r1"], ["runs", "list"], ["stats"], ["top", "--iterations", "1"])
    every += (["cancel", "r1"], ["submit", "workers.testflows:chain", "{}"])
    for failing in (unreachable, wrong, missing):
        for url in variants(failing):
            env = process_env(good, ORCHESTRATOR_REDIS_URL=url, ORCHESTRATOR_LOG_LEVEL="DEBUG")
            for args in every if url == failing else every[:1]:
                cases.append((f"{args[0]} on {redact_url(url)}", args, env))
            cases.append(("url flag after", ["retry", "r1", "--redis-url", url], process_env(good)))
    for port in ("99999", "abc"):
        for url in variants(protected.url.replace(f":{protected.port}/", f":{port}/")):
            cases.append((f"port {port}", ["status", "r1"], process_env(good, ORCHESTRATOR_REDIS_URL=url)))
    scheme = protected.url.replace("redis://", "http://")
    cases.append(("unknown scheme", ["status", "r1"], process_env(good, ORCHESTRATOR_REDIS_URL=scheme)))
    cases.append(("url flag", ["--redis-url", scheme, "status", "r1"], process_env(good)))
    for name, url in (("unreachable", unreachable), ("refused", wrong)):
        chaos = ["chaos", "--duration", "1", "--chaos-dir", str(tmp_path / "chaos" / name)]
        cases.append((f"chaos {name}", chaos, process_env(good, ORCHESTRATOR_REDIS_URL=url)))
    leaky_env = process_env(good, LEAKY_PASSWORD=password, PYTHONPATH=f"{REPO}:{tmp_path}")
    cases.append(("an unexpected traceback", ["worker", "leaky_import:flow"], leaky_env))
    return cases


def test_no_error_path_of_the_cli_prints_the_password(protected: RedisServer, tmp_path: Path) -> None:
    password = protected.password or ""
    cases = error_paths(protected, tmp_path)
    with ThreadPoolExecutor(max_workers=6) as pool:  # unreachable ones wait out redis-py's retries (~3 s)
        results = list(pool.map(lambda case: cli(*case[1], env=case[2]), cases))
    failures = []
    for (what, args, _env), result in zip(cases, results, strict=True):
        found = leaks(result.stdout + result.stderr, password, WRONG)
        if found:
            failures.append(f"{what} ({args}): {found} in {result.stdout + result.stderr!r}")
        if what != "json logs":
            assert result.returncode != 0, (what, result.stdout, result.stderr)
        if what != "an unexpected traceback":
            assert "Traceback" not in result.stderr, (what, result.stderr)
    assert failures == []
    logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "chaos").rglob("*.log"))
    assert leaks(logs, password, WRONG) == []


def test_worker_and_supervisor_start_up_failures_never_log_the_password(protected: RedisServer, tmp_path: Path) -> None:
    password = protected.password or ""
    unreachable = protected.url.replace(f":{protected.port}/", f":{free_port()}/")
    procs: list[Proc] = []
    for i, url in enumerate([*variants(unreachable), protected.url.replace(password, WRONG)]):
        settings = fast_settings(url)
        procs.append(start_worker(settings, tmp_path, "workers.testflows:chain", name=f"w{i}"))
        procs.append(start_supervisor(settings, tmp_path, name=f"s{i}"))
    try:
        for proc in procs:
            wait_until(lambda proc=proc: "retrying until it answers" in proc.output(), timeout_s=30, what="outage")
    finally:
        for proc in procs:
            proc.signal(signal.SIGTERM)
        codes = [proc.wait() for proc in procs]
    assert codes == [0] * len(procs)
    for proc in procs:
        assert leaks(proc.output(), password, WRONG) == [], proc.output()
        assert ":***@127.0.0.1:" in proc.output()


def test_a_step_error_quoting_the_url_is_masked_in_logs_and_output(protected: RedisServer, tmp_path: Path) -> None:
    """A step that puts its URL into an exception: the worker's log lines and tracebacks, and
    what `status` and `history` print of the stored error, are masked."""
    password = protected.password or ""
    (tmp_path / "leaky_flow.py").write_text(
        "import os\n"
        "from orchestrator import NonRetryableError, Workflow\n"
        "flow = Workflow('leaky')\n"
        "@flow.step()\n"
        "def boom(ctx, state):\n"
        "    url = os.environ['ORCHESTRATOR_REDIS_URL']\n"
        "    raise NonRetryableError(f'cannot use {url.upper()} with {url} (password ' + os.environ['LEAKY'] + ')')\n"
    )
    settings = fast_settings(protected.url)
    env = process_env(settings, LEAKY=password, PYTHONPATH=f"{REPO}:{tmp_path}", ORCHESTRATOR_LOG_LEVEL="DEBUG")
    worker = Proc(["worker", "leaky_flow:flow"], env, tmp_path / "w.log")
    try:
        submitted = cli("submit", "leaky_flow:flow", "{}", "--run-id", "leak", "--wait", "20", env=env)
        status = cli("status", "leak", env=env)
        history = cli("history", "leak", "-o", "json", env=env)
    finally:
        worker.signal(signal.SIGTERM)
        worker.wait()
    assert "failed" in status.stdout, status.stdout + status.stderr
    for text in (submitted.stdout, submitted.stderr, status.stdout, status.stderr, history.stdout, worker.output()):
        assert leaks(text, password) == [], text


def test_library_errors_never_carry_the_password(protected: RedisServer) -> None:
    password = protected.password or ""
    unreachable = protected.url.replace(f":{protected.port}/", f":{free_port()}/")
    texts: list[str] = []

    def caught(call: object, expected: type[OrchestratorError]) -> OrchestratorError:
        assert callable(call)
        with pytest.raises(expected) as info:
            call()
        texts.extend([str(info.value), repr(info.value), "".join(traceback.format_exception(info.value))])
        return info.value

    for url in variants(protected.url):
        caught(lambda url=url: Settings(redis_url=url, namespace="bad ns!"), ConfigError)
        caught(lambda url=url: Settings(redis_url=url, lease_s=1), ConfigError)
        caught(lambda url=url: Settings(redis_url=url, lease_s="soon"), ConfigError)
        caught(lambda url=url: Settings(redis_ur=url), ConfigError)
        caught(lambda url=url: Settings.model_validate({"redis_url": url, "max_crashes": 0}), ConfigError)
        caught(lambda url=url: Client.from_url(url.replace(f":{protected.port}/", ":99999/")), ConfigError)
        caught(lambda url=url: connect(url.replace(f":{protected.port}/", ":abc/")), ConfigError)
        caught(lambda url=url: Settings(redis_url="http://" + url.split("://", 1)[1]), ConfigError)
    for url in variants(unreachable):
        with Client(fast_settings(url)) as client:
            error = caught(lambda client=client: client.get("r1"), RedisUnavailable)
            assert error.retryable
    with Client(fast_settings(unreachable)) as client:
        caught(lambda: client.submit(chain, {}), RedisUnavailable)
        caught(lambda: client.run("r1").wait(timeout_s=1), RedisUnavailable)
    with Client(fast_settings(protected.url.replace(password, WRONG))) as client:
        caught(lambda: client.get("r1"), RedisRefused)
    with Client(fast_settings(protected.url.replace(f":{password}@", ""))) as client:
        assert "asks for a password" in caught(lambda: client.stats(), RedisRefused).message
    for text in texts:
        assert leaks(text, password, WRONG) == [], text
    assert "redis_url" in texts[0] or "namespace" in texts[0]


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    root = logging.getLogger("orchestrator")
    saved = (list(root.handlers), root.level, root.propagate)
    stream = io.StringIO()
    yield stream
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("password", PASSWORDS)
def test_logged_messages_fields_and_tracebacks_are_masked(
    captured_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch, fmt: str, password: str
) -> None:
    url = f"redis://user:{password}@127.0.0.1:6379/0"
    monkeypatch.setattr(sys, "stderr", captured_logs)
    configure("DEBUG", fmt, Secrets([url]))
    log = logging.getLogger("orchestrator.test")
    for shown in variants(url):
        try:
            try:
                raise ConnectionError(f"could not connect to {shown}")
            except ConnectionError as inner:
                raise RuntimeError(f"gave up; the password was {password}") from inner
        except RuntimeError:
            log.exception("failed with %s", shown, extra={"url": shown, "detail": {"password": password}})
        log.warning("plain", stack_info=True, extra={"note": f"AUTH {password}"})
    out = captured_logs.getvalue()
    assert "could not connect to" in out and "Traceback" in out and "user:***@127.0.0.1" in out
    assert leaks(out, password) == [], out


def test_mask_parses_urls_rather_than_matching_a_pattern() -> None:
    assert redact_url("REDIS://u:pw@h:1/0") == "REDIS://u:***@h:1/0"
    assert redact_url("redis://:p@ss@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("redis://:pa?ss@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("unix://:pw@/tmp/redis.sock?db=1") == "unix://:***@/tmp/redis.sock?db=1"
    assert (
        redact_url("redis+sentinel://:p@w@s1:26379,s2:26380/mymaster/0?sentinel_password=sp&db=1")
        == "redis+sentinel://:***@s1:26379,s2:26380/mymaster/0?sentinel_password=***&db=1"
    )
    assert redact_url("redis://host:1/0?password=pw&x=1") == "redis://host:1/0?password=***&x=1"
    assert redact_url("redis://user@host/0") == "redis://user@host/0"
    assert mask("to 'Rediss://:p@ss-word@h/0', then p@ss-word", ["p@ss-word"]) == "to 'Rediss://:***@h/0', then ***"
