"""What every benchmark shares: a private redis-server, percentiles and ratios, environment and output.

Each benchmark module (``throughput``, ``growth``, ``recovery``, ``compound``) starts its own
redis-server on a free loopback port through :func:`bench_server`, runs its consumers as child
processes through a :class:`bench.procs.Fleet` (which stops every one of them on the way out,
error or not), and writes one JSON document (:func:`write_json`) with the environment, the
settings, the summary and the raw samples, so that every number printed can be traced to
what made it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import redis

import orchestrator
from bench.procs import REPO
from orchestrator import scripts
from orchestrator.embedded import RedisServer
from orchestrator.keys import Keys

RESULTS = REPO / "bench" / "results"
PEER_PACKAGES = ("rq", "celery", "kombu", "billiard")


# -- statistics -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: a value that actually occurred, no interpolation."""
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """p50 / p99 / max / n of a sample, ``None`` figures for an empty one (reported, never invented)."""
    if not values:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {"n": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99), "max": max(values)}


def median_or_none(values: Iterable[float | None]) -> float | None:
    """Median of the known values; CPU figures are unknown where /proc is missing."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ratio(value: float | None, base: float | None) -> float | None:
    """value / base, or None when either is unknown or the base is zero."""
    if value is None or not base:
        return None
    return value / base


def fmt(value: float | None, digits: int = 0) -> str:
    """A number with thousands separators, or "-" for unknown."""
    return "-" if value is None else f"{value:,.{digits}f}"


def fmt_ratio(value: float | None) -> str:
    """A ratio as ``0.42x``, or "-"."""
    return "-" if value is None else f"{value:.2f}x"


def markdown(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = ()) -> str:
    """A markdown table; columns listed in ``right`` are right-aligned (numbers)."""
    align = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# -- the server -------------------------------------------------------------------------------


@contextlib.contextmanager
def private_server(data_dir: Path, binary: str | None, appendfsync: str | None = None) -> Iterator[RedisServer]:
    """A redis-server of our own on a free loopback port; stopped on the way out whatever happened.

    ``appendfsync=None`` is persistence off (throughput); ``"everysec"`` turns AOF on, as a
    production deployment runs it (recovery and the compound table).
    """
    server = RedisServer(data_dir, appendfsync=appendfsync, binary=binary)
    try:
        yield server.start()
    finally:
        server.stop()


def warm_scripts(admin: redis.Redis) -> None:
    """Load every script up front, so no measurement pays the one-time NOSCRIPT round trip."""
    for name in scripts.names():
        admin.script_load(scripts.load(name).source)


def redis_cpu_s(admin: redis.Redis) -> float:
    """CPU seconds redis-server has used: with the children's CPU, it shows on which side the time goes."""
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def command_stats(admin: redis.Redis) -> dict[str, dict[str, int]]:
    """Calls and µs per command since the last ``CONFIG RESETSTAT`` (``INFO commandstats``), by Redis'
    names (``evalsha``, ``xinfo|groups``). The benchmark's own ``INFO`` and ``CONFIG`` are left out.

    Redis counts a script call twice over: once as ``evalsha`` and once per command the script
    runs (under that command's name), so the total is commands sent plus commands run by
    scripts; likewise an ``evalsha``'s µs include those of the commands inside it.
    """
    stats: dict[str, dict[str, Any]] = admin.info("commandstats")
    out = {}
    for key, value in stats.items():
        name = key.removeprefix("cmdstat_")
        if name != "info" and not name.startswith("config|"):
            out[name] = {"calls": int(value["calls"]), "usec": int(value["usec"])}
    return out


def command_calls(admin: redis.Redis) -> Counter[str]:
    """Calls per command since the last ``CONFIG RESETSTAT`` (see :func:`command_stats`)."""
    return Counter({name: v["calls"] for name, v in command_stats(admin).items()})


def per_step_us(before: float | None, after: float | None, total_steps: int) -> float | None:
    """CPU microseconds per step over the timed window; per step so configurations compare directly."""
    if before is None or after is None or not total_steps:
        return None
    return (after - before) / total_steps * 1e6


# -- environment and output -------------------------------------------------------------------


