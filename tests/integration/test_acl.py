"""Redis ACL: each role does its whole job with exactly the ACL line docs/security.md gives it.

The ACL lines are read from docs/security.md (one source for the doc and the tests) and loaded
into a real redis-server with ``ACL SETUSER``, with the namespace and the passwords of the test.
Every test ends by reading ``ACL LOG``: a refusal that the code swallowed (a metrics scrape, a
connection's CLIENT SETINFO, a shutdown step, a ``redis.pcall`` inside a script) fails it too.

How the lines were found: each role started with no command at all, ran the end-to-end job
below, and got every command Redis refused (ACL LOG) added, until the job passed with an empty
log. Paths the job does not reach are covered by derivation: every command a script the role
runs can call (the Lua call graph, prelude helpers resolved: :func:`script_commands`), plus the
commands the role sends itself (:data:`DIRECT`, each with the code that sends it). The static
test pins each line to exactly that union, so a line holds nothing more than the role needs.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import subprocess
import urllib.request
import uuid
from collections.abc import Iterator
from functools import cache
from importlib import resources
from pathlib import Path

import pytest
import redis
from pydantic import BaseModel

from orchestrator import Client, RedisRefused, StepContext, Supervisor, Workflow, scripts
from orchestrator.connection import connect, connect_async
from orchestrator.embedded import RedisServer, free_port, server_version
from orchestrator.keda import KedaScaling
from orchestrator.keys import GROUP, Keys
from orchestrator.metrics import FleetCollector
from orchestrator.settings import Settings
from tests.conftest import fast_settings
from tests.harness import REPO, Proc, process_env, run_cli, start_worker, worker_thread
from tests.helpers import wait_until
from tests.ops import partition_mates
from workers.testflows import chain, effects

pytestmark = pytest.mark.single_server

DOC = REPO / "docs" / "security.md"
ROLES = ("worker", "supervisor", "client", "operator", "reader", "keda")
ADMIN_PASSWORD = "acl-admin-pw"
KILLED = -signal.SIGKILL


def words(text: str) -> list[str]:
    return text.split()


# The scripts each role runs (orchestrator/store.py builds the calls; the callers are named).
ROLE_SCRIPTS: dict[str, list[str]] = {
    # worker/runner.py, outcomes.py, execution.py, heartbeat.py, queues.py, runtime.py (ack_owned)
    "worker": words(
        "layout claim commit fail release alive own_pending redispatch stash ack reap_consumer heartbeat due promote"
        " submit cancel"  # the child runs of a step that returned StartChildren (cancelled if it was)
        " child_done"  # a finished map item's value, handed to its parent at once (children.report)
        " rate defer"  # a rate-limited step admitted, or given back until its reserved moment; ctx.spend
        " permit"  # a concurrency permit taken, renewed at each beat, given back (the waiters woken: promote)
    ),
    # supervisor.py, retention.py (purge)
    "supervisor": words(
        "layout reap_consumer dead_pending redispatch due promote passed sweep trim purge leader resign reap_workers"
        " stale expire child_done submit cancel"  # children.py: relay, check_parent (children not started), cascade
        " permit"  # the concurrency limits' sweep (lapsed holders, waiters that fit woken: promote)
    ),
    # Client.submit (the first records the namespace's partition count), Client.signal
    "client": ["layout", "submit", "signal"],
    # Client.cancel, retry, purge, signal (the CLI's cancel, retry, runs purge, signal)
    "operator": ["cancel", "retry_run", "purge", "signal"],
    "reader": [],
    "keda": [],
}
# redis-py's health check (a PING before the next command of a connection idle 15 s) and its
# CLIENT SETINFO at connect (refused harmlessly without it, but logged in ACL LOG each time)
CONNECTION = {"ping", "client|setinfo"}
PROBE = {"exists"}  # connection.is_cluster_node: EXISTS on two keys of different slots, at connect
# On a Redis Cluster only, for every role but KEDA: redis-py's cluster client reads the slot map
# and the command table (docs/security.md; test_cluster.py runs the roles with them)
CLUSTER_ADDITIONS = ["+cluster|slots", "+command", "+asking"]
SCRIPTING = {"evalsha", "script|load"}  # scripts.execute: EVALSHA, and SCRIPT LOAD on NOSCRIPT
# fleet_metrics.FleetCollector (the supervisor's /metrics, `orchestrator stats` and `top`);
# ZRANDMEMBER samples run records past RUN_SAMPLE runs, MEMORY USAGE sizes a few
SCRAPE = set(words("exists hget hgetall hmget memory|usage smembers time xinfo|groups xlen xpending zcard zcount"))
SCRAPE |= {"zrandmember", "zrange", "zrevrange"}
PURGE_PAGES = {"time", "zrangebyscore", "hmget"}  # retention.purge_finished (also --dry-run)
SUPERVISING = set(
    words("smembers time xgroup|create xinfo|consumers xpending xrange hget zmscore xack xdel hincrby hdel")
) | {"xreadgroup", "xautoclaim", "hgetall", "hmget", "exists"}  # children.py: the finished notices, children
# The commands each role sends itself, outside scripts.
DIRECT: dict[str, set[str]] = {
    # runner.py: XREADGROUP, SADD queues, HINCRBY/HSET zeroed series and step order, ZREM/DEL at
    # shutdown; queues.py: XGROUP CREATE, HINCRBY counters
    "worker": CONNECTION
    | PROBE
    | SCRIPTING
    | {"xreadgroup", "xgroup|create", "sadd", "hincrby", "hset", "zrem", "del", "hdel", "xrange", "xack", "xdel"}
    | {"hmget", "hgetall"}  # children.report of a finished map item: its parent, its state; the next items
    | {"xadd"}  # ctx.emit: the run's live output (output.Emitter)
    | {"smembers"},  # the queues set: the priority lanes of its queues in use (at start, every lease)
    # supervisor.py: queues, clock, groups, consumers, pending entries, HGET of run records, ZMSCORE
    # of the fleet, XACK/XDEL of dropped entries (store.ack), HINCRBY counters; the scrape; retention
    "supervisor": CONNECTION | PROBE | SCRIPTING | SCRAPE | PURGE_PAGES | SUPERVISING,
    # client.py: SADD queues at submit; get/state/results/stats (HGETALL), wait (HGET), events
    # (LRANGE), list_runs (SMEMBERS, ZREVRANGE)
    # every client call first compares the namespace's partition count (HMGET of its config)
    # output (XRANGE) and follow_output (XREAD BLOCK): a run's live output
    "client": CONNECTION
    | PROBE
    | SCRIPTING
    | {"sadd", "hget", "hgetall", "hmget", "lrange", "smembers", "zrevrange", "xrange", "xread"},
    # get() before cancel and retry; a cancelled parent's children (children.cancel_children)
    # a retried parent's children that failed or were cancelled (HGET of each: children.unfinished_children);
    # limits set / clear (HSET, HDEL of the limit's hash, SADD of its name; then it lists it: ZCARD,
    # and a concurrency limit's holders: ZCOUNT)
    "operator": CONNECTION
    | PROBE
    | SCRIPTING
    | PURGE_PAGES
    | {"hgetall", "hmget", "hget", "hset", "hdel", "sadd", "zcard", "zcount"},
    # runs list, status, history, stats, top, runs purge --dry-run; runs why (XRANGE: the entries
    # queued ahead of a run's own)
    # history -f: the live output (XRANGE); Run.follow_output (XREAD BLOCK)
    "reader": CONNECTION | PROBE | SCRAPE | PURGE_PAGES | {"lrange", "xrange", "xread"},
    # KEDA's redis-streams scaler (go-redis): XPENDING (pending trigger); INFO (server version,
    # every poll), XINFO GROUPS and XLEN when the group is missing (lag trigger)
    "keda": CONNECTION | {"info", "xinfo|groups", "xlen", "xpending"},
}
KEY_PATTERNS = {"reader": "%R~orch:*", "keda": "%R~orch:queue:*"}  # read-only; the others ~orch:*
_CONTAINERS = ("xinfo", "xgroup")  # commands whose ACL name includes the subcommand
_CALL = re.compile(r"redis\.p?call\(\s*'([A-Za-z]+)'(?:\s*,\s*'([A-Za-z]+)')?")


def doc_lines() -> dict[str, list[str]]:
    """``ACL SETUSER <user> <rules>`` lines of docs/security.md: user -> rules."""
    return {user: rules.split() for user, rules in re.findall(r"^\s*ACL SETUSER (\S+) (.+)$", DOC.read_text(), re.M)}


def commands(rules: list[str]) -> set[str]:
    return {rule[1:] for rule in rules if rule.startswith("+") and not rule.startswith("+@")}


@cache
def script_commands(name: str) -> frozenset[str]:
    """Every command ``<name>.lua`` can call: its own and those of the prelude helpers it uses."""
    folder = resources.files("orchestrator.scripts")
    prelude = (folder / "_prelude.lua").read_text()
    helpers = {m[1]: m[2] for m in re.finditer(r"^local function (\w+)\(.*?\n(.*?)^end$", prelude, re.M | re.S)}
    found: set[str] = set()
    todo, used = [(folder / f"{name}.lua").read_text()], set()
    while todo:
        text = todo.pop()
        for m in _CALL.finditer(text):
            command = m[1].lower()
            found.add(f"{command}|{m[2].lower()}" if command in _CONTAINERS else command)
        for helper, body in helpers.items():
            if helper not in used and re.search(rf"\b{helper}\(", text):
                used.add(helper)
                todo.append(body)
    return frozenset(found)


def needed(role: str) -> set[str]:
    return DIRECT[role].union(*(script_commands(s) for s in ROLE_SCRIPTS[role]))


# -- the lines themselves ------------------------------------------------------------------------


def test_the_doc_gives_each_role_exactly_the_commands_it_needs() -> None:
    lines = doc_lines()
    for role in ROLES:
        rules = lines[f"orch-{role}"]
        assert rules[:2] == ["reset", "on"] and rules[2].startswith(">"), rules[:3]
        assert rules[3] == KEY_PATTERNS.get(role, "~orch:*") and rules[4:6] == ["resetchannels", "-@all"], role
        assert not [r for r in rules[6:] if not r.startswith("+") or r.startswith("+@")], f"{role}: commands only"
        missing, extra = sorted(needed(role) - commands(rules)), sorted(commands(rules) - needed(role))
        assert (missing, extra) == ([], []), f"{role}: missing {missing}, not needed {extra}"


def test_the_doc_names_the_additions_a_cluster_needs() -> None:
    """test_cluster.py runs every role on a cluster with exactly these additions."""
    assert f"add `{' '.join(CLUSTER_ADDITIONS)}` to each of our lines" in " ".join(DOC.read_text().split())


def test_every_script_is_run_by_a_role() -> None:
    assert set(scripts.names()) == {s for names in ROLE_SCRIPTS.values() for s in names}


def test_the_default_user_line_for_keda_gives_it_keda_rules_only() -> None:
    lines = doc_lines()
    default, keda = lines["default"], lines["orch-keda"]
    assert default[3:] == keda[3:] and default[:2] == ["reset", "on"]


# -- against a real server -----------------------------------------------------------------------


class AclServer:
    """A redis-server whose ``default`` user has a password (the tests' admin); role users are
    made per namespace from the doc's lines."""

    def __init__(self, folder: Path) -> None:
        self.server = RedisServer(folder, appendfsync=None, password=ADMIN_PASSWORD).start()
        self.version = server_version(self.server.binary)
        self.admin = redis.Redis(port=self.server.port, password=ADMIN_PASSWORD, decode_responses=True)

    @property
    def admin_url(self) -> str:
        return self.server.url

    def users(self, namespace: str, *, lines: dict[str, list[str]] | None = None) -> dict[str, str]:
        """Create ``<namespace>-<role>`` for every role; return each role's URL."""
        urls = {}
        for role in ROLES:
            rules = self.rules((lines or doc_lines())[f"orch-{role}"], namespace, f"pw-{role}")
            self.admin.execute_command("ACL", "SETUSER", f"{namespace}-{role}", *rules)
            urls[role] = f"redis://{namespace}-{role}:pw-{role}@127.0.0.1:{self.server.port}/0"
        return urls

    def rules(self, rules: list[str], namespace: str, password: str) -> list[str]:
        """The doc's rules for ``namespace`` and ``password``; without CLIENT SETINFO on Redis 7.0,
        which does not know it (the doc says to leave it out there)."""
        out = [f">{password}" if r.startswith(">") else r.replace("~orch:", f"~{namespace}:") for r in rules]
        return [r for r in out if r != "+client|setinfo" or self.version >= (7, 2)]

    def denials(self, namespace: str) -> list[tuple[str, str, str, str]]:
        """ACL LOG entries of this namespace's users: (user, reason, context, object)."""
        entries = self.admin.execute_command("ACL", "LOG", "1000")
        out = []
        for entry in entries:
            fields = dict(zip(entry[::2], entry[1::2], strict=True)) if isinstance(entry, list) else entry
            if str(fields["username"]).startswith(f"{namespace}-"):
                out.append((fields["username"], fields["reason"], fields["context"], fields["object"]))
        return out

    def stop(self) -> None:
        self.admin.close()
        self.server.kill()


@pytest.fixture(scope="module")
def acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclServer]:
    server = AclServer(tmp_path_factory.mktemp("acl"))
    if server.version < (7, 0):
        server.stop()
        pytest.skip(f"{server.server.binary} is Redis {server.version}: the ACL lines use Redis 7 selectors (%R~)")
    yield server
    server.stop()


