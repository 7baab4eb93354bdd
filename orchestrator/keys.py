"""Every Redis key, stream and group name: the data model in one place.

``<ns>`` is ``Settings.namespace`` (default ``orch``), ``R`` a run id, ``Q`` a queue name.
Lua scripts get every key they touch as ``KEYS`` from :mod:`orchestrator.store`, which builds
them here; no script builds a key name.
Keys of one run share the hash tag ``{R}``, keys of one queue share ``{Q}``, fleet-wide keys
share ``{<ns>}``. Many scripts touch a run, its queue and the fleet indexes in one call, which
Redis Cluster refuses (CROSSSLOT); see docs/design.md, "Redis Cluster".

=================================  ======  ======================================  ===================  ====================
Key                                Type    Holds                                   Written by           Lifetime
=================================  ======  ======================================  ===================  ====================
``<ns>:run:{R}``                   hash    run record: workflow, queue, status,    every run script     purged ``retention_s``
                                           cursor (step, visit, attempt), fence,   (submit, claim,      (failed runs:
                                           live claim (token, fence, worker,       commit, fail,        ``failed_retention_s``)
                                           time), dispatch (entry id | ``delayed`` release, cancel,     after it finishes
                                           | ''), counters, ``v:<step>`` visit     retry_run, promote,
                                           counts, ``cost:<unit>``, last error,    redispatch, sweep)
                                           ``stash_ms`` (step time the stash
                                           keeps), ``stash_base_ms``
``<ns>:run:{R}:state``             hash    current state: top-level field -> JSON  submit, commit       as the run
                                           (input, then each committed update)
``<ns>:run:{R}:results``           hash    idempotency key -> step record (the     commit (only if      as the run
                                           update delta, duration, fence, worker,  absent: never
                                           next step)                              overwritten)
``<ns>:run:{R}:stash``             hash    idempotency key -> last ``stash()`` of  stash (live claim    deleted at commit
                                           an unfinished step                      only); commit
``<ns>:run:{R}:history``           list    JSON events: submitted, ok, error,      the run scripts      as the run
                                           crashed, fenced, retried, repaired ...
``<ns>:run:{R}:lease``             string  the live claim's token (unique per      claim, commit        PX ``lease_s``,
                                           claim: worker id and a nonce)           (chained claim);     renewed each beat
                                                                                   renew; deleted by
                                                                                   commit, fail,
                                                                                   release, cancel
``<ns>:queue:{Q}``                 stream  dispatches ``run step visit wf``;       submit, commit,      entry deleted
                                           consumer group ``workers``              release, promote,    (XDEL) once acked
                                                                                   redispatch, sweep,
                                                                                   retry_run
``<ns>:queue:{Q}:queued``          zset    run id -> its entry's id as a score     the scripts that     while the run waits
                                           (ms + seq/2048), for runs whose         add entries; claim   in the stream
                                           dispatch waits in this stream           removes; sweep
                                           (unclaimed): the sweep looks only at
                                           those the group has passed
``<ns>:queue:{Q}:delayed``         zset    run id -> due ms (a retry waiting out   fail; promote,       until due
                                           its backoff; one per run at most)       cancel remove
``<ns>:runs:{<ns>}:active``        zset    run id -> when to look at it: claimed   claim, commit        until the run ends
                                           runs (claim time), retries (due time);  (chained), fail,
                                           unfinished runs not waiting in a stream sweep; the others
                                                                                   remove
``<ns>:runs:{<ns>}:done``          zset    run id -> finished ms (completed and    commit, cancel       until purged
                                           cancelled runs)
``<ns>:runs:{<ns>}:dead``          zset    dead-letter: failed run id -> ms        fail, claim          until retried/purged
                                                                                   (quarantine),
                                                                                   commit (runaway)
``<ns>:fleet:{<ns>}:workers``      zset    worker id -> last heartbeat ms          heartbeat;           removed at shutdown
                                                                                   reap_workers         or when found dead
``<ns>:fleet:{<ns>}:worker:<id>``  hash    host, pid, queues, concurrency, started heartbeat            PX 10 x lease
``<ns>:fleet:{<ns>}:leader``       string  id of the supervisor that acts          leader, resign       PX 3 x reclaim
                                                                                                        interval + 1 s
``<ns>:fleet:{<ns>}:queues``       set     queue names in use                      submit, heartbeat    forever
``<ns>:stats:{<ns>}``              hash    fleet-wide counters (steps_ok, crashes, the scripts;        forever
                                           fenced, redispatched, repaired, ...)    supervisor, worker
``<ns>:stats:{<ns>}:detail``       hash    per workflow and step, for metrics:     the scripts          forever
                                           ``runs|wf|outcome``, ``steps|wf|step|
                                           outcome``, ``saved_steps|wf``,
                                           ``saved_ms|wf``, ``saved_stash_ms|wf``,
                                           ``cost|wf|step|unit``,
                                           ``cost_saved|wf|unit``, ``order|wf|step``
                                           (a step's place, set by workers)
``<ns>:rejected:{<ns>}``           stream  malformed stream entries, kept for      worker               MAXLEN ~10000
                                           inspection with the reason
``<ns>:probe:{a}``, ``{b}``        (none)  never written: read together at start   (read only)          never exists
                                           to tell a Redis Cluster node (CROSSSLOT)
``<ns>:ledger:{<ns>}:executions``  list    chaos/test steps: one JSON record per   chaos and test       until the namespace
                                           execution (key, fence, worker, saw)     workflows only       is deleted
``<ns>:ledger:{<ns>}:effects``     hash    fake receiver: idempotency key ->       chaos and test       as above
                                           applied effect (HSETNX: once per key)   workflows only
``<ns>:ledger:{<ns>}:requests``    hash    fake receiver: key -> requests received chaos and test       as above
``<ns>:ledger:{<ns>}:items``       hash    ``run:item`` -> times an item was       chaos and test       as above
                                           processed inside a stashing step        workflows only
``<ns>:ledger:{<ns>}:fenced``      zset    fenced receiver: idempotency key ->     chaos and test       as above
                                           highest fencing token seen (ZADD GT)    workflows only
=================================  ======  ======================================  ===================  ====================

Every unfinished run is in exactly one of ``active`` and its queue's ``queued`` index; the sweep
(``passed.lua``, ``sweep.lua``) walks both, and puts a run back where it belongs when it finds it
in the wrong one. Storage per run grows with the number of committed steps by one result record
each (the update delta plus ~150 bytes of metadata) and one history event per attempt; the state
hash holds only the current value of each field. Nothing stores a full snapshot per step, and
``max_run_steps`` bounds how many steps one run can commit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

GROUP = "workers"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@+=/-]{1,200}$")
QUEUE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run; all share the ``{run_id}`` hash tag."""

    run: str
    state: str
    results: str
    stash: str
    history: str
    lease: str


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one queue; all share the ``{queue}`` hash tag."""

    stream: str
    queued: str
    delayed: str


@dataclass(frozen=True)
class LedgerKeys:
    """What the chaos and test workflows record about themselves: not orchestrator state, the
    outside observer the invariant checker compares the orchestrator's own records with."""

    executions: str
    effects: str
    requests: str
    items: str
    fenced: str


