"""The command's edges, one test each, on real subprocesses: URLs (unix sockets, bad ports, env
precedence, options after the command), the embedded server (never started by a read-only
command), refused passwords, a metrics port in use, and an unreachable Redis."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest
import redis

from orchestrator import (
    Client,
    ConfigError,
    OrchestratorError,
    RedisRefused,
    RedisUnavailable,
    Settings,
    WaitTimeout,
)
from orchestrator.embedded import RedisServer, embedded_url, find_redis_server, free_port, stop_embedded
from tests.conftest import fast_settings
from tests.harness import REPO, Proc, process_env, run_cli, start_supervisor, start_worker
from tests.helpers import wait_until
from workers.testflows import chain

PASSWORD = "Edge-S3cr3t-pw"


def run(*args: str, env: dict[str, str], cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, env=env, cwd=cwd, timeout=timeout)


def bare_env(**extra: str) -> dict[str, str]:
    """The test's environment without any orchestrator or Redis variable, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHESTRATOR_") and k != "REDIS_URL"}
    env["PYTHONPATH"] = str(REPO)
    if "ORCHESTRATOR_REDIS_SERVER" in os.environ:  # which redis-server an embedded start uses
        env["ORCHESTRATOR_REDIS_SERVER"] = os.environ["ORCHESTRATOR_REDIS_SERVER"]
    env.update(extra)
    return env