def namespace() -> str:
    return f"acl{uuid.uuid4().hex[:8]}"


def cli(url: str, ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(REPO),
        "ORCHESTRATOR_REDIS_URL": url,
        "ORCHESTRATOR_NAMESPACE": ns,
    }
    return run_cli(*args, env=env)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stdout[-1000:] + result.stderr[-2000:]
    return result.stdout


class Fleet:
    """Worker and supervisor processes, each with its role's URL; the test steps' ledger is written
    as admin (it observes the orchestrator; it is no part of what a worker needs)."""

    def __init__(self, settings: Settings, urls: dict[str, str], admin_url: str, tmp: Path) -> None:
        self.settings, self.urls, self.admin_url, self.tmp = settings, urls, admin_url, tmp
        self.procs: list[Proc] = []

    def worker(self, name: str, faults: str = "") -> Proc:
        settings = self.settings.with_url(self.urls["worker"])
        proc = start_worker(
            settings, self.tmp, name=name, faults=faults, args=("--worker-id", name), ledger_url=self.admin_url
        )
        self.procs.append(proc)
        return proc

    def supervisor(self, name: str, *args: str, **env: str) -> Proc:
        proc = Proc(
            ["supervisor", *args],
            process_env(self.settings.with_url(self.urls["supervisor"]), **env),
            self.tmp / f"{name}.log",
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.signal(signal.SIGTERM)
        assert proc.wait() == 0, proc.output()[-3000:]

    def kill_all(self) -> None:
        for proc in self.procs:
            proc.kill()


def test_workers_supervisors_clients_and_operators_do_their_whole_job_with_their_acl(
    acl: AclServer, tmp_path: Path
) -> None:
    """Retries and a dead letter, a kill -9 and the supervisor's reclaim, an operator's retry and
    cancel, a lost stream repaired by the sweep, a metrics scrape, a purge by the CLI and one by
    the supervisor, and clean shutdowns: each process with its role's ACL and nothing else."""
    ns = namespace()
    urls = acl.users(ns)
    settings = fast_settings(urls["client"], namespace=ns, concurrency=4)
    fleet = Fleet(settings, urls, acl.admin_url, tmp_path)
    client, operator = Client(settings), Client(settings.with_url(urls["operator"]))
    metrics_port = free_port()
    try:
        supervisor = fleet.supervisor("sup", "--metrics-port", str(metrics_port))
        doomed = fleet.worker("doomed", faults="mid_step=kill@s3,mid_step=raise@send")
        client.submit(effects, {}, run_id="bad")  # every attempt raises: retried, then dead-lettered
        wait_until(lambda: client.get("bad").status == "failed", timeout_s=20, what="bad failed")
        run = client.submit(chain, {}, run_id="r1")
        assert doomed.popen.wait(timeout=30) == KILLED
        rescuer = fleet.worker("rescuer")
        assert run.wait(timeout_s=30).i == 10 and client.state("r1", chain).i == 10
        assert [s.step for s in client.history("r1").steps for a in s.attempts if a.outcome == "crashed"] == ["s3"]
        assert len(client.results("r1")) == 10 and client.list_runs() and client.stats()["crashes"] == 1
        ok(cli(urls["operator"], ns, "retry", "bad"))
        assert client.run("bad", effects).wait(timeout_s=30).sent
        fleet.stop(rescuer)

        client.submit(chain, {}, run_id="c1")
        ok(cli(urls["operator"], ns, "cancel", "c1"))
        assert operator.get("c1").status == "cancelled"
        stranded = [client.submit(chain, {}, run_id=f"stranded{i}") for i in range(3)]
        for stream in client.keys.streams("default"):  # the queue is lost with three runs in it
            acl.admin.delete(stream)
        fleet.worker("late")
        assert all(r.wait(timeout_s=30).i == 10 for r in stranded)
        assert {e.detail for r in stranded for e in client.events(r.run_id) if e.type == "repaired"} == {
            "no queued entry"
        }
        scrape = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).read().decode()
        assert "orchestrator_fleet_scrape_error 0.0" in scrape and "orchestrator_fleet_live_workers 1.0" in scrape

        purged = ok(cli(urls["operator"], ns, "runs", "purge", "--status", "cancelled", "--older-than", "0"))
        assert "purged 1 runs" in purged
        fleet.stop(supervisor)
        purger = fleet.supervisor("purger", ORCHESTRATOR_RETENTION_S="0.001", ORCHESTRATOR_FAILED_RETENTION_S="0.001")
        keys, admin = client.keys, acl.admin
        wait_until(
            lambda: (
                sum(admin.zcard(p.done) + admin.zcard(p.dead) for p in keys.parts) == 0
                and not admin.exists(keys.run("r1").run)
            ),
            timeout_s=20,
            what="the supervisor purged every finished run",
        )
        for proc in fleet.procs[-2:]:
            fleet.stop(proc)
        assert purger.output().count("Traceback") == 0
    finally:
        fleet.kill_all()
        client.close()
        operator.close()
    assert acl.denials(ns) == []


