"""Which event loop a worker runs on.

uvloop (libuv) where it is installed, which it is with the package on Linux and macOS: the
worker's Python per step is mostly the event loop's (callbacks, sockets, the wake-ups of step
threads), and on uvloop the same no-op load took ~11% less worker CPU per step and ran ~15%
more steps/s (docs/benchmarks.md). asyncio's own loop elsewhere (Windows, PyPy), or when the
``event_loop`` setting asks for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from orchestrator.errors import ConfigError


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The ``loop_factory`` for :class:`asyncio.Runner` (None: asyncio's default loop)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "event_loop is 'uvloop' but uvloop is not installed here; "
                "install it (pip install uvloop) or set event_loop to 'auto' or 'asyncio'"
            ) from None
        return None
    return uvloop.new_event_loop