@pytest.fixture
def unix_socket(tmp_path: Path) -> Iterator[Path]:
    """A password-protected redis-server listening on a unix socket only (no TCP port)."""
    path = tmp_path / "redis.sock"
    argv = [find_redis_server(), "--port", "0", "--unixsocket", str(path), "--unixsocketperm", "700"]
    argv += ["--requirepass", PASSWORD, "--save", "", "--appendonly", "no", "--dir", str(tmp_path)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe = redis.Redis(unix_socket_path=str(path), password=PASSWORD, socket_connect_timeout=0.5)

    def answers() -> bool:
        try:
            return bool(probe.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, what="redis-server on its unix socket")
        yield path
    finally:
        probe.close()
        proc.terminate()
        proc.wait(timeout=10)


def test_a_unix_socket_url_runs_a_worker_and_a_submit(unix_socket: Path, tmp_path: Path) -> None:
    url = f"unix://:{PASSWORD}@{unix_socket}?db=0"
    settings = fast_settings(url)
    proc = start_worker(settings, tmp_path, "workers.testflows:chain")
    try:
        done = run(
            "submit", "workers.testflows:chain", '{"i": 1}', "--wait", "30", "-o", "json", env=process_env(settings)
        )
        assert done.returncode == 0, done.stderr + proc.output()
        assert json.loads(done.stdout)["state"]["i"] == 11
    finally:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output()
    assert "worker started" in proc.output() and f"unix://:***@{unix_socket}" in proc.output()
    assert "TypeError" not in proc.output() and PASSWORD not in proc.output()


@pytest.mark.parametrize("port", ["99999", "abc", "0"])
def test_a_bad_port_is_a_config_error_naming_redis_url(port: str) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    result = run("status", "r1", env=bare_env(REDIS_URL=url))
    assert result.returncode == 2, result.stderr
    assert f"redis_url 'redis://:***@127.0.0.1:{port}/0': port '{port}' is invalid" in result.stderr
    assert "expected a number from 1 to 65535" in result.stderr
    assert "Traceback" not in result.stderr and PASSWORD not in result.stdout + result.stderr


@pytest.mark.parametrize("command", ["worker", "supervisor"])
def test_a_metrics_port_in_use_is_one_clear_line(settings: Settings, command: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["workers.testflows:chain"] if command == "worker" else []
        result = run(command, *args, "--metrics-port", str(port), env=process_env(settings), timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"--metrics-port {port} (metrics_port): cannot serve /metrics on 127.0.0.1:{port}" in result.stderr
    assert "address already in use" in result.stderr and "Traceback" not in result.stderr


def test_redis_start_prints_only_the_url_so_that_export_works(tmp_path: Path) -> None:
    data_dir = tmp_path / "embedded"
    env = bare_env(ORCHESTRATOR_DATA_DIR=str(data_dir))
    try:
        started = run("redis", "start", env=env)
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert started.stdout == url + "\n" and url == embedded_url(data_dir)  # export REDIS_URL=$(...)
        assert "started" in started.stderr
        again = run("redis", "start", env=env)
        assert again.stdout == started.stdout and "already running" in again.stderr
        listed = run("runs", "list", env=bare_env(REDIS_URL=url), cwd=tmp_path)
        assert listed.returncode == 0 and listed.stdout.strip() == "no runs", listed.stderr
    finally:
        stop_embedded(data_dir)


def test_connection_options_work_after_the_command_name_too(settings: Settings, tmp_path: Path) -> None:
    Client(settings).submit(chain, {}, run_id="after")
    env = bare_env()  # nothing in the environment: the flags alone must find the run
    url = settings.plain_url()
    status = run("status", "after", "--redis-url", url, "--namespace", settings.namespace, "-o", "json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "pending"
    listed = run("runs", "list", "--namespace", settings.namespace, "--redis-url", url, env=env)
    assert listed.returncode == 0 and "after" in listed.stdout, listed.stderr
    # after the command wins over before it, and over the environment; before it wins over the environment
    dead = f"redis://127.0.0.1:{free_port()}/0"
    flags = ("--namespace", settings.namespace)
    assert run("--redis-url", dead, "status", "after", "--redis-url", url, *flags, env=env).returncode == 0
    assert run("status", "after", "--redis-url", url, *flags, env=bare_env(ORCHESTRATOR_REDIS_URL=dead)).returncode == 0
    assert run("--redis-url", url, "status", "after", *flags, env=bare_env(ORCHESTRATOR_REDIS_URL=dead)).returncode == 0
    debug = run("status", "after", "--redis-url", url, *flags, "--log-level", "DEBUG", "--log-format", "json", env=env)
    assert debug.returncode == 0, debug.stderr
    # a worker takes them after its workflows, as `rq worker --url` does, and they win over the
    # environment (whose namespace only the steps' ledger reads)
    worker = Proc(
        ["worker", "workers.testflows:chain", "--redis-url", url, "--namespace", settings.namespace],
        {**env, "ORCHESTRATOR_LEDGER_URL": url, "ORCHESTRATOR_NAMESPACE": f"{settings.namespace}-ledger"},
        tmp_path / "w.log",
    )
    try:
        assert Client(settings).run("after").wait(timeout_s=30)["i"] == 10
    finally:
        worker.signal(signal.SIGTERM)
        assert worker.wait() == 0, worker.output()


def test_orchestrator_redis_url_wins_over_redis_url_in_the_cli_and_the_library(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    Client(settings).submit(chain, {}, run_id="which")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    both = {
        "ORCHESTRATOR_REDIS_URL": settings.plain_url(),
        "REDIS_URL": dead,
        "ORCHESTRATOR_NAMESPACE": settings.namespace,
    }
    status = run("status", "which", env=bare_env(**both))
    assert status.returncode == 0 and "which" in status.stdout, status.stderr
    for name, value in both.items():
        monkeypatch.setenv(name, value)
    assert Settings().plain_url() == settings.plain_url()
    with Client() as client:
        assert client.get("which").status == "pending"


def test_read_only_commands_never_start_a_server(tmp_path: Path) -> None:
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    env = bare_env()
    read_only = [
        ["status", "r1"],
        ["history", "r1"],
        ["runs", "list"],
        ["runs", "why", "r1"],
        ["runs", "purge", "--older-than", "1d"],
        ["stats"],
        ["top", "--iterations", "1"],
        ["cancel", "r1"],
        ["retry", "r1"],
    ]
    for args in read_only:
        result = run(*args, env=env, cwd=here)
        assert result.returncode == 1, (args, result.stderr)
        assert "no embedded server is running for .orchestrator/" in result.stderr, (args, result.stderr)
        assert "orchestrator redis start" in result.stderr and "Traceback" not in result.stderr
        assert not (here / ".orchestrator").exists(), args
    try:
        submitted = run("submit", "workers.testflows:chain", "{}", "--run-id", "r1", env=env, cwd=here)
        assert submitted.returncode == 0, submitted.stderr
        assert "started an embedded redis-server" in submitted.stderr and embedded_url(here / ".orchestrator")
        shown = run("status", "r1", env=env, cwd=here)
        assert shown.returncode == 0 and "pending" in shown.stdout, shown.stderr
        away = run("status", "r1", env=env, cwd=elsewhere)  # another folder: says so, never "no run"
        assert away.returncode == 1 and "no embedded server is running" in away.stderr
        assert not (elsewhere / ".orchestrator").exists()
    finally:
        stop_embedded(here / ".orchestrator")


def test_a_missing_and_a_wrong_password_say_different_things_at_once(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "redis", appendfsync=None, password=PASSWORD) as server:
        t0 = time.monotonic()
        missing = run("status", "r1", env=bare_env(REDIS_URL=server.url.replace(f":{PASSWORD}@", "")))
        wrong = run("status", "r1", env=bare_env(REDIS_URL=server.url.replace(PASSWORD, "Wrong-pw-123")))
        elapsed_s = time.monotonic() - t0
    assert missing.returncode == 1 and "asks for a password and the URL has none" in missing.stderr
    assert wrong.returncode == 1 and "refused the credentials in the URL" in wrong.stderr
    assert "invalid username-password pair" in wrong.stderr and "asks for a password" not in wrong.stderr
    assert elapsed_s < 10, elapsed_s  # a refusal is not retried (it took 24 s when it was)
    for out in (missing, wrong):
        assert "Traceback" not in out.stderr and "Wrong-pw-123" not in out.stderr


def test_worker_and_supervisor_wait_for_an_unreachable_redis_and_go_on_when_it_comes(tmp_path: Path) -> None:
    port = free_port()
    server = RedisServer(tmp_path / "redis", port=port, appendfsync=None, password=PASSWORD)
    settings = fast_settings(server.url)
    worker = start_worker(settings, tmp_path, "workers.testflows:chain")
    supervisor = start_supervisor(settings, tmp_path)
    try:
        for proc, what in ((worker, "starting the worker"), (supervisor, "supervising")):
            line = wait_until(
                lambda proc=proc, what=what: next(
                    (x for x in proc.output().splitlines() if f"Redis unreachable while {what}" in x), None
                ),
                timeout_s=30,
                what=f"the outage line of {what}",
            )
            assert f"redis=redis://:***@127.0.0.1:{port}/0" in line and "since=" in line
            assert "next_try_s=" in line and "attempts=" in line and "cannot reach Redis" in line
        # the worker used to exit after 5 s of this: both must still be waiting 8 s in
        t0 = time.monotonic()
        wait_until(lambda: not worker.alive() or not supervisor.alive() or time.monotonic() - t0 > 8, timeout_s=20)
        assert worker.alive() and supervisor.alive(), worker.output() + supervisor.output()
        server.start()
        client = Client(settings)
        assert client.submit(chain, {}, run_id="late").wait(timeout_s=40).i == 10
        for proc in (worker, supervisor):
            wait_until(lambda proc=proc: "Redis answers again" in proc.output(), what="the recovery line")
    finally:
        for proc in (worker, supervisor):
            proc.signal(signal.SIGTERM)
        codes = [worker.wait(), supervisor.wait()]
        server.stop()
    assert codes == [0, 0], worker.output() + supervisor.output()
    assert PASSWORD not in worker.output() + supervisor.output()


def test_the_library_raises_errors_of_its_tree_not_redis_py_or_pydantic_ones(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"lease_s: Input should be a valid number.* \(got 'soon'\)") as bad:
        Settings(lease_s="soon")
    assert not isinstance(bad.value, pydantic.ValidationError) and bad.value.__cause__ is None
    with pytest.raises(ConfigError, match="max_crashes"):
        Settings.model_validate({"max_crashes": 0})
    with pytest.raises(ConfigError, match="no Redis URL"):
        Client(Settings(redis_url=None))
    with Client.from_url(f"redis://127.0.0.1:{free_port()}/0") as client:
        with pytest.raises(RedisUnavailable, match=r"cannot reach Redis at redis://127\.0\.0\.1:") as down:
            client.submit(chain, {})
        assert down.value.retryable and isinstance(down.value.__cause__, redis.ConnectionError)
    with RedisServer(tmp_path / "redis", appendfsync=None, password=PASSWORD) as server:
        wrong = Client.from_url(server.url.replace(PASSWORD, "nope-nope"))
        with wrong, pytest.raises(RedisRefused, match="refused the credentials") as refused:
            wrong.list_runs()
        assert not refused.value.retryable and isinstance(refused.value, OrchestratorError)
        with Client.from_url(server.url) as client:
            run = client.submit(chain, {}, run_id="waits")
            with pytest.raises(WaitTimeout):  # ours already: passed through, not taken for a socket error
                run.wait(timeout_s=0.1)