class Note(BaseModel):
    text: str = ""


note = Workflow("acl_note", state=Note)


@note.step
def write(ctx: StepContext, state: Note) -> dict[str, str]:
    return {"text": f"written by {ctx.worker_id}"}


def test_the_read_only_cli_works_with_the_reader_acl_and_writes_nothing(acl: AclServer) -> None:
    ns = namespace()
    urls = acl.users(ns)
    settings = fast_settings(urls["client"], namespace=ns)
    with worker_thread([note], settings.with_url(urls["worker"])), Client(settings) as client:
        for i in range(3):
            client.submit(note, {}, run_id=f"n{i}").wait(timeout_s=10)
    with Client(settings) as client:  # and three runs waiting in the queue, unfinished
        for i in range(3):
            client.submit(note, {}, run_id=f"q{i}")
    reader = urls["reader"]
    listed = ok(cli(reader, ns, "runs", "list"))
    assert "n0" in listed and "q2" in listed and "n2" in ok(cli(reader, ns, "runs", "list", "--status", "completed"))
    assert "completed" in ok(cli(reader, ns, "status", "n1"))
    assert "write" in ok(cli(reader, ns, "history", "n1"))
    assert "acl_note" in ok(cli(reader, ns, "stats")) and "write" in ok(
        cli(reader, ns, "stats", "--workflow", "acl_note")
    )
    ok(cli(reader, ns, "top", "--iterations", "1", "-n", "0.5"))
    assert " 3 runs" in ok(cli(reader, ns, "runs", "purge", "--older-than", "0", "--dry-run"))
    assert "finished: completed" in ok(cli(reader, ns, "runs", "why", "n1"))
    assert "queued in queue default" in ok(cli(reader, ns, "runs", "why", "q2"))
    # the collector behind stats, top and /metrics, reading every unfinished run's record (ZRANGE)
    # or a sample of them (ZRANDMEMBER) past RUN_SAMPLE runs, with the reader's and the supervisor's ACL
    for role, sample in itertools.product(("reader", "supervisor"), (1, 200)):
        with connect(urls[role]) as r:
            collector = FleetCollector(r, Keys(ns), lease_ms=1000, sample=sample, memory_sample=2)
            families = {f.name: f for f in collector.collect()}
        assert families["orchestrator_fleet_scrape_error"].samples[0].value == 0, (role, sample)
        assert sum(s.value for s in families["orchestrator_fleet_runs_in_flight"].samples) == 3, (role, sample)
    assert acl.denials(ns) == []
    refused = cli(reader, ns, "cancel", "q0")
    assert refused.returncode == 1 and "lacks a permission" in refused.stderr and "Traceback" not in refused.stderr
    assert [(reason, obj) for _, reason, _, obj in acl.denials(ns)] == [("command", "evalsha")]


