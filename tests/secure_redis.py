"""Redis servers with TLS for tests: certificates made by openssl at test time, command lines built here.

:class:`orchestrator.embedded.RedisServer` starts plain servers; the TLS servers, replicas and
sentinels here build their own redis-server command line (TLS only: ``--port 0``). The binary
must be built with TLS, as Debian's redis-server is; :func:`tls_binary` finds one or skips the
test with a reason that names every binary it tried. The session fixtures :func:`certs` and
:func:`tls_redis_server` reach the integration tests through tests/integration/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import urlencode

import pytest
import redis

from orchestrator.embedded import find_redis_server, free_port, server_version
from orchestrator.errors import ConfigError
from orchestrator.processes import die_with_parent

KEY_PASSWORD = "k3y-Passw0rd-for-tests"  # of the encrypted client key: must never show in output


@dataclass(frozen=True)
class Certs:
    """A CA, a server certificate it signed for 127.0.0.1 and localhost, a client certificate
    (its key also encrypted with :data:`KEY_PASSWORD`), a server certificate for another host
    only, and a second CA that signed none of them."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def other_ca(self) -> Path:
        return self.folder / "other-ca.crt"

    @property
    def server(self) -> Path:
        return self.folder / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.folder / "server.key"

    @property
    def client(self) -> Path:
        return self.folder / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.folder / "client.key"

    @property
    def client_key_encrypted(self) -> Path:
        return self.folder / "client-encrypted.key"

    @property
    def elsewhere(self) -> Path:
        return self.folder / "elsewhere.crt"

    @property
    def elsewhere_key(self) -> Path:
        return self.folder / "elsewhere.key"


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _signed(folder: Path, name: str, subject: str, extensions: str) -> None:
    """``name.crt`` and ``name.key``, signed by ca.crt, with these X.509 extensions."""
    (folder / f"{name}.ext").write_text(extensions)
    _openssl(folder, *f"req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr".split(), "-subj", subject)
    sign = f"x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {name}.crt -days 2"
    _openssl(folder, *sign.split(), "-extfile", f"{name}.ext")


