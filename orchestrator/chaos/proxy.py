"""A TCP fault proxy between our processes and Redis: latency, partitions, resets and lost replies.

Toxiproxy is not available here and the kernel has no netem, so chaos tests put this proxy
between clients and a real redis-server and switch its mode while traffic flows. It runs
its own asyncio loop on a daemon thread, so synchronous tests and other processes (workers
given ``proxy.url``) can use it alike.

Modes apply at once to new and existing connections:

=====================  =====================================================================
``pass_through()``     forward both ways (also ``heal()``)
``delay(seconds)``     sleep before forwarding each chunk, both ways (a round trip pays twice)
``blackhole()``        accept, hold, forward nothing either way: clients time out (partition)
``reset()``            RST every open connection and every new one: clients fail fast
``half_open()``        forward client→Redis only: commands execute, replies never arrive
``cut_after_forward``  forward the next ``count`` client chunks; at the first reply after the
                       last one, drop it and RST the client: executed, but reported as failed
=====================  =====================================================================

Like TCP, the proxy never drops bytes from a connection that stays open: what arrives during
a blackhole or half-open is held (at most one chunk per direction, the rest waits in kernel
buffers) and delivered on heal. Dropping bytes mid-stream would desynchronise RESP, and a
client would pair replies with the wrong commands, which no real network does. To lose the
held bytes, ``reset()`` before healing. The Redis side of a connection is always closed with a
FIN, so whatever was forwarded to Redis is executed there.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import socket
import struct
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("orchestrator.chaos")

T = TypeVar("T")

CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 5.0
CONTROL_TIMEOUT_S = 10.0
ACCEPT_ERROR_PAUSE_S = 0.1  # after e.g. EMFILE: keep serving open connections, don't spin


class Mode(enum.Enum):
    """What the proxy does to traffic (see the table above); read it as ``FaultProxy.mode``."""

    PASS = "pass"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    RESET = "reset"
    HALF_OPEN = "half_open"
    CUT_AFTER_FORWARD = "cut_after_forward"


_HELD_TO_UPSTREAM = frozenset({Mode.BLACKHOLE, Mode.RESET})
_HELD_TO_CLIENT = frozenset({Mode.BLACKHOLE, Mode.RESET, Mode.HALF_OPEN})


@dataclass(eq=False)
class _Connection:
    client: socket.socket
    upstream: socket.socket | None = None
    task: asyncio.Task[None] | None = None
    doomed: bool = False  # carried the last chunk of a cut_after_forward: cut at the next reply
    abort: bool = False  # close the client side with an RST, not a FIN


class FaultProxy:
    """Listens on 127.0.0.1 and forwards each connection to ``upstream_host:upstream_port``.

    Control methods may be called from any thread but the proxy's own; each returns once the
    change is in effect (``reset()`` returns after every open connection got its RST).
    Counters are plain attributes, read them any time: ``connections_accepted``,
    ``connections_cut`` (closed by ``reset``/``cut_after_forward``), ``bytes_to_upstream``,
    ``bytes_to_client``.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, listen_port: int = 0, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = listen_port
        self.chunk_bytes = chunk_bytes
        self.connections_accepted = 0
        self.connections_cut = 0
        self.bytes_to_upstream = 0
        self.bytes_to_client = 0
        self._mode = Mode.PASS
        self._delay_s = 0.0
        self._cut_budget = 0
        self._generation = 0  # bumped on every mode change, so a for_seconds timer heals only its own mode
        self._changed = asyncio.Event()  # set and replaced on every mode change: wakes held pumps
        self._connections: set[_Connection] = set()
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._heal_timer: asyncio.TimerHandle | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    def stats(self) -> dict[str, int]:
        """A snapshot of the counters, for test reports."""
        return {
            "connections_accepted": self.connections_accepted,
            "connections_cut": self.connections_cut,
            "connections_open": self.open_connections,
            "bytes_to_upstream": self.bytes_to_upstream,
            "bytes_to_client": self.bytes_to_client,
        }

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Bind (in the caller's thread, so errors surface here), then serve on a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("FaultProxy is already running")
        listener = socket.create_server(("127.0.0.1", self.port), backlog=128)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]  # a restart binds the same port again
        self._changed = asyncio.Event()  # an Event binds to the loop of its first waiter
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_forever, args=(loop,), name=f"fault-proxy-{self.port}", daemon=True)
        self._listener, self._loop, self._thread = listener, loop, thread
        thread.start()
        self._call(self._begin_accepting())
        return self

    def stop(self) -> None:
        """Close the listener and every connection (with a FIN), then end the loop and its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(CONTROL_TIMEOUT_S)
            if not thread.is_alive():
                loop.close()
            if self._listener is not None:
                self._listener.close()
            self._loop = self._thread = self._listener = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- modes -----------------------------------------------------------------------------

    def pass_through(self) -> None:
        self._switch(Mode.PASS)

    heal = pass_through

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` before each chunk in each direction (chunks of a direction queue up)."""
        if seconds < 0:
            raise ValueError(f"delay must not be negative, got {seconds}")
        self._switch(Mode.DELAY, delay_s=seconds)

    def blackhole(self) -> None:
        self._switch(Mode.BLACKHOLE)

    def reset(self) -> None:
        self._switch(Mode.RESET)

    def half_open(self) -> None:
        self._switch(Mode.HALF_OPEN)

    def cut_after_forward(self, count: int = 1) -> None:
        """Forward ``count`` more client chunks; cut the connection that carried the last one.

        The cut happens when Redis' reply arrives, so by the time the client sees its
        ConnectionError, the command has executed: Temporal's ExecuteAndTimeout. One-shot: once
        the last chunk is forwarded the proxy is back in pass-through. Count chunks from a
        connection that is already open: a new redis-py connection first sends its handshake.
        """
        if count < 1:
            raise ValueError(f"count must be at least 1, got {count}")
        self._switch(Mode.CUT_AFTER_FORWARD, cut_budget=count)

    def for_seconds(self, apply_mode: Callable[[], None], seconds: float) -> None:
        """Apply a mode now, e.g. ``proxy.for_seconds(proxy.blackhole, 2.0)``; heal after ``seconds``.

        The heal is skipped if another mode was chosen in the meantime.
        """
        apply_mode()
        self._call(self._heal_later(seconds))

    # -- control plumbing --------------------------------------------------------------------

    def _switch(self, mode: Mode, *, delay_s: float = 0.0, cut_budget: int = 0) -> None:
        if self._loop is None:  # not started: there is no connection to act on
            self._apply(mode, delay_s, cut_budget)
            return
        self._call(self._switch_now(mode, delay_s, cut_budget))

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the proxy's loop and wait for it: the blocking core of every control method."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or threading.current_thread() is thread:
            coro.close()
            raise RuntimeError("FaultProxy control methods need a started proxy and another thread than its own")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(CONTROL_TIMEOUT_S)

    def _apply(self, mode: Mode, delay_s: float = 0.0, cut_budget: int = 0) -> None:
        self._mode, self._delay_s, self._cut_budget = mode, delay_s, cut_budget
        self._generation += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def _switch_now(self, mode: Mode, delay_s: float, cut_budget: int) -> None:
        self._apply(mode, delay_s, cut_budget)
        if mode is Mode.RESET:
            await self._close_all(abort=True)

    async def _heal_later(self, seconds: float) -> None:
        if self._heal_timer is not None:
            self._heal_timer.cancel()
        self._heal_timer = asyncio.get_running_loop().call_later(seconds, self._heal_if_unchanged, self._generation)

    def _heal_if_unchanged(self, generation: int) -> None:
        self._heal_timer = None
        if generation == self._generation:
            self._apply(Mode.PASS)

    # -- serving (everything below runs on the proxy's loop) ---------------------------------

    async def _begin_accepting(self) -> None:
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_forever())

    async def _shutdown(self) -> None:
        if self._heal_timer is not None:
            self._heal_timer.cancel()
        if self._accept_task is not None:
            self._accept_task.cancel()
            await asyncio.gather(self._accept_task, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()
        await self._close_all(abort=False)

    async def _accept_forever(self) -> None:
        assert self._listener is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as exc:
                log.warning("fault proxy: accept failed: %s", exc)
                await asyncio.sleep(ACCEPT_ERROR_PAUSE_S)
                continue
            self.connections_accepted += 1
            _prepare(sock)
            conn = _Connection(sock)
            self._connections.add(conn)
            conn.task = loop.create_task(self._serve(conn))

    async def _close_all(self, *, abort: bool) -> None:
        conns = list(self._connections)
        for conn in conns:
            if abort and not conn.abort:
                conn.abort = True
                self.connections_cut += 1
            if conn.task is not None:
                conn.task.cancel()
        await asyncio.gather(*(conn.task for conn in conns if conn.task is not None), return_exceptions=True)
        for conn in conns:  # a task cancelled before its first step never ran its own cleanup
            self._connections.discard(conn)
            _close(conn)

    async def _serve(self, conn: _Connection) -> None:
        """One connection: both pumps until either side ends, fails or a fault cuts it."""
        try:
            if self._mode is Mode.RESET:
                conn.abort = True
                self.connections_cut += 1
                return
            conn.upstream = await self._connect_upstream()
            pumps = [asyncio.create_task(self._pump(conn, to_client=flag)) for flag in (False, True)]
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                for result in await asyncio.gather(*pumps, return_exceptions=True):
                    if isinstance(result, Exception):
                        log.debug("fault proxy: connection ended: %r", result)
        except Exception as exc:  # one connection's failure must never stop the proxy
            log.debug("fault proxy: connection failed: %r", exc)
        finally:
            self._connections.discard(conn)
            _close(conn)

    async def _connect_upstream(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            _prepare(sock)
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, self.upstream), CONNECT_TIMEOUT_S)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _pump(self, conn: _Connection, *, to_client: bool) -> None:
        """Copy one direction chunk by chunk; at most one chunk in hand, so memory stays bounded."""
        assert conn.upstream is not None
        source, target = (conn.upstream, conn.client) if to_client else (conn.client, conn.upstream)
        loop = asyncio.get_running_loop()
        while True:
            await self._until_flowing(to_client)
            data = await loop.sock_recv(source, self.chunk_bytes)
            if not data:
                return
            if self._mode is Mode.DELAY:
                await asyncio.sleep(self._delay_s)
            await self._until_flowing(to_client)  # the mode may have changed while we read or slept
            if to_client and conn.doomed:
                conn.abort = True  # drop the reply: Redis executed the command, the client never hears
                self.connections_cut += 1
                return
            if not to_client and self._mode is Mode.CUT_AFTER_FORWARD:
                self._spend_cut(conn)
            await loop.sock_sendall(target, data)
            if to_client:
                self.bytes_to_client += len(data)
            else:
                self.bytes_to_upstream += len(data)

    async def _until_flowing(self, to_client: bool) -> None:
        held = _HELD_TO_CLIENT if to_client else _HELD_TO_UPSTREAM
        while self._mode in held:
            await self._changed.wait()

    def _spend_cut(self, conn: _Connection) -> None:
        self._cut_budget -= 1
        if self._cut_budget <= 0:
            conn.doomed = True  # before the chunk goes out, so its reply cannot slip through
            self._apply(Mode.PASS)


def _run_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    loop.run_forever()


def _prepare(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # Nagle would add latency we did not ask for


def _close(conn: _Connection) -> None:
    if conn.abort:
        with contextlib.suppress(OSError):  # SO_LINGER 0: close() sends an RST instead of a FIN
            conn.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.client.close()
    if conn.upstream is not None:
        conn.upstream.close()