def test_after_a_redis_restart_each_writing_role_loads_the_scripts_it_runs(acl: AclServer) -> None:
    """A restarted (or flushed) Redis has no scripts: the first call of each is answered
    NOSCRIPT and the library loads it with SCRIPT LOAD, under the role's own ACL."""
    ns = namespace()
    urls = acl.users(ns)
    settings = fast_settings(urls["client"], namespace=ns)
    acl.admin.script_flush()
    with Client(settings) as client:
        client.submit(note, {}, run_id="a")
        client.submit(note, {}, run_id="b")
    acl.admin.script_flush()
    with Client(settings.with_url(urls["operator"])) as operator:
        assert operator.cancel("a").status == "cancelled"
    acl.admin.script_flush()
    with worker_thread([note], settings.with_url(urls["worker"])), Client(settings) as client:
        assert client.run("b", note).wait(timeout_s=10).text
    acl.admin.script_flush()
    supervisor = Supervisor(settings.with_url(urls["supervisor"]))
    try:
        supervisor.tick(sweep=True, purge=True)
    finally:
        supervisor.redis.close()
    assert acl.admin.script_exists(scripts.load("leader").sha) == [True]
    assert acl.denials(ns) == []


def test_keda_reads_lag_and_pending_of_the_queue_streams_and_nothing_else(acl: AclServer) -> None:
    ns = namespace()
    urls = acl.users(ns)
    settings = fast_settings(urls["client"], namespace=ns)
    with Client(settings) as client:
        for run_id in partition_mates(client.keys, "k", "k", 3):  # one partition: one stream
            client.submit(note, {}, run_id=run_id)
        stream = client.keys.queue_of("default", run_id).stream
        acl.admin.xgroup_create(stream, GROUP, id="0")
        partitions = client.keys.partitions
        queued = client.keys.queue_of("default", run_id).queued  # of the queue, but not a stream: not KEDA's
    for protocol in (2, 3):  # go-redis speaks RESP3 (HELLO 3 AUTH ...), redis-py RESP2 by default
        keda = redis.Redis.from_url(urls["keda"], decode_responses=True, protocol=protocol)
        assert keda.ping()
        assert int(str(keda.info("server")["redis_version"]).split(".")[0]) >= 7
        (group,) = keda.xinfo_groups(stream)
        assert group["name"] == GROUP and group["lag"] == 3
        assert keda.xlen(stream) == 3 and keda.xpending(stream, GROUP)["pending"] == 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            keda.xlen(queued)
        with pytest.raises(redis.exceptions.NoPermissionError):
            keda.xadd(stream, {"x": "1"})
        keda.close()
    # every trigger `orchestrator keda` makes for the namespace (one pair per partition stream):
    # the scaler's reads, as that trigger's mode sends them, with the groups created
    made = KedaScaling(ns, partitions, ("default",), ("127.0.0.1:6379",))
    for other in set(made.streams()) - {stream}:
        acl.admin.xgroup_create(other, GROUP, id="0", mkstream=True)
    keda = redis.Redis.from_url(urls["keda"], decode_responses=True, protocol=3)
    lags = 0
    for trigger in made.triggers():
        meta = trigger["metadata"]
        if "lagCount" in meta:
            assert int(str(keda.info("server")["redis_version"]).split(".")[0]) >= 7
            (group,) = keda.xinfo_groups(meta["stream"])
            lags += group["lag"]
        else:
            assert keda.xpending(meta["stream"], meta["consumerGroup"])["pending"] == 0
    keda.close()
    assert lags == 3
    assert {(reason, obj) for _, reason, _, obj in acl.denials(ns)} == {("key", queued), ("command", "xadd")}


