"""Every Redis key, stream and group name: the data model in one place.

``<ns>`` is ``Settings.namespace`` (default ``orch``), ``R`` a run id, ``Q`` a queue name (a
priority's lane is a queue of its own, ``<queue>..high`` or ``<queue>..low``: orchestrator.priority), ``T``
a partition's hash tag. Lua scripts get every key they touch as ``KEYS`` from
:mod:`orchestrator.store`, which builds them here; no script builds a key name.

**Partitions.** A namespace has ``P`` partitions (``Settings.partitions``, 16 by default, recorded
in the ``config`` fleet key when the namespace is first used and checked by every process). A
run belongs to partition ``crc32(R) mod P``, and every key a script touches for it (its own keys,
its queue's stream and ``queued``/``delayed`` sets in that partition, the partition's run
indexes and counters) carries the partition's tag ``T`` = ``<ns>:p<i>:<n>``, with the smallest
``n`` that puts the tag's hash slot in the ``i``-th of ``P`` equal ranges of Redis Cluster's
16,384 slots: every script is single-slot, and partitions spread evenly over a cluster's shards.
Fleet keys (workers, leader, queues, config, the fleet's own counters) share ``{<ns>}`` and are
touched by their own scripts. Below, ``{T}`` stands for the run's partition's tag. So a run's
slot is ``CRC16(T) mod 16384`` for its partition's ``T``, the same on every deployment; on a
Redis Cluster the run lives on whichever master serves that slot. Resharding moves whole
partitions (a partition is one slot, and its keys move with it, streams with their consumer
groups and pending entries; docs/design.md section 5 says what clients see meanwhile); the
partition count cannot change for a namespace's life (``orchestrator migrate`` moves a
namespace from the layout before partitions).

=================================  ======  ======================================  ===================  ====================
Key                                Type    Holds                                   Written by           Lifetime
=================================  ======  ======================================  ===================  ====================
``<ns>:run:{T}:R``                 hash    run record: workflow, queue, status,    every run script     purged ``retention_s``
                                           cursor (step, visit, attempt), fence,   (submit, claim,      (failed runs:
                                           live claim (token, fence, worker,       commit, fail,        ``failed_retention_s``)
                                           time), dispatch (entry id | ``delayed`` release, cancel,     after it finishes
                                           | ``signal`` | ''), counters,           retry_run, promote,
                                           ``v:<step>`` visit counts,              redispatch, sweep,
                                           ``cost:<unit>``, last error,            signal, expire)
                                           ``stash_ms`` (step time the stash
                                           keeps), ``stash_base_ms``, ``due_ms``,
                                           a wait's ``wait_signal``,
                                           ``wait_into``, ``wait_on_timeout``,
                                           ``wait_ms``; step deadlines
                                           ``sd:<step>`` (ms), ``sd``, and
                                           ``queued_ms``; ``on_finish``: an RQ
                                           callback (JSON, bridge/callback.py)
``<ns>:run:{T}:R:state``           hash    current state: top-level field -> JSON  submit, commit       as the run
                                           (input, then each committed update)
``<ns>:run:{T}:R:results``         hash    idempotency key -> step record (the     commit (only if      as the run
                                           update delta, duration, fence, worker,  absent: never
                                           next step)                              overwritten)
``<ns>:run:{T}:R:stash``           hash    idempotency key -> last ``stash()`` of  stash (live claim    deleted at commit
                                           an unfinished step                      only); commit
``<ns>:run:{T}:R:history``         list    JSON events: submitted, ok, error,      the run scripts      as the run
                                           crashed, fenced, retried, repaired ...
``<ns>:run:{T}:R:children``        hash    the child runs (or map items) a step    commit (a            as the run
                                           started: ``n``, ``c:<i>`` each one's    StartChildren or a
                                           run id, ``r:<i>`` its result, ``s:<i>`` Map); child_done;
                                           its status, ``done``, ``into``,         retry_run
                                           ``collect``, ``from`` (the step record
                                           that holds their inputs), ``step``/
                                           ``visit`` of the wait, ``settled``; a
                                           map's ``map``, ``window``, ``started``
                                           (items handed out) and ``p:<i>`` (the
                                           submit of an item past the window)
``<ns>:run:{T}:R:output``          stream  live step output (``ctx.emit``): step,  the worker running  MAXLEN ~
                                           visit, attempt, fence, data (JSON); not a step (no fence    ``max_output_
                                           state, not durable (output.py)          check)               entries``; as the run
``<ns>:run:{T}:R:rq:J``            string  an RQ work-horse running RQ job ``J``   the work-horse       PX 3 x its beat
                                           of a bridged step (bridge/horse.py):    (SET, no script:     while it runs;
                                           JSON pid, host, RQ worker, then its     only its own job's   ``result_ttl_s``
                                           ``outcome`` once written                key)                 with the outcome
``<ns>:finished:{T}``              stream  run ids of linked runs (children, and   the scripts that     XDEL once relayed
                                           parents of children) and of runs with   finish a run;        (consumer group
                                           an ``on_finish`` that finished in this  the supervisor       ``parents``)
                                           partition, for the supervisor to relay  reads
                                           (child_done.lua, cancels, RQ callbacks)
``<ns>:run:{T}:R:signals``         hash    signals sent to the run: ``#`` count,   signal; commit (a    as the run (at most
                                           ``s:<id>`` record (name, digest, time), WaitFor takes one    ``max_signals_per_
                                           ``b:<id>`` payload and ``q:<name>`` ids sent before), promote run`` records)
                                           of those not delivered yet (arrival
                                           order), ``u:<id>`` the step:visit it
                                           went to
``<ns>:queue:{T}:Q``               stream  dispatches ``run step visit wf``;       submit, commit,      acked entries
                                           consumer group ``workers``              release, promote,    trimmed by the
                                                                                   redispatch, sweep,   supervisor each
                                                                                   retry_run            tick (trim.lua)
``<ns>:queued:{T}:Q``              zset    run id -> its entry's id as a score     the scripts that     while the run waits
                                           (ms * 2048 + seq), for runs whose       add entries; claim   in the stream
                                           dispatch waits in this stream           removes; sweep
                                           (unclaimed): the sweep looks only at
                                           those the group has passed
``<ns>:delayed:{T}:Q``             zset    run id -> due ms (a retry waiting out   fail, commit (a      until due
                                           its backoff, a sleeping run's wake-up,  Sleep, a WaitFor);
                                           a waiting run's timeout; one per run    promote, cancel,
                                           at most)                                signal remove; sweep
``<ns>:alive:{T}``                 hash    worker id -> when its claims in this    the worker's beat    removed when the
                                           partition lapse (server ms): a claim    (alive.lua), each    worker leaves or is
                                           is live while the run's claim_worker    heartbeat            reaped from the fleet
                                           has a deadline ahead of now
``<ns>:cancels:{T}``               stream  run ids cancelled in this partition,    cancel               MAXLEN ~1000
                                           read by workers at each beat (a
                                           running step learns its cancel)
``<ns>:deadlines:{T}``             zset    run id -> the earlier of its deadline   submit, and every    until expired or the
                                           and its queued step's (server ms), for  script that queues   run has neither (the
                                           runs with either                        a step of a run with supervisor ZREMs it)
                                                                                   step deadlines;
                                                                                   expire
``<ns>:runs:{T}:active``           zset    run id -> when to look at it: claimed   claim, commit        until the run ends
                                           runs (claim time), retries (due time);  (chained), fail,
                                           unfinished runs not waiting in a stream sweep; the others
                                                                                   remove
``<ns>:runs:{T}:done``             zset    run id -> finished ms (completed and    commit, cancel       until purged
                                           cancelled runs)
``<ns>:runs:{T}:dead``             zset    dead-letter: failed run id -> ms        fail, claim          until retried/purged
                                                                                   (quarantine),
                                                                                   commit (runaway)
``<ns>:fleet:{<ns>}:workers``      zset    worker id -> last heartbeat ms          heartbeat;           removed at shutdown
                                                                                   reap_workers         or when found dead
``<ns>:fleet:{<ns>}:worker:<id>``  hash    host, pid, queues, concurrency, started heartbeat            PX 10 x lease
``<ns>:fleet:{<ns>}:leader``       string  id of the supervisor that acts          leader, resign       PX 3 x reclaim
                                                                                                        interval + 1 s
``<ns>:fleet:{<ns>}:queues``       set     queue names in use                      submit, heartbeat    forever
``<ns>:fleet:{<ns>}:config``       hash    ``partitions``: the namespace's count   layout (first        forever
                                                                                   process to use it)
``<ns>:rate:{<ns>:rate:K}``        hash    rate limit ``K``: ``tat`` (GCRA's       rate (every admit    forever (a few
                                           theoretical arrival time, server ms);   and spend); limits   fields)
                                           ``rate``, ``per_ms``, ``burst`` when    set
                                           set at run time (they win over code)
``<ns>:rate:{<ns>:rate:K}:reserved``
                                   zset    run id -> the ms from which its step    rate                 until used, or an
                                           may start (it was told to wait)                              hour
``<ns>:fleet:{<ns>}:rate_limits``  set     names of the rate limits in use         worker start,        forever
                                                                                   limits set
``<ns>:permit:{<ns>:permit:K}``    hash    concurrency limit ``K``: ``limit`` when permit, limits set   forever (holders'
                                           set at run time (wins over code);                            and waiters'
                                           ``o:R``/``f:R`` token and fence of the                       fields leave
                                           claim holding R's permit; ``q:R`` the                        with them)
                                           queue of waiting run R
``<ns>:permit:{<ns>:permit:K}:holders``
                                   zset    run id -> lease end ms (renewed by its  permit (acquire,     until released
                                           worker's heartbeat)                     release, renew,      or the lease
                                                                                   sweep)               ends
``<ns>:permit:{<ns>:permit:K}:waiting``
                                   zset    run id -> ms it first asked (the FIFO   permit               until it gets a
                                           line for free permits)                                       permit, ends, or
                                                                                                        stops asking
``<ns>:permit:{<ns>:permit:K}:seen``
                                   zset    waiting run id -> ms it last asked      permit               as waiting
``<ns>:fleet:{<ns>}:permits``      set     names of the concurrency limits in use  worker start,        forever
                                                                                   limits set
``<ns>:stats:{T}``                 hash    a partition's counters (crashes,        the scripts          forever
                                           fenced, redispatched, repaired, ...);
                                           readers add up all (steps_ok,
                                           runs_submitted, runs_completed: sums
                                           of detail fields, counters.py)
``<ns>:stats:{T}:detail``          hash    a partition's per workflow and step     the scripts          forever
                                           counts (fields as the fleet's below)
``<ns>:stats:{<ns>}``              hash    the fleet's own counters (dead          supervisor, worker   forever
                                           workers, lost entries, purged, ...)
``<ns>:stats:{<ns>}:detail``       hash    per workflow and step, for metrics:     workers (zeroed      forever
                                           ``runs|wf|outcome``, ``steps|wf|step|
                                           outcome``, ``saved_steps|wf``,
                                           ``saved_ms|wf``, ``saved_stash_ms|wf``,
                                           ``cost|wf|step|unit``,
                                           ``cost_saved|wf|unit``, ``order|wf|step`` series, step
                                           (a step's place, set by workers); the   order)
                                           scripts count in their partition's
``<ns>:rejected:{<ns>}``           stream  malformed stream entries, kept for      worker               MAXLEN ~10000
                                           inspection with the reason
``<ns>:probe:{a}``, ``{b}``        (none)  never written: read together at connect (read only)          never exists
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

import functools
import re
import zlib
from dataclasses import dataclass

from redis.crc import key_slot

GROUP = "workers"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:@+=/-]{1,200}$")
QUEUE_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


SLOTS = 16384  # Redis Cluster's hash slots
DEFAULT_PARTITIONS = 16
MAX_PARTITIONS = 1024


def partition_of(run_id: str, partitions: int) -> int:
    """The partition of a run: CRC-32 of its id modulo the namespace's partition count.

    Fixed for the life of the namespace (the count is stored at first use and checked by every
    process), so every process finds a run's keys from its id alone.
    """
    return zlib.crc32(run_id.encode()) % partitions


@functools.cache
def partition_tag(namespace: str, partition: int, partitions: int) -> str:
    """The hash tag shared by every key of one partition: ``<ns>:p<i>:<n>`` with the smallest
    ``n`` that puts the tag's slot in the ``i``-th of ``partitions`` equal ranges of Redis
    Cluster's 16,384 slots, so that partitions spread evenly over a cluster's shards (plain
    ``<ns>:p<i>`` tags fall 4/5/7 over three masters). Deterministic: every process and version
    computes the same tags."""
    n = 0
    while key_slot(f"{namespace}:p{partition}:{n}".encode()) * partitions // SLOTS != partition:
        n += 1
    return f"{namespace}:p{partition}:{n}"


@dataclass(frozen=True)
class RunKeys:
    """The keys of one run; all share its partition's hash tag."""

    run: str
    state: str
    results: str
    stash: str
    history: str
    signals: str
    children: str
    output: str

    @classmethod
    def under(cls, base: str) -> RunKeys:
        """The keys of a run whose record is ``base``; the others are ``base`` plus a suffix."""
        return cls(*(base if name == "run" else f"{base}:{name}" for name in cls.__dataclass_fields__))


