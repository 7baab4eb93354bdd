"""The compose services run as plain local processes: the worker's and supervisors' commands and
environment from deploy/compose.yaml (Redis URL, metrics port and key namespace swapped for
local ones), the healthchecks and probes against them, Redis' flags against real redis-server
binaries, and KEDA's lag signal against the real stream of a real worker."""

from __future__ import annotations

import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import Client
from orchestrator.demo.agent import research
from orchestrator.embedded import RedisServer, find_redis_server, free_port
from orchestrator.keys import GROUP, Keys
from orchestrator.settings import Settings
from tests.deploy.manifests import (
    REPO,
    RULES,
    clean_environ,
    compose,
    interpolate,
    k8s_find,
    keda_lag,
    keda_replicas,
    orchestrator_keda,
    redis_7_binary,
    redis_version,
    service_env,
    shared_option,
)
from tests.deploy.test_k8s import readme_block
from tests.helpers import wait_until

STACK = ("worker", "supervisor", "supervisor")  # the compose supervisor service has two replicas


@dataclass
class Service:
    """One compose service replica running as a local process."""

    name: str
    env: dict[str, str]
    log: Path
    popen: subprocess.Popen[bytes] = field(init=False)

    def start(self, workdir: Path) -> Service:
        command = compose()["services"][self.name]["command"]
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "orchestrator", *command],
                env=self.env,
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def port(self) -> int:
        return int(self.env["ORCHESTRATOR_METRICS_PORT"])

    def get(self, path: str = "/metrics") -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
            assert response.status == 200
            body: str = response.read().decode()
            return body

    def serving(self) -> bool:
        assert self.popen.poll() is None, f"{self.name} exited {self.popen.returncode}: {self.output()}"
        try:
            self.get()
        except (urllib.error.URLError, ConnectionError):
            return False
        return True

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self, timeout_s: float = 30) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout_s)


def service(name: str, redis_url: str, namespace: str, tmp: Path, index: int = 0) -> Service:
    """The environment compose gives ``name``, with the three local substitutions."""
    env = clean_environ()
    env.update(service_env(compose()["services"][name]))
    env.update(
        REDIS_URL=redis_url,  # compose's redis://redis:6379/0 names a host that exists only there
        ORCHESTRATOR_NAMESPACE=namespace,
        ORCHESTRATOR_METRICS_PORT=str(free_port()),
        ORCHESTRATOR_DEMO_DB=str(tmp / "demo-world.sqlite3"),  # the demo agent's "outside world"
        PYTHONPATH=str(REPO),  # the image installs the package; here it is the repository's
    )
    return Service(name, env, tmp / f"{name}-{index}.log")


def start_stack(redis_url: str, namespace: str, tmp: Path) -> list[Service]:
    workdir = tmp / "work"  # like the image's WORKDIR: not the repository
    workdir.mkdir(exist_ok=True)
    return [service(name, redis_url, namespace, tmp, i).start(workdir) for i, name in enumerate(STACK)]


def registered(r: redis.Redis, namespace: str, worker: Service) -> bool:
    members: list[str] = r.zrange(Keys(namespace).workers, 0, -1)  # type: ignore[assignment]
    return any(f"-{worker.popen.pid}-" in m for m in members)


@dataclass
class Stack:
    namespace: str
    worker: Service
    supervisors: list[Service]
    r: redis.Redis


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    namespace = f"deploy{uuid.uuid4().hex[:8]}"
    tmp = tmp_path_factory.mktemp("stack")
    services = start_stack(redis_server.url, namespace, tmp)
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for s in services:
            wait_until(s.serving, timeout_s=20, what=f"{s.name} serving /metrics")
        wait_until(lambda: registered(r, namespace, services[0]), timeout_s=10, what="worker in the fleet")
        yield Stack(namespace, services[0], services[1:], r)
    finally:
        for s in services:
            if s.popen.poll() is None:
                s.popen.kill()
                s.popen.wait()
        r.close()


def test_the_worker_registers_and_one_of_the_two_supervisors_leads(stack: Stack) -> None:
    assert registered(stack.r, stack.namespace, stack.worker)
    leader = wait_until(lambda: stack.r.get(Keys(stack.namespace).leader), timeout_s=10, what="a leader")
    leaders = [s for s in stack.supervisors if f"-{s.popen.pid}-" in leader]
    assert len(leaders) == 1, f"leader {leader!r} is not one of the supervisor processes"
    for supervisor in stack.supervisors:  # both serve the fleet's numbers, read from the same Redis
        body = supervisor.get()
        assert re.search(r"^orchestrator_fleet_live_workers 1\.0$", body, re.M), body[:500]
        assert re.search(r"^orchestrator_fleet_scrape_error 0\.0$", body, re.M)
    assert "orchestrator_worker_info" in stack.worker.get()