def test_keda_through_the_default_user_with_a_password_only(tmp_path: Path) -> None:
    """For a KEDA that cannot send a user name: the doc's ``default`` line, on a server of its own
    (every connection without a user name then gets KEDA's rights, and no more)."""
    server = AclServer(tmp_path / "redis")
    try:
        if server.version < (7, 0):
            pytest.skip(f"{server.server.binary} is Redis {server.version}: the ACL lines use Redis 7 selectors")
        ns = namespace()
        server.admin.execute_command("ACL", "SETUSER", "admin", "on", ">admin-pw", "~*", "&*", "+@all")
        admin = redis.Redis(port=server.server.port, username="admin", password="admin-pw", decode_responses=True)
        stream = Keys(ns).queue("default", 0).stream
        admin.xgroup_create(stream, GROUP, id="0", mkstream=True)
        admin.xadd(stream, {"run": "r", "wf": "w", "step": "s", "visit": "1"})
        admin.execute_command("ACL", "SETUSER", "default", *server.rules(doc_lines()["default"], ns, "keda-pw"))
        keda = redis.Redis(port=server.server.port, password="keda-pw", decode_responses=True)
        assert keda.xinfo_groups(stream)[0]["lag"] == 1 and keda.xpending(stream, GROUP)["pending"] == 0
        with pytest.raises(redis.exceptions.NoPermissionError):
            keda.xadd(stream, {"x": "1"})
        keda.close()
        admin.close()
    finally:
        server.server.kill()