def make_certs(folder: Path) -> Certs:
    """Every certificate of :class:`Certs`, written into ``folder`` by the openssl command line."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed: the TLS tests make their certificates with it")
    folder.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        new_ca = f"req -x509 -newkey rsa:2048 -nodes -keyout {ca}.key -out {ca}.crt -days 2"
        _openssl(folder, *new_ca.split(), "-subj", f"/CN=orchestrator test {ca}")
    both = "extendedKeyUsage=serverAuth,clientAuth\n"  # redis-server uses its certificate both ways
    _signed(folder, "server", "/CN=localhost", f"subjectAltName=IP:127.0.0.1,DNS:localhost\n{both}")
    _signed(folder, "client", "/CN=orchestrator-client", "extendedKeyUsage=clientAuth\n")
    _signed(folder, "elsewhere", "/CN=redis.elsewhere.invalid", f"subjectAltName=DNS:redis.elsewhere.invalid\n{both}")
    encrypt = "pkey -in client.key -aes256 -out client-encrypted.key -passout"
    _openssl(folder, *encrypt.split(), f"pass:{KEY_PASSWORD}")
    for path in folder.glob("*.key"):
        path.chmod(0o600)
    return Certs(folder)


def tls_url(
    port: int,
    certs: Certs,
    *,
    scheme: str = "rediss",
    host: str = "127.0.0.1",
    path: str = "/0",
    auth: str = "",
    ca: Path | None = None,
    client_cert: bool = False,
    **options: str,
) -> str:
    """A URL of ``scheme`` with the TLS options as query parameters: our CA (or ``ca``), and with
    ``client_cert`` the client certificate and key."""
    query: dict[str, str] = {"ssl_ca_certs": str(ca or certs.ca)}
    if client_cert:
        query.update(ssl_certfile=str(certs.client), ssl_keyfile=str(certs.client_key))
    query.update(options)
    return f"{scheme}://{auth}{host}:{port}{path}?{urlencode(query, safe='/')}"


def _tls_options(port: int, certs: Certs, auth_clients: str, cert: Path, key: Path) -> list[str]:
    """TLS only (no plain port), also towards the servers it replicates from or monitors."""
    files = ["--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(certs.ca)]
    modes = ["--tls-replication", "yes", "--tls-auth-clients", auth_clients]
    return ["--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1", *files, *modes]


class TlsProcess:
    """A redis-server (or sentinel) process that speaks TLS only, answering on 127.0.0.1:``port``."""

    def __init__(self, folder: Path, argv: list[str], port: int, certs: Certs) -> None:
        self.folder, self.argv, self.port, self.certs = folder, argv, port, certs
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 10.0) -> TlsProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "redis.log"
        argv, quiet = [*self.argv, "--logfile", str(log)], subprocess.DEVNULL
        self.process = subprocess.Popen(argv, stdout=quiet, stderr=quiet, preexec_fn=die_with_parent())
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ConfigError(f"{self.argv[0]} exited with {self.process.returncode}: {self.log()[-1500:]}")
            try:
                with self.client() as probe:
                    probe.ping()
                return self
            except redis.RedisError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise ConfigError(
                        f"{self.argv[0]} on TLS port {self.port} did not answer: {self.log()[-1500:]}"
                    ) from None
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        """A plain redis-py client over TLS with our CA and the client certificate, for setup (the
        certificate is checked against the CA, not against the host: a server may have another's)."""
        files = {"ssl_ca_certs": self.certs.ca, "ssl_certfile": self.certs.client, "ssl_keyfile": self.certs.client_key}
        tls = {name: str(path) for name, path in files.items()}
        return redis.Redis(
            host="127.0.0.1", port=self.port, ssl=True, ssl_check_hostname=False, decode_responses=True, **tls
        )

    def log(self) -> str:
        path = self.folder / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()


def tls_server(
    folder: Path,
    certs: Certs,
    binary: str,
    *,
    auth_clients: str = "no",
    replica_of: int | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> TlsProcess:
    """A TLS-only redis-server (not started); ``replica_of`` makes it a replica of that TLS port."""
    port = free_port()
    argv = [binary, *_tls_options(port, certs, auth_clients, cert or certs.server, key or certs.server_key)]
    argv += ["--dir", str(folder.resolve()), "--save", "", "--appendonly", "no", "--daemonize", "no"]
    if replica_of is not None:
        argv += ["--replicaof", "127.0.0.1", str(replica_of)]
    return TlsProcess(folder, argv, port, certs)


def tls_sentinel(folder: Path, certs: Certs, binary: str, primary_port: int, *, auth_clients: str) -> TlsProcess:
    """A TLS-only sentinel monitoring ``primary`` at 127.0.0.1:``primary_port`` over TLS, quorum 1."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    conf = folder / "sentinel.conf"
    conf.write_text(
        f"dir {folder.resolve()}\n"
        f"sentinel monitor primary 127.0.0.1 {primary_port} 1\n"
        "sentinel down-after-milliseconds primary 1000\n"
        "sentinel failover-timeout primary 3000\n"
    )
    tls = _tls_options(port, certs, auth_clients, certs.server, certs.server_key)
    argv = [binary, str(conf), "--sentinel", *tls]
    return TlsProcess(folder, argv, port, certs)


def _candidates() -> list[str]:
    found: list[str] = []
    with contextlib.suppress(ConfigError):
        found.append(find_redis_server())
    for name in ("redis-server", "valkey-server"):
        on_path = shutil.which(name)
        if on_path:
            found.append(on_path)
    found += [p for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server") if os.access(p, os.X_OK)]
    return list(dict.fromkeys(found))


@cache
def _has_tls(binary: str, folder: Path) -> bool:
    try:
        if server_version(binary) < (6, 0):
            return False
        server = tls_server(folder / Path(binary).name, make_certs(folder / "certs"), binary)
        server.start(timeout_s=5)
    except (ConfigError, OSError):
        return False
    server.kill()
    return True


def tls_binary(scratch: Path) -> str:
    """A redis-server that speaks TLS: ``$ORCHESTRATOR_REDIS_SERVER`` or the embedded default
    first, then the ones on PATH and Debian's; the test is skipped, naming them, if none does."""
    tried = _candidates()
    for binary in tried:
        if _has_tls(binary, scratch):
            return binary
    pytest.skip(
        f"no redis-server built with TLS here (tried: {', '.join(tried) or 'none found'}); Debian's has it "
        "(apt-get install redis-server; .ci/run installs it), or set ORCHESTRATOR_REDIS_SERVER to one"
    )


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def tls_redis_server(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of a redis-server built with TLS (or the test is skipped, saying why)."""
    return tls_binary(tmp_path_factory.mktemp("tls-probe"))