def test_the_compose_healthchecks_pass_against_the_processes_and_fail_without_them(stack: Stack) -> None:
    for s in (stack.worker, stack.supervisors[0]):
        kind, program, *args = compose()["services"][s.name]["healthcheck"]["test"]
        assert kind == "CMD" and program == "python"
        ok = subprocess.run([sys.executable, *args], env=s.env, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr.decode()
        nobody = {**s.env, "ORCHESTRATOR_METRICS_PORT": str(free_port())}
        assert subprocess.run([sys.executable, *args], env=nobody, capture_output=True, timeout=30).returncode != 0


def test_the_kubernetes_probes_answer_and_the_supervisors_read_nothing_from_redis(stack: Stack) -> None:
    for deployment, s in (("orchestrator-worker", stack.worker), ("orchestrator-supervisor", stack.supervisors[0])):
        c = k8s_find("Deployment", deployment)["spec"]["template"]["spec"]["containers"][0]
        for probe in ("readinessProbe", "livenessProbe"):
            assert s.get(c[probe]["httpGet"]["path"]), f"{deployment} {probe}: empty answer"
    path = c["livenessProbe"]["httpGet"]["path"]
    probed = stack.supervisors[0].get(path)
    assert "orchestrator_detection_latency_seconds_count" in probed
    # the fleet collector (which reads Redis) always yields orchestrator_fleet_scrape_error
    assert "orchestrator_fleet_" not in probed and "orchestrator_fleet_scrape_error" in stack.supervisors[0].get()


def exposed_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_metric_the_rules_and_alerts_use_is_served(stack: Stack) -> None:
    # metric names, not the recording rules' own names (level:metric:operations)
    text = re.sub(r"\b\w+:\w+:\w+\b", " ", RULES.read_text())
    used = set(re.findall(r"\b(orchestrator_[a-z0-9_]+)", text))
    assert len(used) >= 6, used
    served = exposed_names(stack.supervisors[0].get()) | exposed_names(stack.worker.get())
    assert used - served == set(), "rules.yml queries metrics nobody serves"


def test_promtool_finds_no_problem_in_the_served_metrics(stack: Stack) -> None:
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (Debian package `prometheus`)")
    for s in (stack.worker, stack.supervisors[0]):
        check = subprocess.run([promtool, "check", "metrics"], input=s.get(), capture_output=True, text=True)
        assert check.returncode == 0, f"{s.name}: {check.stdout}{check.stderr}"


def test_sigterm_stops_workers_and_supervisors_with_exit_0(redis_server: RedisServer, tmp_path: Path) -> None:
    namespace = f"deploy{uuid.uuid4().hex[:8]}"
    services = start_stack(redis_server.url, namespace, tmp_path)
    r = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        for s in services:
            wait_until(s.serving, timeout_s=20, what=f"{s.name} serving /metrics")
        wait_until(lambda: registered(r, namespace, services[0]), timeout_s=10, what="worker in the fleet")
        wait_until(lambda: r.get(Keys(namespace).leader), timeout_s=10, what="a leader")
        codes = [s.stop() for s in services]
        assert codes == [0, 0, 0], "\n".join(s.output() for s in services)
        assert r.zcard(Keys(namespace).workers) == 0, "a stopped worker leaves the fleet"
        assert r.get(Keys(namespace).leader) is None, "a stopped supervisor gives up the lead"
    finally:
        for s in services:
            if s.popen.poll() is None:
                s.popen.kill()
                s.popen.wait()
        r.close()


def run_redis_with_compose_flags(binary: str, tmp: Path) -> None:
    """redis-server with the compose service's command line (plus a local port and folder) and its
    config file as compose writes it (with a password for REDIS_PASSWORD): it requires the password,
    keeps the flags, and the compose healthcheck passes against it."""
    service = compose()["services"]["redis"]
    (mount,) = service["configs"]
    password = uuid.uuid4().hex
    config = tmp / "auth.conf"
    config.write_text(interpolate(compose()["configs"][mount["source"]]["content"], {"REDIS_PASSWORD": password}))
    command = [str(config) if arg == mount["target"] else arg for arg in service["command"]]
    port = free_port()
    argv = [binary, *command[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp)]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port, password=password, decode_responses=True, socket_connect_timeout=0.5)
    anonymous = redis.Redis(port=port, decode_responses=True, socket_connect_timeout=0.5)
    try:

        def ready() -> bool:
            assert process.poll() is None, f"{binary} refused the flags: {process.stdout.read()!r}"  # type: ignore[union-attr]
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(ready, timeout_s=10, what=f"{binary} answering")
        with pytest.raises(redis.AuthenticationError):  # NOAUTH: nothing without the password
            anonymous.get("k")
        config_values = {
            k: v
            for item in ("appendonly", "appendfsync", "maxmemory-policy")
            for k, v in client.config_get(item).items()
        }
        assert config_values == {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
        client.set("k", "v")
        assert (tmp / "appendonlydir").exists() or (tmp / "appendonly.aof").exists(), "no AOF written"
        kind, shell = service["healthcheck"]["test"]
        assert kind == "CMD-SHELL" and shutil.which("redis-cli") and shutil.which("sed")
        shell = interpolate(shell).replace(mount["target"], str(config)).replace("redis-cli", f"redis-cli -p {port}")
        assert subprocess.run(["sh", "-c", shell], timeout=10).returncode == 0, shell
        config.write_text("requirepass wrong\n")  # and it fails with the wrong password
        assert subprocess.run(["sh", "-c", shell], timeout=10, capture_output=True).returncode != 0, shell
    finally:
        client.close()
        anonymous.close()
        process.terminate()
        process.wait(timeout=10)
        process.stdout.close()  # type: ignore[union-attr]


def test_the_redis_flags_work_with_the_redis_server_orchestrator_uses(tmp_path: Path) -> None:
    run_redis_with_compose_flags(find_redis_server(), tmp_path)


def test_the_redis_flags_work_with_redis_7(tmp_path: Path) -> None:
    binary = redis_7_binary()
    if not binary:
        pytest.skip("no Redis 7 redis-server here (Debian: apt-get install redis-server)")
    assert redis_version(binary) >= (7,)
    run_redis_with_compose_flags(binary, tmp_path)


def keda_values(r: redis.Redis, triggers: list[dict[str, Any]], streams: dict[str, str]) -> dict[str, int]:
    """Every trigger's value as KEDA's redis-streams scaler reads it: a lag trigger (a non-zero
    lagCount) the `lag` of its group in XINFO GROUPS (NULL: -1, as go-redis gives it), a pending
    trigger the count of XPENDING. ``streams`` maps the manifest's streams to this test's."""
    values = {}
    for trigger in triggers:
        meta = trigger["metadata"]
        stream = streams[meta["stream"]]
        if int(meta.get("lagCount", "0")):
            (group,) = [g for g in r.xinfo_groups(stream) if g["name"] == meta["consumerGroup"]]
            values[trigger["name"]] = keda_lag(group["lag"])
        else:
            values[trigger["name"]] = int(r.xpending(stream, meta["consumerGroup"])["pending"])
    return values


def readme_groups_command() -> str:
    (line,) = [line for line in readme_block("orchestrator keda").splitlines() if "--print groups" in line]
    return line


def readme_python_groups() -> str:
    """The Python the README feeds a supervisor pod to create the groups without redis-cli."""
    block = readme_block("kubectl -n orchestrator exec -i deploy/orchestrator-supervisor -- python -")
    return block.split("<<'EOF'\n", 1)[1].rsplit("EOF", 1)[0]


def test_keda_formula_wakes_keeps_and_releases_workers_on_the_real_streams(tmp_path: Path) -> None:
    """With zero workers only the lags of the consumer groups show queued work (the pending lists
    are empty): the groups created as deploy/README.md says, runs submitted into several
    partitions, then the compose worker started and drained; at each stage every trigger of
    keda.yaml read as KEDA reads it and combined by its formula into the replicas KEDA wants."""
    binary = redis_7_binary()
    if not binary:
        pytest.skip("XINFO GROUPS reports the lag from Redis 7 on; no Redis 7 redis-server here")
    redis_cli = shutil.which("redis-cli", path=str(Path(binary).parent)) or shutil.which("redis-cli")
    spec = k8s_find("ScaledObject", "orchestrator-worker")["spec"]
    line = readme_groups_command()
    partitions = int(shared_option(line, "--partitions"))
    manifest_streams = Keys(shared_option(line, "--namespace"), partitions).streams("default")
    assert {t["metadata"]["stream"] for t in spec["triggers"]} == set(manifest_streams)
    with RedisServer(tmp_path / "redis", appendfsync=None, binary=binary) as server:
        namespace = f"deploy{uuid.uuid4().hex[:8]}"  # the same keys, in a namespace of this test
        keys = Keys(namespace, partitions)
        streams = dict(zip(manifest_streams, keys.streams("default"), strict=True))
        r = redis.Redis.from_url(server.url, decode_responses=True)
        client = Client(Settings(redis_url=server.url, namespace=namespace, partitions=partitions))

        def replicas() -> int:
            return keda_replicas(spec, keda_values(r, spec["triggers"], streams))

        lags = {t["name"] for t in spec["triggers"] if int(t["metadata"].get("lagCount", "0"))}

        def totals() -> tuple[int, int]:
            """The lags and the pending counts, each summed over the partitions."""
            values = keda_values(r, spec["triggers"], streams)
            lag = sum(v for name, v in values.items() if name in lags)
            return lag, sum(values.values()) - lag

        try:
            # the README's command, for this namespace
            command = line.partition(" | ")[0].replace("--namespace orch", f"--namespace {namespace}")
            groups, _ = orchestrator_keda(command)
            if redis_cli:
                out = subprocess.run(
                    [redis_cli, "-u", server.url], input=groups, capture_output=True, text=True, timeout=30
                )
                assert out.returncode == 0 and "ERR" not in out.stdout, out.stdout + out.stderr
            else:  # the same commands, as redis-cli would send them
                for command_line in groups.splitlines():
                    r.execute_command(*shlex.split(command_line))
            for stream in keys.streams("default"):
                assert [g["name"] for g in r.xinfo_groups(stream)] == [GROUP]
            assert totals() == (0, 0) and replicas() == 0, "idle: zero workers is right"

            # three runs, each in a partition of its own
            run_ids: dict[int, str] = {}
            for i in range(200):
                run_ids.setdefault(keys.partition_of(f"keda-{i}"), f"keda-{i}")
            chosen = list(run_ids.values())[:3]
            for run_id, company in zip(chosen, ("Initech", "Globex", "Hooli"), strict=True):
                client.submit(research, {"company": company, "how_many": 1}, run_id=run_id)
            assert totals() == (3, 0)
            assert replicas() == 1, "the lags wake one worker (pending alone never would: it is 0)"

            worker = service("worker", server.url, namespace, tmp_path)
            worker.env["ORCHESTRATOR_PARTITIONS"] = str(partitions)
            (tmp_path / "work").mkdir()
            worker.start(tmp_path / "work")
            try:
                wait_until(lambda: totals() == (0, 3), timeout_s=20, what="all three steps claimed")
                assert replicas() == 1, "the steps in flight keep the worker"
                assert worker.stop() == 0, worker.output()
            finally:
                if worker.popen.poll() is None:
                    worker.popen.kill()
            # drained: every run's next step is queued (visible as lag) or waits out a retry
            # backoff in its partition's delayed set, which the supervisors move to the stream when due
            values = keda_values(r, spec["triggers"], streams)
            assert min(values.values()) >= 0, "Redis could tell every lag"
            lag, pending = totals()
            delayed = sum(int(r.zcard(keys.queue("default", p).delayed)) for p in range(partitions))
            assert pending == 0 and lag + delayed == 3, (lag, pending, delayed)
            assert replicas() == (1 if lag else 0)
        finally:
            client.close()
            r.close()


def test_the_readme_python_creates_every_group_keda_reads(tmp_path: Path) -> None:
    """The README's way without redis-cli: its Python, run with a supervisor pod's settings."""
    with RedisServer(tmp_path / "redis", appendfsync=None) as server:
        namespace = f"deploy{uuid.uuid4().hex[:8]}"
        env = service("supervisor", server.url, namespace, tmp_path).env
        r = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            for _ in range(2):  # again: BUSYGROUP is fine
                done = subprocess.run(
                    [sys.executable, "-"], input=readme_python_groups(), env=env, capture_output=True, text=True
                )
                assert done.returncode == 0, done.stderr
            partitions = int(env.get("ORCHESTRATOR_PARTITIONS", "16"))
            for stream in Keys(namespace, partitions).streams("default"):
                assert [(g["name"], g["last-delivered-id"]) for g in r.xinfo_groups(stream)] == [(GROUP, "0-0")]
        finally:
            r.close()