def package_version(name: str) -> str | None:
    """Installed version of ``name``, None when absent (hiredis is optional and changes the numbers)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    """The commit measured, with ``-dirty`` when the work tree differs: numbers belong to code."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def cpu_ticks() -> list[int] | None:
    """The machine's aggregate CPU time counters (/proc/stat: user nice system idle iowait irq softirq steal)."""
    try:
        return [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None


def cpu_share(before: list[int] | None, after: list[int] | None) -> dict[str, float] | None:
    """Share of the machine's CPU time that was busy (anyone's) and stolen by the hypervisor over a window.

    Other jobs share this VM: a run during which the machine was busier or more was stolen is
    a noisier run, and its ratios deserve less trust.
    """
    if before is None or after is None:
        return None
    delta = [b - a for a, b in zip(before, after, strict=True)]
    total = sum(delta) or 1
    return {"busy": 1 - (delta[3] + delta[4]) / total, "steal": delta[7] / total}


def loadavg() -> list[float] | None:
    """1/5/15-minute load average: the machine is shared, so every result records how busy it was."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment(admin: redis.Redis, binary: str) -> dict[str, Any]:
    """Versions and machine facts, so a number can be traced to what produced it."""
    info = admin.info("server")
    memory = admin.info("memory")
    return {
        "redis_server": info.get("redis_version"),
        "redis_server_binary": binary,
        "redis_allocator": memory.get("mem_allocator"),
        "redis_py": redis.__version__,
        "hiredis": package_version("hiredis"),
        "pydantic": package_version("pydantic"),
        **{name: package_version(name) for name in PEER_PACKAGES},
        "orchestrator": orchestrator.__version__,
        "git_commit": git_commit(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "loadavg_at_start": loadavg(),
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    """Everything needed to compare two runs later, next to the printed table."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {path}", flush=True)


def json_path(value: str | None, name: str) -> Path:
    """``--json PATH``, or ``bench/results/<name>.json`` when no path is given."""
    return Path(value) if value else RESULTS / f"{name}.json"


@dataclass
class Server:
    """The private server of one benchmark run and the admin connection to it."""

    url: str
    binary: str
    admin: redis.Redis
    log_dir: Path
    env: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def bench_server(prefix: str, binary: str | None, appendfsync: str | None = None) -> Iterator[Server]:
    """A temporary folder, a private redis-server in it with every script loaded, and its environment."""
    with (
        tempfile.TemporaryDirectory(prefix=f"orch-{prefix}-") as tmp,
        private_server(Path(tmp) / "redis", binary, appendfsync) as server,
    ):
        admin = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            warm_scripts(admin)
            env = environment(admin, server.binary)
            env["redis_appendfsync"] = appendfsync or "off (appendonly no, save '')"
            print(
                f"[{prefix}] redis-server {env['redis_server']} ({server.binary}, {env['redis_allocator']}), "
                f"{env['python']}, {env['cpu_count']} CPUs, load average {env['loadavg_at_start']}",
                flush=True,
            )
            ticks = cpu_ticks()
            yield Server(server.url, server.binary, admin, Path(tmp), env)
            env["loadavg_at_end"] = loadavg()
            env["cpu_share_during_run"] = cpu_share(ticks, cpu_ticks())
        finally:
            admin.close()


class Interrupt:
    """Whether we were told to stop: Ctrl-C also reaches redis-server and the children (same process
    group), so the first error the main loop sees may be a dropped connection rather than the signal."""

    signum = 0

    @classmethod
    def handler(cls, signum: int, frame: FrameType | None) -> None:
        """SIGINT/SIGTERM/SIGHUP unwind the stack, so the ``finally`` blocks stop the children and the server."""
        cls.signum = signum
        for other in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(other, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> None:
        """Route the stop signals through :meth:`handler` (only the command-line entry points do this)."""
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, cls.handler)


def print_and_save(doc: dict[str, Any], json_path: Path | None) -> int:
    """A benchmark's ending: its tables on stdout, its JSON written when asked; exit code 0."""
    print()
    print(doc["markdown"])
    if json_path:
        write_json(json_path, doc)
    return 0


def run_main(main: Callable[[], int]) -> None:
    """Run a benchmark's ``main`` and exit with its code; a signal exits 128+N after the cleanup ran."""
    Interrupt.install()
    try:
        sys.exit(main())
    except (KeyboardInterrupt, redis.ConnectionError):
        if not Interrupt.signum:
            raise
        print(f"interrupted by signal {Interrupt.signum}; children and redis-server stopped", file=sys.stderr)
        sys.exit(128 + Interrupt.signum)


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every benchmark takes."""
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes, 1 repeat")
    parser.add_argument("--json", nargs="?", const="", default=None, metavar="PATH", help="also write JSON")
    parser.add_argument("--redis-server", metavar="BINARY", help="redis-server binary [found as the CLI finds it]")


def finished_runs(admin: redis.Redis, keys: Keys, *indexes: str) -> int:
    """Runs in the ``done`` (and/or ``dead``) indexes of every partition, in one round trip."""
    pipe = admin.pipeline(transaction=False)
    for part in keys.parts:
        for index in indexes or ("done",):
            pipe.zcard(part.done if index == "done" else part.dead)
    return sum(int(n) for n in pipe.execute())
