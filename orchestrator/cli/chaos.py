"""``orchestrator chaos``: kill things for a while, then prove nothing was lost or done twice."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import click

from orchestrator.chaos.checker import Report
from orchestrator.chaos.cluster import LoopbackCluster
from orchestrator.chaos.flows import PERMITS
from orchestrator.chaos.runner import RESTORED, ChaosConfig, ChaosRun
from orchestrator.cli import cli
from orchestrator.cli.common import CliState, emit_json, output_option, pass_state
from orchestrator.embedded import RedisServer

INVARIANTS = {
    "I1": "every accepted run reached a terminal state",
    "I2": "one result per step, from its last execution, never overwritten",
    "I3": "each effect applied once, keys stable across retries",
    "I4": "nothing stuck: killed workers' steps resumed in time, nothing pending at rest",
    "I5": "crashes per step bounded, then quarantined",
    "I6": "counters agree with the histories",
    "I7": "no process died except those we killed",
    "I8": "no step started before its predecessor's result was durable",
    "I9": "a receiver keeping the highest fencing token agrees with the persisted record",
    "I10": "no sleeping run woke, and no step after a sleep started, before its due time",
    "I11": "no run expired before its deadline",
    "I12": "no signal lost or applied twice, no wait timed out early",
    "I13": "children: none started twice, all done before their parent, none left by a cancelled parent",
    "I14": "map items: each once, fanned in once in item order, parallelism kept, none left by a failed map",
    "I15": "concurrency limit: never more holders alive than it allows, no permit held or run in line at rest",
}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value / 1000:.2f} s"


def render(report: Report, header: str) -> str:
    data = report.to_dict()
    runs = data["runs"]
    det, rec = data["detection_ms"], data["recovery_ms"]
    share = report.re_executions / report.committed_steps if report.committed_steps else 0.0
    lines = [
        header,
        f"runs        submitted {sum(v for k, v in runs.items() if k not in ('quarantined', 'expired'))}, "
        f"completed {runs.get('completed', 0)}, failed {runs.get('failed', 0)} "
        f"(quarantined {runs.get('quarantined', 0)}, expired at their deadline {runs.get('expired', 0)}), "
        f"lost {data['lost']}, "
        f"vanished (resubmitted) {data['vanished']}",
        f"steps       committed {report.committed_steps}, executions {report.executions}, "
        f"re-executed {report.re_executions} ({share:.1%}: attempts cut short by a fault or an error"
        + (", or forgotten by a restore)" if report.faults.get(RESTORED) else ")"),
        f"results     overwritten or re-run after commit: {data['overwritten_or_rerun_after_commit']}",
        f"effects     requested {report.effect_requests}, applied {report.effects_applied}, "
        f"duplicate effects {data['duplicate_effects']}; items redone inside stashing steps {report.items_redone}",
        f"fencing     effects checked against the persisted fence {report.fencing_checked}, "
        f"receiver disagrees with the persisted record {data['fencing_violations']}",
        f"sleeps      {report.sleeps}, woke or started early {data['early_wake_ups']}",
        f"signals     sent {report.signal_sends} (resends included), delivered {report.signalled}, "
        f"waits timed out {report.wait_timeouts}, lost or applied twice {data['signals_lost_or_doubled']}",
        f"children    started {report.children}, parents cancelled while they ran {report.parents_cancelled}, "
        f"violations {data['child_violations']}",
        f"maps        items {report.map_items}, maps fanned in {report.maps_settled}, "
        f"violations {data['map_violations']}; rate-limited starts deferred {report.rate_deferred}",
        f"permits     most held at once {report.most_holding} (limit {PERMITS}), starts that waited in line "
        f"{report.permit_waits}, violations {data['permit_violations']}",
        "faults      " + (", ".join(f"{k} {v}" for k, v in sorted(report.faults.items())) or "none"),
        f"detection   kill -> re-dispatch  p50 {_ms(det['p50'])}  p99 {_ms(det['p99'])}  max {_ms(det['max'])}"
        f"  (n={det['n']})",
        f"recovery    kill -> step running again  p50 {_ms(rec['p50'])}  p99 {_ms(rec['p99'])}  "
        f"max {_ms(rec['max'])}  (n={rec['n']})",
        "invariants",
    ]
    for code, text in INVARIANTS.items():
        broken = report.count(code)
        lines.append(f"  {code:<3} {'ok    ' if not broken else f'BROKEN x{broken}'} {text}")
    for violation in report.violations[:20]:
        lines.append(f"  ! {violation.invariant} {violation.run_id}: {violation.detail}")
    lines.append("result      " + ("PASS" if report.ok else f"FAIL ({len(report.violations)} violations)"))
    return "\n".join(lines)


@cli.command()
@click.option("--duration", "duration_s", type=float, default=60.0, show_default=True, help="seconds of faults")
@click.option("--workers", type=int, default=3, show_default=True)
@click.option("--supervisors", type=int, default=2, show_default=True)
@click.option("--concurrency", type=int, default=8, show_default=True, help="per worker")
@click.option("--kills-per-minute", type=float, default=30.0, show_default=True, help="random kill -9 of workers")
@click.option(
    "--crash-point-share",
    type=float,
    default=0.3,
    show_default=True,
    help="share of (re)started workers armed to kill themselves at a random crash point",
)
@click.option(
    "--redis-restarts",
    type=int,
    default=2,
    show_default=True,
    help="kill -9 + restart of Redis (only when the chaos run started Redis itself)",
)
@click.option(
    "--lost-writes",
    type=int,
    default=0,
    show_default=True,
    help="restarts of Redis from an older copy of its data, each losing 2-5 s of acknowledged writes "
    "(only when the chaos run started Redis itself; the ledger then lives on a second server)",
)
@click.option(
    "--cluster",
    "own_cluster",
    is_flag=True,
    help="start a Redis Cluster of its own on loopback (3 masters, 3 replicas) instead of one server, "
    "and fail masters over and move slots under load (the ledger lives on a separate server)",
)
@click.option(
    "--failovers", type=int, default=1, show_default=True, help="with --cluster: kill -9 of a master serving runs"
)
@click.option(
    "--reshards",
    type=int,
    default=1,
    show_default=True,
    help="with --cluster: moves of a quarter of the partitions' slots to another master",
)
@click.option("--supervisor-kills", type=int, default=1, show_default=True)
@click.option(
    "--rq-workers",
    type=int,
    default=1,
    show_default=True,
    help="RQ workers running a bridged step (executor=RQ), killed -9 with the workers (with or without "
    "their work-horse); none on a Redis Cluster",
)
@click.option("--in-flight", type=int, default=30, show_default=True, help="runs kept in flight")
@click.option("--work-s", type=float, default=0.05, show_default=True, help="how long each step works")
@click.option("--fail-rate", type=float, default=0.05, show_default=True, help="transient errors per attempt")
@click.option(
    "--fsync",
    type=click.Choice(["always", "everysec"]),
    default="everysec",
    show_default=True,
    help="appendfsync of the Redis the chaos run starts itself",
)
@click.option("--seed", type=int, default=None, help="repeat a run's random choices")
@click.option(
    "--chaos-dir",
    type=click.Path(path_type=Path),
    default=Path(".orchestrator-chaos"),
    show_default=True,
    help="logs of every process (and the data of the Redis the run starts); wiped at start",
)
@output_option
@pass_state
def chaos(
    state: CliState, /, fsync: str, seed: int | None, chaos_dir: Path, output: str, own_cluster: bool, **options: Any
) -> None:
    """Run a synthetic workload under kill -9 and Redis restarts, then check the invariants.

    With REDIS_URL/--redis-url it runs against that deployment (a single server, Sentinel, or
    any node of a Redis Cluster; in a fresh namespace; Redis is not restarted); without one it
    starts its own redis-server and restarts it too, and keeps the ledger on a second one; with
    --cluster it starts its own Redis Cluster and fails masters over and moves slots under load.
    Exits 1 if any invariant broke: run it before going live.
    """
    config = ChaosConfig(**options, **({"seed": seed} if seed is not None else {}))
    configured = state.configured()
    url = configured.plain_url() if configured.redis_url else None
    if url is not None and (config.lost_writes or own_cluster):
        raise click.UsageError(
            f"{'--cluster' if own_cluster else '--lost-writes'} kills or rewinds the Redis it runs on; it runs "
            "only on servers the chaos run starts itself. Unset ORCHESTRATOR_REDIS_URL and REDIS_URL (and "
            "--redis-url) to use it."
        )
    if own_cluster and config.lost_writes:
        raise click.UsageError("--lost-writes restores a single server; with --cluster, --failovers loses writes")
    if chaos_dir.exists():
        shutil.rmtree(chaos_dir)
    servers: list[RedisServer] = []
    cluster: LoopbackCluster | None = None
    try:
        if url is None:
            servers = [RedisServer(chaos_dir / "ledger", appendfsync="always").start()]  # outlives rollbacks
            if own_cluster:
                cluster = LoopbackCluster(chaos_dir / "cluster", appendfsync=fsync).start()
                url = cluster.url
            else:
                servers.insert(0, RedisServer(chaos_dir / "redis", appendfsync=fsync).start())
                url = servers[0].url
        if configured.redis_url or cluster:
            config.redis_restarts = 0
        settings = state.settings(redis_url=url)
        where = settings.redacted_url
        if cluster is not None:
            where = f"own Redis Cluster ({cluster.version}, 3 masters + 3 replicas, appendfsync {fsync})"
        elif servers:
            where = f"own redis-server (appendfsync {fsync})"
        run = ChaosRun(
            settings,
            config,
            server=servers[0] if len(servers) == 2 else None,
            ledger_url=servers[-1].url if servers else None,
            cluster=cluster,
            logs=chaos_dir / "logs",
            echo=lambda s: click.echo(s, err=True),
        )
        try:
            report = run.run()
        finally:
            run.close()
    finally:
        for server in servers:
            server.stop()
        if cluster is not None:
            cluster.stop()
    header = (
        f"chaos run: {config.duration_s:g} s of faults on {where}, {config.workers} workers, "
        f"{config.supervisors} supervisors, seed {config.seed}"
    )
    if output == "json":
        emit_json({"config": config.__dict__, **report.to_dict()})
    else:
        click.echo(render(report, header))
    sys.exit(0 if report.ok else 1)