@dataclass(frozen=True)
class QueueKeys:
    """The keys of one queue in one partition; all share the partition's hash tag."""

    stream: str
    queued: str
    delayed: str


@dataclass(frozen=True)
class PartitionKeys:
    """The run indexes and counters of one partition, in the slot of its runs and queues."""

    partition: int
    active: str
    done: str
    dead: str
    stats: str
    stats_detail: str
    alive: str
    cancels: str
    deadlines: str
    finished: str


@dataclass(frozen=True)
class PermitKeys:
    """The keys of one concurrency limit, in a slot of their own (``permit.lua``)."""

    holders: str
    waiting: str
    seen: str
    info: str

    @property
    def all(self) -> list[str]:
        return [self.holders, self.waiting, self.seen, self.info]


@dataclass(frozen=True)
class LedgerKeys:
    """What the chaos and test workflows record about themselves: not orchestrator state, the
    outside observer the invariant checker compares the orchestrator's own records with."""

    executions: str
    effects: str
    requests: str
    items: str
    fenced: str
    holding: str  # hash: execution -> its pid, while it holds a concurrency permit
    most_holding: str  # hash: concurrency limit -> the most live holders an entering execution saw


@dataclass(frozen=True)
class Keys:
    """Builds every key of one namespace. Cheap to create; holds no connection.

    ``partitions`` must be the namespace's (``Settings.partitions``, stored in the ``config``
    fleet key at first use): a run's keys are found from its id and that count.
    """

    namespace: str = "orch"
    partitions: int = DEFAULT_PARTITIONS

    def partition_of(self, run_id: str) -> int:
        return partition_of(run_id, self.partitions)

    def tag(self, partition: int) -> str:
        return partition_tag(self.namespace, partition, self.partitions)

    def run(self, run_id: str) -> RunKeys:
        base = f"{self.namespace}:run:{{{self.tag(self.partition_of(run_id))}}}:{run_id}"
        return RunKeys.under(base)

    def horse(self, run_id: str, job_id: str) -> str:
        """The beat, then the outcome, of the RQ work-horse that runs RQ job ``job_id`` of a
        bridged step of ``run_id`` (orchestrator.bridge); expires on its own."""
        return f"{self.run(run_id).run}:rq:{job_id}"

    def queue(self, name: str, partition: int) -> QueueKeys:
        tag = f"{{{self.tag(partition)}}}:{name}"
        ns = self.namespace
        # the streams alone match <ns>:queue:* (KEDA's read-only ACL pattern, docs/security.md)
        return QueueKeys(stream=f"{ns}:queue:{tag}", queued=f"{ns}:queued:{tag}", delayed=f"{ns}:delayed:{tag}")

    def queue_of(self, name: str, run_id: str) -> QueueKeys:
        """The keys of queue ``name`` in the partition of ``run_id``: where its dispatches go."""
        return self.queue(name, self.partition_of(run_id))

    def streams(self, name: str) -> list[str]:
        """The streams of queue ``name``, one per partition, in partition order."""
        return [self.queue(name, p).stream for p in range(self.partitions)]

    def part(self, partition: int) -> PartitionKeys:
        tag = self.tag(partition)
        return PartitionKeys(
            partition=partition,
            active=f"{self.namespace}:runs:{{{tag}}}:active",
            done=f"{self.namespace}:runs:{{{tag}}}:done",
            dead=f"{self.namespace}:runs:{{{tag}}}:dead",
            stats=f"{self.namespace}:stats:{{{tag}}}",
            stats_detail=f"{self.namespace}:stats:{{{tag}}}:detail",
            alive=f"{self.namespace}:alive:{{{tag}}}",
            cancels=f"{self.namespace}:cancels:{{{tag}}}",
            deadlines=f"{self.namespace}:deadlines:{{{tag}}}",
            finished=f"{self.namespace}:finished:{{{tag}}}",
        )

    def part_of(self, run_id: str) -> PartitionKeys:
        return self.part(self.partition_of(run_id))

    @property
    def parts(self) -> list[PartitionKeys]:
        return [self.part(p) for p in range(self.partitions)]

    def _fleet(self, suffix: str) -> str:
        return f"{self.namespace}:fleet:{{{self.namespace}}}:{suffix}"

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
    def config(self) -> str:
        return self._fleet("config")

    @property
    def stats(self) -> str:
        """Fleet counters that no script keeps with a run (the supervisor's and workers' own)."""
        return f"{self.namespace}:stats:{{{self.namespace}}}"

    @property
    def stats_detail(self) -> str:
        """Fleet-level detail: zeroed series and each step's place, announced by workers."""
        return f"{self.namespace}:stats:{{{self.namespace}}}:detail"

    @property
    def all_stats(self) -> list[str]:
        """Every counters hash, fleet first: readers add them up."""
        return [self.stats, *(p.stats for p in self.parts)]

    @property
    def all_stats_detail(self) -> list[str]:
        return [self.stats_detail, *(p.stats_detail for p in self.parts)]

    def rate_limit(self, name: str) -> tuple[str, str]:
        """The keys of rate limit ``name``: its hash (``tat``; ``rate``, ``per_ms``, ``burst`` set at
        run time) and its reservations, in a slot of their own (one limit is one slot)."""
        base = f"{self.namespace}:rate:{{{self.namespace}:rate:{name}}}"
        return base, f"{base}:reserved"

    @property
    def rate_limits(self) -> str:
        """The names of the rate limits the fleet knows (workers add theirs, ``limits set`` too)."""
        return self._fleet("rate_limits")

    def permit(self, name: str) -> PermitKeys:
        """The keys of concurrency limit ``name``: holders, waiting line, last asks, and its hash
        (run-time limit, holders' tokens and fences, waiters' queues), in their own slot."""
        base = f"{self.namespace}:permit:{{{self.namespace}:permit:{name}}}"
        return PermitKeys(f"{base}:holders", f"{base}:waiting", f"{base}:seen", base)

    @property
    def permits(self) -> str:
        """The names of the concurrency limits the fleet knows (workers add theirs, ``limits set`` too)."""
        return self._fleet("permits")

    @property
    def rejected(self) -> str:
        return f"{self.namespace}:rejected:{{{self.namespace}}}"

    @property
    def cluster_probe(self) -> tuple[str, str]:
        """Two keys in different hash slots, never written: ``EXISTS`` on both answers 0 from a
        single server and CROSSSLOT from a Redis Cluster node (``connection.is_cluster_node``),
        which then gets redis-py's cluster client."""
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
            holding=f"{base}:holding",
            most_holding=f"{base}:most_holding",
        )


