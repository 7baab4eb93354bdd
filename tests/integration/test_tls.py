"""TLS: workers, supervisors, clients and the CLI on a redis-server that speaks TLS only.

Certificates are made by openssl at test time (a CA, a server certificate for 127.0.0.1 and
localhost, a client certificate); the servers run with ``--port 0 --tls-port P``. What the TLS
options are and what they protect is in docs/security.md.
"""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from orchestrator import Client, ConfigError, RedisRefused, RedisUnavailable, StepContext, Workflow
from orchestrator.connection import connect, redact_url
from orchestrator.settings import Settings
from tests.conftest import fast_settings
from tests.harness import REPO, run_cli, start_supervisor, start_worker, worker_thread
from tests.helpers import wait_until
from tests.secure_redis import KEY_PASSWORD, Certs, TlsProcess, tls_server, tls_url
from workers.testflows import chain

KILLED = -signal.SIGKILL


@pytest.fixture
def tls_only(tmp_path: Path, certs: Certs, tls_redis_server: str) -> Iterator[TlsProcess]:
    """TLS only, no client certificate asked for."""
    server = tls_server(tmp_path / "redis", certs, tls_redis_server).start()
    yield server
    server.kill()


@pytest.fixture
def mutual(tmp_path: Path, certs: Certs, tls_redis_server: str) -> Iterator[TlsProcess]:
    """TLS only, and every client must show a certificate our CA signed (--tls-auth-clients yes)."""
    server = tls_server(tmp_path / "redis", certs, tls_redis_server, auth_clients="yes").start()
    yield server
    server.kill()


def cli(url: str, *args: str, namespace: str = "orch") -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "ORCHESTRATOR_REDIS_URL": url}
    env["ORCHESTRATOR_NAMESPACE"] = namespace
    return run_cli(*args, env=env)


hello = Workflow("tls_hello")


@hello.step
async def greet(ctx: StepContext, state: Any) -> dict[str, str]:
    return {"greeting": f"hello from {ctx.worker_id}"}


def test_a_worker_a_supervisor_and_a_client_run_a_workflow_over_tls_only(
    tls_only: TlsProcess, certs: Certs, tmp_path: Path
) -> None:
    """A worker killed mid-step over TLS: the supervisor (also over TLS) hands its step to another
    worker and the run completes. The server has no plain port at all."""
    with tls_only.client() as admin:
        assert admin.config_get("port") == {"port": "0"}
    url = tls_url(tls_only.port, certs)
    settings = fast_settings(url, concurrency=4)
    procs = [start_supervisor(settings, tmp_path)]
    try:
        procs.append(start_worker(settings, tmp_path, name="doomed", faults="mid_step=kill@s3"))
        with Client(settings) as client:
            run = client.submit(chain, {}, run_id="tls1")
            assert procs[-1].popen.wait(timeout=30) == KILLED
            procs.append(start_worker(settings, tmp_path, name="rescuer"))
            assert run.wait(timeout_s=30).i == 10
            crashed = [s.step for s in client.history("tls1").steps for a in s.attempts if a.outcome == "crashed"]
            assert crashed == ["s3"]
        rescuer = procs[-1]
        rescuer.signal(signal.SIGTERM)
        assert rescuer.wait() == 0, rescuer.output()[-2000:]
    finally:
        for proc in procs:
            proc.kill()
    for proc in procs:  # the URL shows its CA path; nothing secret to hide, and no traceback
        assert "Traceback" not in proc.output()
        assert f"ssl_ca_certs={certs.ca}" in proc.output()


def test_mutual_tls_runs_with_the_client_certificate_and_refuses_a_client_without_one(
    mutual: TlsProcess, certs: Certs
) -> None:
    with_cert = fast_settings(tls_url(mutual.port, certs, client_cert=True))
    with worker_thread([hello], with_cert) as worker, Client(with_cert) as client:  # asyncio worker, sync client
        assert client.submit(hello, {}, run_id="m1").wait(timeout_s=10) == {"greeting": f"hello from {worker.id}"}
    # TLS 1.3: the server's "certificate required" alert comes after the client's handshake is
    # done, so the client sees that alert (refused) or the closed connection (an EOF): either
    # way the message says what to give
    without = with_cert.with_url(tls_url(mutual.port, certs))
    with Client(without) as client, pytest.raises((RedisRefused, RedisUnavailable)) as refused:
        client.get("m1")
    assert "ssl_certfile and ssl_keyfile" in refused.value.message, refused.value.message
    result = cli(without.plain_url(), "status", "m1", namespace=without.namespace)
    assert result.returncode == 1 and "ssl_certfile and ssl_keyfile" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_client_that_trusts_another_ca_is_refused_with_a_clear_error(tls_only: TlsProcess, certs: Certs) -> None:
    settings = fast_settings(tls_url(tls_only.port, certs, ca=certs.other_ca))
    started = time.monotonic()
    with Client(settings) as client, pytest.raises(RedisRefused) as refused:
        client.submit(hello, {}, run_id="x")
    assert time.monotonic() - started < 2, "a refused handshake is not retried (6 retries take ~3 s)"
    message = refused.value.message
    assert "refused the TLS connection" in message and "CERTIFICATE_VERIFY_FAILED" in message
    assert "check ssl_ca_certs" in message
    result = cli(settings.plain_url(), "runs", "list", namespace=settings.namespace)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "refused the TLS connection" in result.stderr and "Traceback" not in result.stderr
    # no CA given: the system's trusted CAs, which did not sign our test server either
    with Client(settings.with_url(f"rediss://127.0.0.1:{tls_only.port}/0")) as client, pytest.raises(RedisRefused):
        client.stats()


