"""A real Prometheus server for tests: own data dir, a free loopback port, its own process group."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")


class QueryError(AssertionError):
    """Prometheus answered a query with an error."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Prometheus:
    """A running server; :meth:`query` evaluates PromQL through the HTTP API."""

    def __init__(self, popen: subprocess.Popen[bytes], port: int, log_path: Path) -> None:
        self.popen = popen
        self.port = port
        self.log_path = log_path
        self.url = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str | Sequence[str]) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # 400/422 carry the error as JSON
            body = json.loads(exc.read() or b"{}")
        if body.get("status") != "success":
            raise QueryError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query; the result as a list of {"metric": labels, "value": [t, "v"]}."""
        params = {"query": expr} if at is None else {"query": expr, "time": f"{at:.3f}"}
        data = self.get("/api/v1/query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def values(self, expr: str, by: str) -> dict[str, float]:
        """``{label value: sample value}`` of an instant query whose series differ by ``by``."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}

    def value(self, expr: str) -> float:
        result = self.query(expr)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def write_config(path: Path, targets: Mapping[str, Sequence[str]], rule_files: Sequence[Path], interval: str) -> None:
    config = {
        "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [
            {"job_name": job, "static_configs": [{"targets": list(addresses)}]} for job, addresses in targets.items()
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(popen: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group, SIGKILL if it lingers. Signals go to the group only
    while its leader is not reaped yet, so its id cannot belong to anyone else."""
    if popen.returncode is not None:  # reaped already (by poll or wait): nothing left to stop
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=10)


def _start(workdir: Path, port: int) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"prometheus-{port}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped as a whole
        )
    return popen, log_path


@contextmanager
def prometheus(
    workdir: Path,
    targets: Mapping[str, Sequence[str]],
    rule_files: Sequence[Path] = (),
    *,
    interval: str = "1s",
    attempts: int = 3,
) -> Iterator[Prometheus]:
    """Prometheus scraping ``targets`` ({job: [host:port]}) every ``interval``, evaluating
    ``rule_files`` as often; stopped (with its process group) at the end of the block."""
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir / "prometheus.yml", targets, rule_files, interval)
    for _ in range(attempts):  # the free port can be taken between the probe and the bind
        port = free_port()
        popen, log_path = _start(workdir, port)
        server = Prometheus(popen, port, log_path)
        deadline = time.monotonic() + 30
        while popen.poll() is None and not _ready(server.url) and time.monotonic() < deadline:
            time.sleep(0.05)
        if popen.poll() is None and _ready(server.url):
            break
        _stop(popen)
        if "address already in use" not in server.log():
            raise AssertionError(f"prometheus did not start:\n{server.log()}")
    else:
        raise AssertionError(f"prometheus found no free port in {attempts} attempts:\n{server.log()}")
    try:
        yield server
    finally:
        _stop(popen)
