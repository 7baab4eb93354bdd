"""What one supervisor scrape costs Redis: a bounded number of commands, however many runs.

Counted with ``INFO commandstats`` (calls per command, reset with ``CONFIG RESETSTAT``) around
one ``FleetCollector.collect()``, on a redis-server of the test's own, after building the fleet's
state with the real scripts: runs submitted to two workflows, half of the unfinished ones
claimed (running, in ``active``), the others waiting in the stream (``queued``), and a dead
letter of failed runs. A count of commands, not a time: it does not depend on the machine.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator

import pytest
import redis

from orchestrator import scripts
from orchestrator.codec import Dispatch
from orchestrator.embedded import RedisServer
from orchestrator.fleet_metrics import MEMORY_SAMPLE, RUN_SAMPLE, FleetCollector
from orchestrator.keys import DEFAULT_PARTITIONS, GROUP, Keys
from orchestrator.store import Store

WORKFLOWS = ("alpha", "beta")
QUEUE = "q"
P = DEFAULT_PARTITIONS
# the commands of a scrape that do not depend on runs: the counters and detail hashes of the
# fleet and of each partition, queue names and clock (2 (P + 1) + 2), per queue and partition 4,
# live workers and leader (2), the P dead letter indexes' sizes and reads (2P), the in-flight
# indexes' sizes and reads (active and one queued index per partition: 4P), recently finished
# runs of each partition (P)
FIXED = 2 * (P + 1) + 2 + 4 * P + 2 + 2 * P + 4 * P + P
# and at most `sample` run records for each of the dead letter and the in-flight gauge (one more
# per sorted set, from rounding up each set's share), five per run of the memory sample
BOUND = FIXED + (RUN_SAMPLE + P) + (RUN_SAMPLE + 2 * P) + 5 * MEMORY_SAMPLE


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A server of this module's own: nobody else's commands in its statistics."""
    server = RedisServer(tmp_path_factory.mktemp("redis"), appendfsync=None).start()
    yield server
    server.stop()


@pytest.fixture
def r(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield client
    client.close()


def build(r: redis.Redis, keys: Keys, unfinished: int, dead: int) -> dict[tuple[str, str], int]:
    """``unfinished`` runs (every other one claimed) and ``dead`` failed runs, alternating between
    the two workflows, made by the scripts the way workers make them. Returns the true counts:
    (workflow, status) -> runs, status "dead" for the dead letter."""
    store = Store(keys)
    total = unfinished + dead
    for stream in keys.streams(QUEUE):
        r.xgroup_create(stream, GROUP, id="0", mkstream=True)
    r.sadd(keys.queues, QUEUE)
    submits = [
        store.submit(
            run_id=f"run-{i}",
            workflow=WORKFLOWS[i % 2],
            queue=QUEUE,
            first_step="a",
            input_sha="d",
            event='{"detail":"x"}',
            request_id=f"req-{i}",
            state={"n": "0"},
        )
        for i in range(total)
    ]
    for start in range(0, total, 500):
        scripts.execute(r, submits[start : start + 500])
    beats = [store.alive(partition=p, worker="w", lease_ms=600_000, cancels_seen="") for p in range(keys.partitions)]
    scripts.execute(r, beats)  # "w" is alive in every partition: its claims are live
    reply = r.xreadgroup(GROUP, "w", dict.fromkeys(keys.streams(QUEUE), ">"), count=total)
    entries = [(eid, Dispatch.model_validate(fields)) for _, batch in reply for eid, fields in batch]
    assert len(entries) == total
    truth: dict[tuple[str, str], int] = {}
    claims, failures = [], []
    for eid, dispatch in entries:
        index = int(dispatch.run.removeprefix("run-"))
        if index < unfinished and index % 4 >= 2:
            status = "pending"  # left waiting in the stream
        else:
            claims.append(
                store.claim(
                    dispatch=dispatch,
                    queue=QUEUE,
                    entry_id=eid,
                    token=f"w:{eid}",
                    worker="w",
                    max_crashes=3,
                    max_steps=0,
                )
            )
            status = "running"
            if index >= unfinished:
                failures.append(
                    store.fail(
                        dispatch=dispatch,
                        queue=QUEUE,
                        token=f"w:{eid}",
                        event='{"step":"a"}',
                        kind="error",
                        retry_delay_ms=None,
                        error='{"type":"E","message":"m"}',
                    )
                )
                status = "dead"
        key = (dispatch.wf, status)
        truth[key] = truth.get(key, 0) + 1
    for calls in (claims, failures):
        for start in range(0, len(calls), 500):
            scripts.execute(r, calls[start : start + 500])
    return truth


def scrape(r: redis.Redis, collector: FleetCollector) -> tuple[int, dict[str, dict[tuple[str, ...], float]]]:
    """(Redis commands that one scrape ran, its samples by name and labels)."""
    r.config_resetstat()
    families = list(collector.collect())
    stats: dict[str, dict[str, int]] = r.info("commandstats")  # type: ignore[assignment]
    commands = sum(
        int(v["calls"]) for name, v in stats.items() if not name.startswith(("cmdstat_info", "cmdstat_config"))
    )
    samples: dict[str, dict[tuple[str, ...], float]] = {}
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sample.labels.values())] = sample.value
    return commands, samples