def test_the_host_name_is_checked_unless_turned_off(
    tmp_path: Path, certs: Certs, tls_redis_server: str, tls_only: TlsProcess
) -> None:
    """A certificate for another host is refused even though our CA signed it; the check can be
    turned off (the CA is still checked), or verification as a whole (ssl_cert_reqs=none)."""
    elsewhere = tls_server(
        tmp_path / "elsewhere", certs, tls_redis_server, cert=certs.elsewhere, key=certs.elsewhere_key
    )
    elsewhere.start()
    try:
        settings = fast_settings(tls_url(elsewhere.port, certs))
        with Client(settings) as client, pytest.raises(RedisRefused) as refused:
            client.stats()
        assert "mismatch" in refused.value.message and "ssl_check_hostname=false" in refused.value.message
        for options in ({"ssl_check_hostname": "false"}, {"ssl_cert_reqs": "none"}):
            with Client(settings.with_url(tls_url(elsewhere.port, certs, **options))) as client:
                assert client.stats() == {}
    finally:
        elsewhere.kill()
    # by name: the server's certificate names localhost too
    with Client(fast_settings(tls_url(tls_only.port, certs, host="localhost"))) as client:
        assert client.stats() == {}


def test_an_encrypted_client_key_works_and_its_password_never_shows(mutual: TlsProcess, certs: Certs) -> None:
    """``ssl_password`` unlocks an encrypted key; like the URL's own password it is masked in
    every message, the key's path is not (a path is not a secret)."""
    auth = "app:S3cret-Redis-pw@"
    url = tls_url(
        mutual.port,
        certs,
        auth=auth,
        client_cert=True,
        ssl_keyfile=str(certs.client_key_encrypted),
        ssl_password=KEY_PASSWORD,
    )
    shown = redact_url(url)
    assert KEY_PASSWORD not in shown and "S3cret-Redis-pw" not in shown
    assert f"ssl_keyfile={certs.client_key_encrypted}" in shown and "ssl_password=***" in shown
    with mutual.client() as admin:
        admin.acl_setuser("app", enabled=True, passwords=["+S3cret-Redis-pw"], keys=["*"], commands=["+@all"])
    settings = fast_settings(url)
    with worker_thread([hello], settings), Client(settings) as client:
        assert client.submit(hello, {}, run_id="k1").wait(timeout_s=10)
    result = cli(url, "status", "k1", namespace=settings.namespace)
    assert result.returncode == 0, result.stderr
    wrong = url.replace(KEY_PASSWORD, "not-the-key-password")
    for output in (cli(wrong, "status", "k1"), cli(url.replace("ssl_password", "ssl_pasword"), "status", "k1")):
        assert output.returncode in (1, 2), output.stdout + output.stderr
        text = output.stdout + output.stderr
        assert "not-the-key-password" not in text and KEY_PASSWORD not in text and "S3cret-Redis-pw" not in text
        assert "Traceback" not in text


def test_tls_options_are_checked_before_anything_connects(certs: Certs, tmp_path: Path) -> None:
    base = f"rediss://127.0.0.1:6380/0?ssl_ca_certs={certs.ca}"
    refused = {
        f"{base}&ssl_ca_cert=/x": "unknown TLS option 'ssl_ca_cert'",
        f"{base}&ssl_cert_reqs=sometimes": "ssl_cert_reqs 'sometimes' is invalid",
        f"{base}&ssl_check_hostname=maybe": "ssl_check_hostname 'maybe' is invalid",
        f"redis://127.0.0.1:6379/0?ssl_ca_certs={certs.ca}": "use rediss://",
        f"redis+sentinel://127.0.0.1:26379/primary/0?ssl_ca_certs={certs.ca}": "use rediss+sentinel://",
        "rediss://127.0.0.1:6380/0?ssl=true": "unknown TLS option 'ssl'",
    }
    for url, expected in refused.items():
        with pytest.raises(ConfigError) as error:
            Settings(redis_url=url)
        assert expected in error.value.message, url
    missing = tmp_path / "nowhere" / "ca.crt"
    with pytest.raises(ConfigError) as error:
        connect(f"rediss://127.0.0.1:6380/0?ssl_ca_certs={missing}")
    assert f"ssl_ca_certs '{missing}' is not a readable file" in error.value.message
    assert Settings(redis_url=f"{base}&ssl_cert_reqs=REQUIRED&ssl_check_hostname=false").redis_url
    # the files are read where the process runs: settings take a path that is not here (a pod's)
    assert Settings(redis_url="rediss://redis:6380/0?ssl_ca_certs=/etc/orchestrator/redis-tls/ca.crt").redis_url


def test_plain_redis_url_on_a_tls_port_fails_without_a_traceback(tls_only: TlsProcess) -> None:
    result = cli(f"redis://127.0.0.1:{tls_only.port}/0", "runs", "list", namespace=f"n{uuid.uuid4().hex[:6]}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"redis://127.0.0.1:{tls_only.port}/0" in result.stderr
    assert "if the server speaks only TLS, use a rediss:// URL" in result.stderr


def test_tls_server_refuses_plain_clients(tls_only: TlsProcess) -> None:
    plain = redis.Redis(port=tls_only.port, socket_connect_timeout=1, socket_timeout=2)
    with pytest.raises(redis.ConnectionError):
        plain.ping()
    plain.close()
    wait_until(lambda: tls_only.client().ping(), what="the server still answers TLS clients")