@dataclass(frozen=True)
class Keys:
    """Builds every key of one namespace. Cheap to create; holds no connection."""

    namespace: str = "orch"

    def run(self, run_id: str) -> RunKeys:
        base = f"{self.namespace}:run:{{{run_id}}}"
        return RunKeys(
            run=base,
            state=f"{base}:state",
            results=f"{base}:results",
            stash=f"{base}:stash",
            history=f"{base}:history",
            lease=f"{base}:lease",
        )

    def queue(self, name: str) -> QueueKeys:
        base = f"{self.namespace}:queue:{{{name}}}"
        return QueueKeys(stream=base, queued=f"{base}:queued", delayed=f"{base}:delayed")

    def _fleet(self, suffix: str) -> str:
        return f"{self.namespace}:fleet:{{{self.namespace}}}:{suffix}"

    @property
    def active(self) -> str:
        return f"{self.namespace}:runs:{{{self.namespace}}}:active"

    @property
    def done(self) -> str:
        return f"{self.namespace}:runs:{{{self.namespace}}}:done"

    @property
    def dead(self) -> str:
        return f"{self.namespace}:runs:{{{self.namespace}}}:dead"

    @property
    def workers(self) -> str:
        return self._fleet("workers")

    def worker(self, worker_id: str) -> str:
        return self._fleet(f"worker:{worker_id}")

    @property
    def leader(self) -> str:
        return self._fleet("leader")

    @property
    def queues(self) -> str:
        return self._fleet("queues")

    @property
    def stats(self) -> str:
        return f"{self.namespace}:stats:{{{self.namespace}}}"

    @property
    def stats_detail(self) -> str:
        return f"{self.namespace}:stats:{{{self.namespace}}}:detail"

    @property
    def rejected(self) -> str:
        return f"{self.namespace}:rejected:{{{self.namespace}}}"

    @property
    def cluster_probe(self) -> tuple[str, str]:
        """Two keys in different hash slots, never written: ``EXISTS`` on both answers 0 from a
        single server and CROSSSLOT from a Redis Cluster node, which workers and supervisors
        refuse at start (see ``connection.is_cluster_reply``)."""
        return f"{self.namespace}:probe:{{a}}", f"{self.namespace}:probe:{{b}}"

    @property
    def ledger(self) -> LedgerKeys:
        base = f"{self.namespace}:ledger:{{{self.namespace}}}"
        return LedgerKeys(
            executions=f"{base}:executions",
            effects=f"{base}:effects",
            requests=f"{base}:requests",
            items=f"{base}:items",
            fenced=f"{base}:fenced",
        )


def idempotency_key(run_id: str, step: str, visit: int) -> str:
    """``{run_id}:{step}`` for a step's first visit, ``{run_id}:{step}:{visit}`` after a loop."""
    return f"{run_id}:{step}" if visit == 1 else f"{run_id}:{step}:{visit}"
