"""Running user code: sync steps on threads, async steps on the loop, every outcome an ``Exception``.

A thread cannot be killed. When an attempt is given up (timeout, lost claim, shutdown) its
thread may keep running user code; it is then *abandoned* and keeps counting against the
worker's concurrency until it returns, so a step that hangs cannot make the worker start
unbounded threads.

Whatever a step raises comes back as an ordinary ``Exception``: ``SystemExit``,
``KeyboardInterrupt``, ``StopIteration``, a ``CancelledError`` of the step's own and friends
are wrapped in :class:`StepInterrupted` so they fail the attempt instead of the worker
(asyncio refuses ``StopIteration`` in a future, and a task that raises ``SystemExit`` or
``KeyboardInterrupt`` stops the whole event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Coroutine
from typing import Any


class StepInterrupted(Exception):
    """A step raised a BaseException (SystemExit, KeyboardInterrupt, CancelledError, ...)
    or StopIteration; recorded as the step's error."""


def as_step_error(exc: BaseException) -> Exception:
    """``exc`` if it is an ordinary error, else a :class:`StepInterrupted` that wraps it."""
    if isinstance(exc, Exception) and not isinstance(exc, StopIteration | StopAsyncIteration):
        return exc
    wrapped = StepInterrupted(f"step raised {type(exc).__name__}: {exc}".rstrip(": "))
    wrapped.__cause__ = exc
    return wrapped


async def guarded(coro: Coroutine[Any, Any, Any]) -> Any:
    """Await an async step, turning what it raises into an ordinary exception.

    A ``CancelledError`` passes through only when this task was really cancelled (the worker
    gave the attempt up); one that the step raised by itself is the step's error.
    """
    try:
        return await coro
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise as_step_error(exc) from exc
    except BaseException as exc:  # SystemExit & co. must not reach the loop
        if isinstance(exc, Exception) and not isinstance(exc, StopIteration | StopAsyncIteration):
            raise
        raise as_step_error(exc) from exc


class StepThreads:
    """A pool of daemon threads for sync steps, grown on demand, with abandoned ones counted.

    Daemon threads, so a step stuck forever never keeps a stopping worker alive; pooled,
    because starting a thread per step costs more than the rest of the step path.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, on_straggler_exit: Callable[[], None]) -> None:
        self._loop = loop
        self._on_exit = on_straggler_exit
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[StepThread] = queue.SimpleQueue()
        self._idle = 0
        self.size = 0
        self.abandoned = 0

    def start(self, fn: Callable[..., Any], *args: Any) -> StepThread:
        job = StepThread(self, fn, args)
        with self._lock:
            grow = self._idle == 0
            if grow:
                self.size += 1
            else:
                self._idle -= 1
        self._jobs.put(job)
        if grow:
            threading.Thread(target=self._serve, name=f"orchestrator-step-{self.size}", daemon=True).start()
        return job

    def _serve(self) -> None:
        while True:
            self._jobs.get().run()
            with self._lock:
                self._idle += 1

    def _settle(self, job: StepThread, value: Any, exc: Exception | None) -> None:
        if not job.future.done():
            if exc is None:
                job.future.set_result(value)
            else:
                job.future.set_exception(exc)

    def _finished(self, job: StepThread, value: Any, exc: Exception | None) -> None:
        with self._lock:
            job.finished = True
            straggler = job.abandoned
            if straggler:
                self.abandoned -= 1
        with contextlib.suppress(RuntimeError):  # the loop is gone: the worker stopped meanwhile
            self._loop.call_soon_threadsafe(self._settle, job, value, exc)
            if straggler:
                self._loop.call_soon_threadsafe(self._on_exit)

    def abandon(self, job: StepThread) -> None:
        """Stop waiting for ``job``; its thread counts as busy until the function returns."""
        with self._lock:
            if not job.finished and not job.abandoned:
                job.abandoned = True
                self.abandoned += 1


class StepThread:
    """One sync step handed to the pool; ``future`` resolves on the event loop."""

    def __init__(self, owner: StepThreads, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.owner = owner
        self.fn = fn
        self.args = args
        self.future: asyncio.Future[Any] = owner._loop.create_future()
        self.finished = False
        self.abandoned = False

    def run(self) -> None:
        value: Any = None
        exc: Exception | None = None
        try:
            value = self.fn(*self.args)
        except BaseException as error:  # every outcome must reach the loop
            exc = as_step_error(error)
        self.owner._finished(self, value, exc)