def test_every_roles_connections_survive_redis_pys_health_check(acl: AclServer) -> None:
    """A connection idle for 15 s sends PING before its next command (health_check_interval):
    without +ping a worker would fail after its first quiet spell, which no short test sees."""
    ns = namespace()
    urls = acl.users(ns)
    for url in urls.values():
        client = connect(url)
        connection = client.connection_pool.get_connection()
        connection.next_health_check = -1  # due now
        connection.check_health()
        client.connection_pool.release(connection)
        client.close()

    async def async_check() -> None:
        for url in urls.values():
            client = connect_async(url)
            connection = await client.connection_pool.get_connection()
            connection.next_health_check = -1
            await connection.check_health()
            await client.connection_pool.release(connection)
            await client.aclose()

    asyncio.run(async_check())
    assert acl.denials(ns) == []


def test_a_user_of_another_namespace_is_refused_with_a_clear_error(acl: AclServer, tmp_path: Path) -> None:
    ours, theirs = namespace(), namespace()
    mine = acl.users(ours)
    other = acl.users(theirs)
    settings = fast_settings(mine["client"], namespace=ours)
    with worker_thread([note], settings.with_url(mine["worker"])), Client(settings) as client:
        client.submit(note, {}, run_id="ours").wait(timeout_s=10)
    intruder = Client(settings.with_url(other["client"]))  # their user, our namespace
    for attempt in (lambda: intruder.submit(note, {}, run_id="x"), lambda: intruder.get("ours")):
        with pytest.raises(RedisRefused) as refused:
            attempt()
        message = refused.value.message
        assert "lacks a permission" in message and "no permissions to access" in message.lower(), message
        assert "docs/security.md" in message and f"redis://{theirs}-client:***@" in message
    intruder.close()
    result = cli(other["reader"], ours, "status", "ours")
    assert result.returncode == 1 and "lacks a permission" in result.stderr and "Traceback" not in result.stderr
    worker = start_worker(settings.with_url(other["worker"]), tmp_path, name="intruder", ledger_url=acl.admin_url)
    try:
        wait_until(lambda: "lacks a permission" in worker.output(), timeout_s=20, what="the worker says it is refused")
        assert worker.alive() and "Traceback" not in worker.output()
    finally:
        worker.kill()
    assert {reason for _, reason, _, _ in acl.denials(theirs)} == {"key"}, (
        "their commands are allowed, our keys are not"
    )
    assert acl.denials(ours) == []
    with Client(settings) as client:
        assert client.get("ours").status == "completed" and client.list_runs() != []


def test_a_command_missing_inside_a_script_is_reported_as_a_permission_problem(acl: AclServer) -> None:
    """Redis checks the commands a script calls against the caller's ACL; a line without XADD
    lets the client call submit.lua, which then fails inside. The error says so."""
    ns = namespace()
    lines = doc_lines()
    lines["orch-client"] = [r for r in lines["orch-client"] if r != "+xadd"]
    urls = acl.users(ns, lines=lines)
    with Client(fast_settings(urls["client"], namespace=ns)) as client, pytest.raises(RedisRefused) as refused:
        client.submit(note, {}, run_id="x")
    assert "lacks a permission" in refused.value.message, refused.value.message
    assert [(reason, context, obj) for _, reason, context, obj in acl.denials(ns)] == [("command", "lua", "xadd")]