@dataclass(frozen=True)
class LegacyKeys:
    """The keys of the layout before partitions (up to 0.x, read only by ``orchestrator migrate``):
    a run's keys tagged with its id, a queue's with its name, the run indexes fleet-wide. The
    fleet keys, the counters (now the fleet's own) and the rejected stream kept their names."""

    namespace: str

    def run(self, run_id: str) -> RunKeys:
        base = f"{self.namespace}:run:{{{run_id}}}"
        return RunKeys.under(base)

    def queue(self, name: str) -> QueueKeys:
        base = f"{self.namespace}:queue:{{{name}}}"
        return QueueKeys(stream=base, queued=f"{base}:queued", delayed=f"{base}:delayed")

    def index(self, name: str) -> str:
        """``active``, ``done`` or ``dead``."""
        return f"{self.namespace}:runs:{{{self.namespace}}}:{name}"


ITEM_MARK = ".."  # in the name of a map's item workflow, "<workflow>..<item>": never in a user's


def idempotency_key(run_id: str, step: str, visit: int, workflow: str = "") -> str:
    """``{run_id}:{step}`` for a step's first visit, ``{run_id}:{step}:{visit}`` after a loop.

    A map item's run id is its key already: the map step's key and the item's index,
    ``{run_id}:{step}:{index}`` (``{run_id}:{step}:{visit}:{index}`` after a loop), and its one
    step (of the workflow ``<workflow>..<item>``) has that key."""
    if ITEM_MARK in workflow:
        return run_id
    return f"{run_id}:{step}" if visit == 1 else f"{run_id}:{step}:{visit}"
