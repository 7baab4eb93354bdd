"""``orchestrator worker`` and ``orchestrator supervisor``: the long-running processes."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

import click

from orchestrator.cli import cli
from orchestrator.cli.common import CliState, load_workflows, pass_state
from orchestrator.supervisor import Supervisor
from orchestrator.worker import Worker


def install_signals(first: Any, second: Any) -> None:
    """SIGTERM/SIGINT: the first calls ``first`` (drain), any later one ``second`` (stop now)."""
    seen = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if seen.is_set():
            second()
        else:
            seen.set()
            first()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


@cli.command()
@click.argument("workflows", nargs=-1, required=True)
@click.option("--concurrency", "-c", type=int, default=None, help="steps run at once [16]")
@click.option("--lease-s", type=float, default=None, help="claim lease [4.0]")
@click.option("--heartbeat-interval-s", type=float, default=None, help="heartbeat period [1.0]")
@click.option("--drain-grace-s", type=float, default=None, help="SIGTERM grace for in-flight steps [30]")
@click.option(
    "--event-loop",
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    default=None,
    help="event loop: uvloop where installed, or asyncio's own [auto]",
)
@click.option("--max-crashes", type=int, default=None, help="crashes before a step is quarantined [3]")
@click.option("--block-ms", type=int, default=None, help="XREADGROUP block time [500]")
@click.option("--max-run-steps", type=int, default=None, help="steps a run may commit before it fails [10000]; 0 = any")
@click.option("--max-payload-bytes", type=int, default=None, help="limit of each update and stash [1048576]")
@click.option("--max-map-items", type=int, default=None, help="items one Map may run [1000]")
@click.option("--max-output-entries", type=int, default=None, help="live output entries kept per run [1000]")
@click.option("--promote-interval-s", type=float, default=None, help="how often due retries are enqueued [0.2]")
@click.option("--permit-poll-s", type=float, default=None, help="a step waiting for a permit asks again [30]")
@click.option("--worker-id", default=None, help="consumer name [host-pid-random]")
@click.option("--metrics-port", type=int, default=None, help="serve Prometheus /metrics on this port [off]")
@click.option("--metrics-host", default=None, help="address /metrics binds to [127.0.0.1]")
@pass_state
def worker(state: CliState, /, workflows: tuple[str, ...], worker_id: str | None, **flags: Any) -> None:
    """Run the steps of WORKFLOWS (module:attribute, e.g. myapp.flows:research).

    SIGTERM drains: in-flight steps get --drain-grace-s to finish, the rest are handed back.
    A second signal stops at once (the supervisor re-dispatches what was running).
    """
    flows = load_workflows(workflows)
    settings = state.settings(start_embedded=True, **flags)
    w = Worker(flows, settings, worker_id=worker_id)
    install_signals(lambda: w.shutdown(), lambda: w.shutdown(immediate=True))
    w.run()


@cli.command()
@click.option("--lease-s", type=float, default=None, help="claim lease [4.0]")
@click.option("--reclaim-interval-s", type=float, default=None, help="scan period for dead claims [0.5]")
@click.option("--sweep-interval-s", type=float, default=None, help="stuck-run sweep period [5]")
@click.option("--sweep-after-s", type=float, default=None, help="runs idle this long are checked [10]")
@click.option("--retention-s", type=float, default=None, help="purge completed/cancelled runs after [604800]; 0 keeps")
@click.option("--failed-retention-s", type=float, default=None, help="purge failed runs after [2592000]; 0 keeps")
@click.option("--max-crashes", type=int, default=None, help="crashes before a step is quarantined [3]")
@click.option("--metrics-port", type=int, default=None, help="serve Prometheus /metrics (fleet-wide) here [off]")
@click.option("--metrics-host", default=None, help="address /metrics binds to [127.0.0.1]")
@pass_state
def supervisor(state: CliState, /, **flags: Any) -> None:
    """Re-dispatch the steps of dead workers, repair stuck runs, enqueue due retries.

    Run two or more for availability: one leads (a lease in Redis), the others stand by.
    """
    s = Supervisor(state.settings(start_embedded=True, **flags))
    install_signals(s.shutdown, s.shutdown)
    s.run()
