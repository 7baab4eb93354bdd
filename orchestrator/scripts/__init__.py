"""Lua scripts: loaded from the ``.lua`` files next to this module and run by SHA.

Each script gets the definitions of ``_prelude.lua`` (shared helpers) that it uses put in
front. Calls are sent in pipelines (one round trip for a batch) by :func:`execute` /
:func:`execute_async`; a ``NOSCRIPT`` reply (Redis restarted or flushed its script cache)
loads the script and re-sends just the calls that were refused, which is safe because a
refused call did not run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import redis
import redis.asyncio as aredis
from redis.exceptions import NoScriptError, ResponseError

Arg = str | int | float


@dataclass(frozen=True)
class Script:
    """One Lua script: its name (file stem), full source and SHA1."""

    name: str
    source: str
    sha: str

    def call(self, keys: Sequence[str], args: Sequence[Arg]) -> Call:
        return Call(("EVALSHA", self.sha, len(keys), *keys, *args), self)


@dataclass(frozen=True)
class Call:
    """A command for a pipeline; ``script`` is set when it is an EVALSHA."""

    command: tuple[Arg, ...]
    script: Script | None = None


def command(*parts: Arg) -> Call:
    """A plain Redis command, to batch with script calls."""
    return Call(tuple(parts))


_DEFINITION = re.compile(r"^local (?:function )?([A-Za-z_][A-Za-z0-9_]*)", re.MULTILINE)


def _prelude_blocks(prelude: str) -> list[tuple[str, str]]:
    """The prelude's top-level definitions in order: (name, text with the comment lines above it)."""
    lines = prelude.split("\n")
    starts: list[tuple[int, str]] = []
    for i, line in enumerate(lines):
        match = _DEFINITION.match(line)
        if match:
            first = i
            while first > 0 and lines[first - 1].startswith("--"):
                first -= 1
            starts.append((first, match.group(1)))
    ends = [first for first, _ in starts[1:]] + [len(lines)]
    return [(name, "\n".join(lines[first:end]).strip("\n")) for (first, name), end in zip(starts, ends, strict=True)]


def _needed(body: str, blocks: list[tuple[str, str]]) -> str:
    """The prelude definitions ``body`` uses, directly or through each other, in prelude order.

    Every definition is a closure made again at every call of a script, and Redis runs a
    script's whole text each time: a commit paid ~5 µs for helpers it never called.
    """
    used = {name for name, _ in blocks if re.search(rf"\b{name}\b", body)}
    for name, text in reversed(blocks):  # a definition only uses the ones before it
        if name in used:
            used |= {other for other, _ in blocks if other != name and re.search(rf"\b{other}\b", text)}
    return "\n\n".join(text for name, text in blocks if name in used)


@cache
def load(name: str) -> Script:
    """The script ``<name>.lua`` with the prelude definitions it uses, read once per process."""
    folder = resources.files(__package__)
    blocks = _prelude_blocks((folder / "_prelude.lua").read_text())
    body = (folder / f"{name}.lua").read_text()
    source = f"{_needed(body, blocks)}\n{body}"
    return Script(name, source, hashlib.sha1(source.encode()).hexdigest())


def names() -> list[str]:
    """Names of all scripts shipped with the package."""
    folder = resources.files(__package__)
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".lua") and not p.name.startswith("_"))


def _missing(results: list[Any], calls: Sequence[Call]) -> list[int]:
    return [i for i, res in enumerate(results) if isinstance(res, NoScriptError) and calls[i].script]


def _first_error(results: list[Any], calls: Sequence[Call]) -> None:
    """Raise the first refused call's error. A cluster's pipeline also hands back a node's
    connection error or a ClusterError (a slot still split by a move after the retries) as
    one call's reply: raised as it is."""
    for res, call in zip(results, calls, strict=True):
        if isinstance(res, ResponseError):
            name = call.script.name if call.script else str(call.command[0])
            raise ResponseError(f"{name}: {res}") from res  # the cause keeps redis-py's class (MovedError...)
        if isinstance(res, BaseException):
            raise res


def execute(client: redis.Redis, calls: Sequence[Call], *, raise_on_error: bool = True) -> list[Any]:
    """Run ``calls`` in one pipelined round trip (not a transaction) and return the replies.

    With ``raise_on_error=False`` a refused call's reply is its exception, so one bad call
    does not hide the replies of the others.
    """
    if not calls:
        return []
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command(*call.command)  # type: ignore[no-untyped-call]
    results: list[Any] = pipe.execute(raise_on_error=False)
    retry = _missing(results, calls)
    if retry:
        for script in {calls[i].script for i in retry if calls[i].script}:
            client.script_load(script.source)  # type: ignore[union-attr]
        again = execute(client, [calls[i] for i in retry], raise_on_error=False)
        for i, res in zip(retry, again, strict=True):
            results[i] = res
    if raise_on_error:
        _first_error(results, calls)
    return results


async def execute_async(client: aredis.Redis, calls: Sequence[Call], *, raise_on_error: bool = True) -> list[Any]:
    """Asyncio twin of :func:`execute`."""
    if not calls:
        return []
    pipe = client.pipeline(transaction=False)
    for call in calls:
        pipe.execute_command(*call.command)
    results: list[Any] = await pipe.execute(raise_on_error=False)
    retry = _missing(results, calls)
    if retry:
        for script in {calls[i].script for i in retry if calls[i].script}:
            await client.script_load(script.source)  # type: ignore[union-attr]
        again = await execute_async(client, [calls[i] for i in retry], raise_on_error=False)
        for i, res in zip(retry, again, strict=True):
            results[i] = res
    if raise_on_error:
        _first_error(results, calls)
    return results
