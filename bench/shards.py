"""One Redis against a 3-master Redis Cluster, same chains, same run: Redis CPU per step per shard,
and the capacity model it backs.

``python -m bench.shards [--chains 500] [--steps 10] [--workers 2] [--masters 3] [--replicas 1]
[--quick] [--json [PATH]] [--redis-server BIN]``

Part 6 of issue 11. Two targets, one after the other, each fresh (persistence off):

- **one Redis**: a private redis-server;
- **cluster**: ``--masters`` masters with ``--replicas`` replicas each on loopback
  (:class:`orchestrator.chaos.cluster.LoopbackCluster`), reached through one node's plain URL.

On each, ``--chains`` x ``--steps`` no-op steps (``bench.flows:noop``) through ``--workers`` real
``orchestrator worker`` processes and one ``orchestrator supervisor``, submitted back to back.
``CONFIG RESETSTAT`` on every node before the first submit; ``INFO cpu`` (user + sys) and
``INFO commandstats`` of every node when the last run is done. Per shard (a master): its CPU,
its commands, and its share of the committed steps (the share of ``evalsha`` calls it ran).

**The capacity model.** A committed step costs Redis ``c`` µs of CPU wherever it runs, so one
Redis core carries at most ``1 s / c`` steps/s, and a cluster of ``S`` equal shards carries
``S x 1 s / c x evenness``, where evenness = (1 / S) / (largest share of the partitions one shard
serves): with ``P`` partitions (16 by default) and the slots split evenly, shards get
``floor(P / S)`` or ``ceil(P / S)`` partitions (computed here from the real tags and an even
``CLUSTER ADDSLOTS`` split, for 3, 6 and 12 shards). ``c`` is measured on the cluster (it
includes what cluster mode and a replica's feed cost a master), and compared with one Redis.
On a 2-core machine the workers, not Redis, limit the steps/s achieved here: the model is the
point, the achieved rate is reported as measured.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from bench.common import (
    add_common_args,
    bench_server,
    command_stats,
    fmt,
    json_path,
    markdown,
    print_and_save,
    ratio,
    run_main,
    warm_scripts,
)
from bench.flows import STEPS, STEPS_ENV, make_noop
from bench.procs import Fleet, child_env, wait_until, worker_args
from orchestrator import Client, Settings
from orchestrator.chaos.cluster import SLOTS, LoopbackCluster
from orchestrator.connection import connect
from orchestrator.keys import Keys

CONCURRENCY = 64  # per worker, as bench.stepcost
MODEL_SHARDS = (3, 6, 12)


@dataclass(frozen=True)
class Options:
    chains: int
    steps: int
    workers: int
    masters: int
    replicas: int
    quick: bool
    json_path: Path | None
    redis_server: str | None


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m bench.shards", description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", type=int, default=None, help="chains per target [500; 40 with --quick]")
    parser.add_argument("--steps", type=int, default=STEPS, help=f"no-op steps per chain [{STEPS}]")
    parser.add_argument("--workers", type=int, default=2, help="our worker processes [2]")
    parser.add_argument("--masters", type=int, default=3, help="cluster masters [3]")
    parser.add_argument("--replicas", type=int, default=1, help="replicas per master [1]")
    add_common_args(parser)
    ns = parser.parse_args(argv)
    chains = ns.chains if ns.chains is not None else (40 if ns.quick else 500)
    if chains < 1 or ns.steps < 1 or ns.workers < 1 or ns.masters < 1 or ns.replicas < 0:
        parser.error("--chains, --steps, --workers must be at least 1, --masters at least 1, --replicas >= 0")
    return Options(
        chains=chains,
        steps=ns.steps,
        workers=ns.workers,
        masters=ns.masters,
        replicas=ns.replicas,
        quick=ns.quick,
        json_path=json_path(ns.json, "shards") if ns.json is not None else None,
        redis_server=ns.redis_server,
    )


@dataclass
class Node:
    """One server to meter: its address, role and an admin connection."""

    name: str
    role: str
    admin: redis.Redis


def cpu_s(admin: redis.Redis) -> float:
    info = admin.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def run_load(url: str, nodes: list[Node], options: Options, log_dir: Path) -> dict[str, Any]:
    """The no-op chains on the deployment at ``url``; per-node CPU and commands around them."""
    settings = Settings(redis_url=url, namespace=f"shards-{uuid.uuid4().hex[:8]}")
    keys = Keys(settings.namespace, settings.partitions)
    env = child_env(settings, url, {STEPS_ENV: str(options.steps)})
    flow = make_noop(options.steps)
    total = options.chains * options.steps
    with Fleet(log_dir) as fleet, Client(settings) as client:
        fleet_procs = [
            fleet.spawn_module(f"shards-w{i}", worker_args("bench.flows:noop", CONCURRENCY), env)
            for i in range(options.workers)
        ]
        fleet_procs.append(fleet.spawn_module("shards-sup", ["orchestrator", "supervisor"], env))
        wait_until(lambda: client.redis.zcard(keys.workers) >= options.workers, 60, "workers registering", fleet)
        wait_until(lambda: bool(client.redis.exists(keys.leader)), 30, "the supervisor leading", fleet)
        for node in nodes:
            node.admin.config_resetstat()
        before = {node.name: cpu_s(node.admin) for node in nodes}
        started = time.perf_counter()
        for i in range(options.chains):
            client.submit(flow, run_id=f"r{i:05d}")

        def finished() -> bool:
            pipe = client.redis.pipeline(transaction=False)
            for part in keys.parts:
                pipe.zcard(part.done)
            return int(sum(pipe.execute())) >= options.chains

        done = wait_until(finished, 120 + total / 50, "every chain finishing", fleet)
        elapsed = done - started
        per_node: dict[str, dict[str, Any]] = {}
        for node in nodes:
            stats = command_stats(node.admin)
            per_node[node.name] = {
                "role": node.role,
                "cpu_s": cpu_s(node.admin) - before[node.name],
                "commands": sum(v["calls"] for v in stats.values()),
                "evalsha": stats.get("evalsha", {}).get("calls", 0),
            }
        completed = sum(1 for i in range(options.chains) if client.get(f"r{i:05d}").status == "completed")
    if completed != options.chains:
        raise RuntimeError(f"{options.chains - completed} chains did not complete")
    masters = {name: n for name, n in per_node.items() if n["role"] == "master"}
    evalsha = sum(n["evalsha"] for n in masters.values()) or 1
    master_cpu = sum(n["cpu_s"] for n in masters.values())
    return {
        "steps": total,
        "elapsed_s": elapsed,
        "steps_per_s": total / elapsed,
        "redis_cpu_us_per_step": master_cpu / total * 1e6,
        "replica_cpu_us_per_step": sum(n["cpu_s"] for n in per_node.values() if n["role"] != "master") / total * 1e6,
        "commands_per_step": sum(n["commands"] for n in masters.values()) / total,
        "shards": {
            name: {
                "steps_share": n["evalsha"] / evalsha,
                "cpu_us_per_step": n["cpu_s"] / total * 1e6,
                "cpu_us_per_own_step": n["cpu_s"] / max(1.0, total * n["evalsha"] / evalsha) * 1e6,
                "commands_per_step": n["commands"] / total,
            }
            for name, n in masters.items()
        },
        "nodes": per_node,
    }


def single(options: Options) -> dict[str, Any]:
    with bench_server("shards", options.redis_server) as server:
        nodes = [Node("single", "master", server.admin)]
        out = run_load(server.url, nodes, options, server.log_dir)
        out["environment"] = server.env
    return out


def cluster(options: Options) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="orch-shards-cluster-") as tmp:
        loopback = LoopbackCluster(Path(tmp), masters=options.masters, replicas=options.replicas)
        loopback.binary = options.redis_server
        loopback.start()
        admins: list[redis.Redis] = []
        try:
            nodes = []
            for node in loopback.nodes:
                admin = node.client()
                admins.append(admin)
                nodes.append(Node(f"127.0.0.1:{node.port}", loopback.role(node), admin))
            for node in loopback.nodes[: options.masters]:
                with node.client() as admin:
                    warm_scripts(admin)
            probe = connect(loopback.url, probe=Keys("x").cluster_probe)
            probe.close()
            out = run_load(loopback.url, nodes, options, Path(tmp))
            out["server"] = loopback.version
        finally:
            for admin in admins:
                admin.close()
            loopback.stop()
    return out


def largest_share(partitions: int, shards: int, namespace: str = "orch") -> float:
    """The largest share of a namespace's partitions one of ``shards`` masters serves, with the
    slots split into ``shards`` even ranges (as ``CLUSTER ADDSLOTS`` in LoopbackCluster)."""
    keys = Keys(namespace, partitions)
    per = SLOTS // shards
    owners = Counter(min(key_slot(keys.tag(p).encode()) // per, shards - 1) for p in range(partitions))
    return max(owners.values()) / partitions


def model(cpu_us_per_step: float, partitions: int) -> list[dict[str, Any]]:
    per_shard = 1e6 / cpu_us_per_step
    rows = []
    for shards in MODEL_SHARDS:
        share = largest_share(partitions, shards)
        evenness = (1 / shards) / share
        rows.append(
            {
                "shards": shards,
                "largest_partition_share": share,
                "evenness": evenness,
                "steps_per_s": shards * per_shard * evenness,
                "steps_per_s_if_even": shards * per_shard,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    one = single(options)
    many = cluster(options)
    partitions = Settings().partitions
    doc: dict[str, Any] = {
        "benchmark": "shards",
        "environment": one.pop("environment"),
        "options": asdict(options),
        "single": one,
        "cluster": many,
        "ratios": {
            "redis_cpu_per_step_cluster_to_single": ratio(many["redis_cpu_us_per_step"], one["redis_cpu_us_per_step"]),
            "commands_per_step_cluster_to_single": ratio(many["commands_per_step"], one["commands_per_step"]),
        },
        "model": {"partitions": partitions, "single": model(one["redis_cpu_us_per_step"], partitions)},
    }
    doc["model"]["cluster"] = model(many["redis_cpu_us_per_step"], partitions)
    rows = [
        [
            "one Redis",
            fmt(one["steps_per_s"]),
            fmt(one["redis_cpu_us_per_step"], 1),
            fmt(one["commands_per_step"], 1),
            "-",
            "1 / 1",
        ],
        [
            f"cluster {options.masters}x(1+{options.replicas})",
            fmt(many["steps_per_s"]),
            fmt(many["redis_cpu_us_per_step"], 1),
            fmt(many["commands_per_step"], 1),
            fmt(many["replica_cpu_us_per_step"], 1),
            " / ".join(f"{s['steps_share']:.2f}" for s in many["shards"].values()),
        ],
    ]
    table = markdown(
        ["target", "steps/s", "master CPU µs/step", "commands/step", "replica CPU µs/step", "steps share per shard"],
        rows,
        right=(1, 2, 3, 4),
    )
    shard_rows = [
        [name, f"{s['steps_share']:.2f}", fmt(s["cpu_us_per_step"], 1), fmt(s["cpu_us_per_own_step"], 1)]
        for name, s in many["shards"].items()
    ]
    shard_table = markdown(
        ["master", "share of steps", "CPU µs per step (all)", "CPU µs per own step"], shard_rows, right=(1, 2, 3)
    )
    model_rows = [
        [
            str(row["shards"]),
            f"{row['largest_partition_share']:.3f}",
            f"{row['evenness']:.2f}",
            fmt(row["steps_per_s"]),
            fmt(row["steps_per_s_if_even"]),
        ]
        for row in doc["model"]["cluster"]
    ]
    model_table = markdown(
        ["shards", f"largest share of {partitions} partitions", "evenness", "steps/s (model)", "if perfectly even"],
        model_rows,
        right=(1, 2, 3, 4),
    )
    per_shard = 1e6 / many["redis_cpu_us_per_step"]
    doc["markdown"] = "\n\n".join(
        [
            f"### One Redis vs a {options.masters}-master cluster ({options.chains} chains x {options.steps} "
            f"no-op steps, {options.workers} workers)",
            table,
            shard_table,
            f"Capacity model: one shard carries 1 s / {many['redis_cpu_us_per_step']:.1f} µs = "
            f"{per_shard:,.0f} steps/s of Redis CPU (one Redis: {1e6 / one['redis_cpu_us_per_step']:,.0f}).",
            model_table,
        ]
    )
    return print_and_save(doc, options.json_path)


if __name__ == "__main__":
    run_main(main)