@pytest.mark.parametrize("unfinished", [100, 3_000])
def test_a_scrape_costs_a_bounded_number_of_redis_commands(r: redis.Redis, unfinished: int) -> None:
    keys = Keys(f"t{uuid.uuid4().hex[:10]}")
    dead = unfinished // 3
    truth = build(r, keys, unfinished, dead)
    collector = FleetCollector(r, keys, lease_ms=4000)
    commands, samples = scrape(r, collector)
    assert samples["orchestrator_fleet_scrape_error"] == {(): 0.0}
    # the old scrape read every unfinished and dead run: more than unfinished + dead commands
    assert commands <= BOUND, f"{commands} commands for {unfinished} unfinished runs, more than {BOUND}"
    in_flight = samples["orchestrator_fleet_runs_in_flight"]
    dead_letter = samples["orchestrator_fleet_dead_letter_runs"]
    true_in_flight = {k: float(n) for k, n in truth.items() if k[1] != "dead"}
    true_dead = {(wf,): float(n) for (wf, status), n in truth.items() if status == "dead"}
    # totals are exact either way: each index's size is read, the sample only splits it
    assert sum(in_flight.values()) == unfinished
    assert sum(dead_letter.values()) == dead
    if unfinished <= RUN_SAMPLE:  # every run read: exact
        assert {k: v for k, v in in_flight.items() if v} == true_in_flight
    else:  # a random sample of RUN_SAMPLE: each share within 4 standard errors
        for key, n in true_in_flight.items():
            p = n / unfinished
            assert abs(in_flight[key] - n) <= 4 * math.sqrt(p * (1 - p) / RUN_SAMPLE) * unfinished + 1, key
    if dead <= RUN_SAMPLE:
        assert dead_letter == true_dead
    else:
        for key, n in true_dead.items():
            p = n / dead
            assert abs(dead_letter[key] - n) <= 4 * math.sqrt(p * (1 - p) / RUN_SAMPLE) * dead + 1, key
    memory = samples["orchestrator_run_state_bytes"]  # 16 runs measured, drawn from the sample
    assert memory and set(memory) <= {(wf,) for wf in WORKFLOWS} and all(v > 0 for v in memory.values())
    print(f"{unfinished} unfinished runs, {dead} dead: {commands} Redis commands per scrape")


def test_the_bound_does_not_depend_on_the_number_of_runs(r: redis.Redis) -> None:
    """Past the sample, more runs cost no more commands: 600 and 2,400 unfinished runs (200 and
    800 dead), the same count but for rounding: each index's share of the sample is rounded up,
    so the count may move by one read per index (P dead-letter and 2P in-flight indexes)."""
    counts = []
    for unfinished in (600, 2_400):
        keys = Keys(f"t{uuid.uuid4().hex[:10]}")
        build(r, keys, unfinished, dead=unfinished // 3)
        counts.append(scrape(r, FleetCollector(r, keys, lease_ms=4000))[0])
    assert all(c <= BOUND for c in counts) and abs(counts[0] - counts[1]) <= 3 * P, counts
