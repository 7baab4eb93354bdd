"""TLS options of a Redis URL: parsed and checked before anything connects, and TLS refusals told apart.

``rediss://`` (one server) and ``rediss+sentinel://`` (the sentinels and the servers they name)
take redis-py's SSL arguments as query parameters:

=======================  =================================================================
``ssl_ca_certs``         the CA certificate(s) that signed the server's certificate (PEM)
``ssl_ca_path``          a folder of CA certificates (OpenSSL's hashed layout)
``ssl_certfile``         our certificate, for a server that asks for one (mutual TLS)
``ssl_keyfile``          its private key
``ssl_password``         the password of an encrypted private key (a secret: masked in output)
``ssl_cert_reqs``        ``required`` (the default), ``optional`` or ``none`` (no verification)
``ssl_check_hostname``   ``true`` (the default) or ``false``: the certificate must name the host
``ssl_ciphers``          OpenSSL cipher list
=======================  =================================================================

redis-py itself would pass a misspelt parameter on as a keyword argument (a TypeError at the
first command), take TLS parameters on ``redis://`` the same way, and report a missing CA file
as "Error 2 connecting ... No such file or directory", as if Redis were down: each is a
:class:`~orchestrator.errors.ConfigError` here, naming the parameter.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import redis

from orchestrator.errors import ConfigError
from orchestrator.redact import redact_url

TLS_SCHEMES = ("rediss", "rediss+sentinel")
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
TLS_OPTIONS = (*TLS_FILES, "ssl_ca_path", "ssl_password", "ssl_cert_reqs", "ssl_check_hostname", "ssl_ciphers")
CERT_REQS = ("none", "optional", "required")
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

# What a TLS handshake says when it fails for good (a certificate or CA that does not fit, a
# client certificate missing or unknown, TLS spoken to a plain port), as opposed to a
# connection that broke: trying again only fails again.
_TLS_REFUSAL = re.compile(
    r"CERTIFICATE_VERIFY_FAILED|certificate verify failed|ALERT_(?:UNKNOWN_CA|BAD_CERTIFICATE|CERTIFICATE_REQUIRED)"
    r"|alert (?:unknown ca|bad certificate|certificate required)|WRONG_VERSION_NUMBER|PEM lib",
    re.IGNORECASE,
)


def uses_tls(url: str) -> bool:
    return url.split("://", 1)[0].lower() in TLS_SCHEMES


def tls_options(url: str) -> dict[str, Any]:
    """The TLS query parameters of ``url``, typed as redis-py's SSL connections take them.

    Raises :class:`ConfigError` for an ``ssl*`` parameter that is not one of
    :data:`TLS_OPTIONS`, a bad value, or TLS parameters on a scheme without TLS.
    """
    scheme = url.split("://", 1)[0].lower()
    options: dict[str, Any] = {}
    for name, values in parse_qs(urlsplit(url).query, keep_blank_values=True).items():
        if not name.lower().startswith("ssl"):
            continue
        where = f"redis_url {redact_url(url)!r}"
        if scheme not in TLS_SCHEMES:
            tls = "rediss+sentinel" if scheme.endswith("+sentinel") else "rediss"
            raise ConfigError(f"{where}: {name} is a TLS option, and {scheme}:// does not use TLS; use {tls}://")
        if name not in TLS_OPTIONS:
            raise ConfigError(f"{where}: unknown TLS option {name!r}; expected one of {', '.join(TLS_OPTIONS)}")
        options[name] = _value(where, name, values[-1])
    return options


def _value(where: str, name: str, value: str) -> Any:
    if name == "ssl_cert_reqs":
        if value.lower() not in CERT_REQS:
            raise ConfigError(f"{where}: ssl_cert_reqs {value!r} is invalid; expected one of {', '.join(CERT_REQS)}")
        return value.lower()
    if name == "ssl_check_hostname":
        if value.lower() not in _BOOLEANS:
            raise ConfigError(f"{where}: ssl_check_hostname {value!r} is invalid; expected true or false")
        return _BOOLEANS[value.lower()]
    if not value:
        raise ConfigError(f"{where}: {name} is empty")
    return value


def check_tls_files(url: str) -> None:
    """Raise :class:`ConfigError` when a file or folder that ``url``'s TLS options name cannot be
    read. Called when a client is made, not when settings are checked: the files may exist only
    where the process runs (a Kubernetes Secret mounted into the pod)."""
    for name, value in tls_options(url).items():
        kind = "folder" if name == "ssl_ca_path" else "file" if name in TLS_FILES else None
        if kind is None:
            continue
        path = Path(value)
        readable = (path.is_dir() if kind == "folder" else path.is_file()) and os.access(path, os.R_OK)
        if not readable:
            raise ConfigError(f"redis_url {redact_url(url)!r}: {name} {value!r} is not a readable {kind}")


def tls_refused(exc: BaseException) -> bool:
    """True when a TLS handshake failed in a way that trying again cannot fix."""
    return isinstance(exc, redis.ConnectionError | OSError) and bool(_TLS_REFUSAL.search(str(exc)))
