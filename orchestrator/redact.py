"""Secrets kept out of output: URL passwords masked by parsing the URL, known secrets masked anywhere.

A Redis URL carries its password (``redis://user:PASSWORD@host:port/db``, ``?password=``,
``?sentinel_password=``, ``?ssl_password=`` for an encrypted TLS key: any parameter named like
a password; the other TLS parameters are file paths and are shown). :func:`redact_url` masks
them by taking the URL apart rather than by matching a password pattern, so an upper-case
scheme (``REDIS://``), an ``@``, ``:`` or ``?`` inside the password and a Sentinel host list
(``redis+sentinel://:pw@h1:26379,h2:26379/m``) are all masked. :func:`mask` does it for every
URL inside a text (a log line, a traceback, an error message) and also replaces the known
secret values themselves, wherever they appear (a password that reached a message without its
URL). Log formatters and the CLI's error output pass everything they write through it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import unquote

MASK = "***"
# Known secrets shorter than this are not masked outside URLs: replacing every "ab" in a
# log line would garble it, and such a password protects nothing anyway.
MIN_SECRET_CHARS = 4

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://\S+")
# any query parameter named like a password: password, sentinel_password, ssl_password, and a
# misspelt one too (an error that names the typo shows the URL)
_QUERY_SECRET = re.compile(r"(?i)((?:^|[?&;])[a-z_]*(?:pas|pwd)[a-z_]*=)([^&;#\s]*)")
_HOST_LIST = re.compile(r"[A-Za-z0-9.\-_%:,\[\]]*")


def _userinfo_end(rest: str) -> int:
    """Index in ``rest`` (a URL after ``://``) of the ``@`` that ends its user info, or -1.

    It is the last ``@`` before the query (so an ``@`` inside the password belongs to the
    password); failing that, the last ``@`` followed by something that can only be a host list
    (a ``?`` or ``#`` inside the password would otherwise end the search early).
    """
    head = re.split(r"[?#]", rest, maxsplit=1)[0]
    at = head.rfind("@")
    if at >= 0:
        return at
    at = rest.rfind("@")
    if at >= 0 and _HOST_LIST.fullmatch(re.split(r"[/?#]", rest[at + 1 :], maxsplit=1)[0]):
        return at
    return -1


def split_url(url: str) -> tuple[str, str, str]:
    """``(scheme://, user info, the rest from its '@' on)``; user info is '' when there is none."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", url
    at = _userinfo_end(rest)
    if at < 0:
        return scheme + sep, "", rest
    return scheme + sep, rest[:at], rest[at:]


def redact_url(url: str) -> str:
    """``url`` with every password replaced by ``***``; user names, hosts and the rest are kept."""
    prefix, userinfo, rest = split_url(url)
    user, colon, _password = userinfo.partition(":")
    if colon:
        userinfo = f"{user}:{MASK}"
    return prefix + userinfo + _QUERY_SECRET.sub(lambda m: m[1] + MASK, rest)


def secrets_of(url: str | None) -> set[str]:
    """The secret values a URL carries (its password and password query parameters), as written
    and percent-decoded, for :func:`mask` to find them outside the URL too."""
    if not url:
        return set()
    _prefix, userinfo, rest = split_url(url)
    found = [userinfo.partition(":")[2]] + [m[2] for m in _QUERY_SECRET.finditer(rest)]
    return {value for raw in found if raw for value in (raw, unquote(raw))}


def mask(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with the password of every URL in it masked, and every known secret too."""
    text = _URL.sub(lambda m: redact_url(m[0]), text)
    for secret in sorted(set(secrets), key=len, reverse=True):
        if len(secret) >= MIN_SECRET_CHARS:
            text = text.replace(secret, MASK)
    return text


class Secrets:
    """The secrets one process knows (the passwords of the URLs it was given), to mask on output."""

    def __init__(self, urls: Iterable[str | None] = ()) -> None:
        self._values: set[str] = set()
        for url in urls:
            self.add_url(url)

    def add_url(self, url: str | None) -> None:
        self._values |= secrets_of(url)

    def mask(self, text: str) -> str:
        return mask(text, self._values)
