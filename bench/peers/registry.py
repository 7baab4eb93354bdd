"""Every peer configuration the benchmarks can run, by row name (only those whose package is installed)."""

from __future__ import annotations

from bench.peers.base import PeerSpec

PEERS: dict[str, PeerSpec] = {}
MISSING: dict[str, str] = {}  # system -> why its rows are unavailable

try:
    from bench.peers.rq_peer import rq_spec
except ImportError as exc:  # the bench extras are not installed
    MISSING["rq"] = str(exc)
else:
    for spec in (
        rq_spec("rq simple-next", "rq.worker.SimpleWorker", chain_next=True),
        rq_spec("rq simple-deps", "rq.worker.SimpleWorker", chain_next=False),
        rq_spec("rq fork-next", None, chain_next=True),
        rq_spec("rq fork-deps", None, chain_next=False),
    ):
        PEERS[spec.name] = spec

try:
    from bench.peers.celery_peer import celery_spec
except ImportError as exc:
    MISSING["celery"] = str(exc)
else:
    PEERS["celery prefork-durable"] = celery_spec()


def peer_spec(name: str) -> PeerSpec:
    """The spec of row ``name``; a clear error naming the known rows (and missing packages) otherwise."""
    try:
        return PEERS[name]
    except KeyError:
        hint = f" (not installed: {MISSING}; pip install -e '.[bench]')" if MISSING else ""
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS) or 'none'}{hint}") from None


def available(names: tuple[str, ...]) -> tuple[str, ...]:
    """The default rows that can run here: a machine without the bench extras still measures ours."""
    if MISSING:
        print(f"peer rows skipped, packages missing: {MISSING}; pip install -e '.[bench]'", flush=True)
    return tuple(n for n in names if n in PEERS)


def parse_peers(value: str | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
    """``--peers`` -> row names: the installed ``defaults`` when not given; every name checked up front."""
    names = available(defaults) if value is None else tuple(p.strip() for p in value.split(",") if p.strip())
    for name in names:
        peer_spec(name)  # an unknown name fails here, before anything starts
    return names
