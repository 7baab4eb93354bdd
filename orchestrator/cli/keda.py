"""``orchestrator keda``: KEDA's triggers for the partitioned queues, as YAML (no Redis needed)."""

from __future__ import annotations

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, config_error, pass_state
from orchestrator.errors import ConfigError
from orchestrator.keda import DEFAULT_ADDRESS, DEFAULT_TARGET, KedaScaling


@cli.command("keda")
@click.option(
    "--queue",
    "queues",
    multiple=True,
    default=("default",),
    show_default=True,
    metavar="QUEUE",
    help="a queue the scaled workers read; repeat it for each",
)
@click.option(
    "--address",
    "addresses",
    multiple=True,
    metavar="HOST:PORT",
    help=f"Redis as KEDA reaches it from its own namespace, e.g. {DEFAULT_ADDRESS}; "
    "with --cluster, repeat it for several nodes",
)
@click.option("--cluster", is_flag=True, help="Redis Cluster: KEDA's redis-cluster-streams triggers")
@click.option(
    "--target",
    type=int,
    default=DEFAULT_TARGET,
    show_default=True,
    help="steps (undelivered + in flight) per worker; keep it below the workers' --concurrency",
)
@click.option("--database", type=int, default=0, show_default=True, help="the database of REDIS_URL (not --cluster)")
@click.option(
    "--print",
    "what",
    type=click.Choice(["manifest", "patch", "groups"]),
    default="manifest",
    show_default=True,
    help="manifest: deploy/k8s/keda.yaml; patch: a kustomize patch of its ScaledObject for an overlay; "
    "groups: XGROUP CREATE commands for redis-cli, one per stream",
)
@pass_state
def keda_command(
    state: CliState,
    queues: tuple[str, ...],
    addresses: tuple[str, ...],
    cluster: bool,
    target: int,
    database: int,
    what: str,
) -> None:
    """Print KEDA's autoscaling of the workers for --namespace and --partitions: one lag and
    one pending trigger per partition stream of each queue, summed by a scalingModifiers
    formula (KEDA >= 2.13). Examples:

    \b
      orchestrator keda --address redis.orchestrator.svc.cluster.local:6379 > deploy/k8s/keda.yaml
      orchestrator keda --address redis.example.svc:6379 --print patch > my-deploy/keda.yaml
      orchestrator keda --print groups | redis-cli -u "$REDIS_URL"
    """
    settings = state.configured(any_url=False)
    if what == "groups" and not addresses:
        addresses = (DEFAULT_ADDRESS,)  # not printed: groups need no address
    try:
        scaling = KedaScaling(
            settings.namespace,
            settings.partitions,
            queues,
            addresses,
            target=target,
            cluster=cluster,
            database=database,
        )
    except ConfigError as exc:
        raise config_error(exc) from None
    text = {"manifest": scaling.manifest, "patch": scaling.patch, "groups": scaling.group_commands}[what]()
    click.echo(text, nl=False)
