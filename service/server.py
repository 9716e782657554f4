"""The uvicorn server, with a shutdown (SIGTERM/SIGINT) that loses nothing a client sent.

uvicorn's own shutdown closes the listening socket, then every idle keep-alive connection at once. Under keep-alive
load both lose requests (64 closed-loop aiohttp clients, SIGTERM mid-run: 37 connection resets and 8 server
disconnects): a client that has just sent its next request on a connection the server closes gets a reset, and so
does a client whose new connection was still in the kernel's accept queue when the listening socket closed. HTTP/1.1
gives a server one clean way to end a keep-alive connection: answer a request with `Connection: close`. So:

1. At the signal the runtime drains: /readyz says 503, every response carries `Connection: close` and new work
   gets 503 `shutting_down` with Retry-After (both in service.middleware.RequestContext); queued batches run at once.
2. Idle keep-alive connections: each has IDLE_GRACE_S, counted from the signal or from its accept, to send a
   request (which is answered, with `Connection: close`); one still idle then is closed. A connection that has not
   carried a request yet gets FRESH_GRACE_S: its client opened it to send one. A client that sends at
   that very instant races the close, as it would race any keep-alive timeout.
3. After --shutdown-delay-s (at least IDLE_GRACE_S, so the connections open at the signal are gone first) the
   listener stops without resetting anyone: a socket filter makes the kernel drop new SYNs (the client retries its
   SYN and is refused once the socket is closed: its request was never sent), the connections already in the accept
   queue are accepted and answered, then the socket is closed.
4. Up to --graceful-timeout-s for the connections to finish; then the lifespan shutdown finishes the queued batches
   and stops the compute processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import select
import socket
import struct
import time
from types import FrameType
from typing import Any

import uvicorn

from .connection_guard import ConnectionGuard
from .runtime import ServiceRuntime

log = logging.getLogger("service.server")

# How long a connection may stay idle during the drain before it is closed: far more than a client's turnaround
# between two requests on a connection it holds, even on a loaded machine.
IDLE_GRACE_S = 1.0
# A connection that has not carried a request yet was opened to send one: on a starved machine the client may take
# longer than IDLE_GRACE_S between its connect and its request, and closing it then resets that request.
FRESH_GRACE_S = 5.0
_SWEEP_S = 0.05
_ACCEPT_QUEUE_WAIT_S = 1.0
_SO_ATTACH_FILTER = 26  # Linux; socket.SO_ATTACH_FILTER is not exported by Python
# Classic BPF on the listening socket, run on each TCP segment from its header: drop a segment whose flags have SYN
# without ACK (a new connection attempt), keep every other. Dropping every segment would also drop the final ACK of
# a handshake already under way when the filter is attached: its client, which sends its request at once, is reset
# when the listener closes (seen once in 64-client CI runs). Children accepted from the socket inherit the filter;
# it never matches their segments.
_DROP_NEW_SYNS = b"".join(
    struct.pack("=HBBI", code, jt, jf, k)
    for code, jt, jf, k in (
        (0x30, 0, 0, 13),  # ldb [13]: the TCP flags byte
        (0x54, 0, 0, 0x12),  # and #(SYN | ACK)
        (0x15, 0, 1, 0x02),  # jeq #SYN: drop, else keep
        (0x06, 0, 0, 0),  # ret #0: drop
        (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: keep the whole segment
    )
)


def refuse_new_connections(sock: Any) -> bool:
    """Make the kernel drop new connection attempts to a listening TCP socket while it stays open, so its accept
    queue can be emptied before it is closed. False where that is not possible (not Linux, not TCP)."""
    program = (ctypes.c_ubyte * len(_DROP_NEW_SYNS)).from_buffer_copy(_DROP_NEW_SYNS)
    fprog = struct.pack("HL", len(_DROP_NEW_SYNS) // 8, ctypes.addressof(program))  # struct sock_fprog {len; filter*}
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as dup:  # works for asyncio's and uvloop's socket wrappers
            if dup.type != socket.SOCK_STREAM or dup.family not in (socket.AF_INET, socket.AF_INET6):
                return False
            dup.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)
    except OSError:
        return False
    return True


def _has_pending(sock: Any) -> bool:
    """A listening socket is readable while its accept queue holds a connection."""
    try:
        return bool(select.select([sock.fileno()], [], [], 0)[0])
    except (OSError, ValueError):
        return False


def _in_request(connection: Any) -> bool:
    """A request is being answered on this uvicorn connection (h11 or httptools protocol)."""
    cycle = getattr(connection, "cycle", None)
    return cycle is not None and not cycle.response_complete


def _grace(connection: Any) -> float:
    """How long this connection may stay idle during the drain (uvicorn sets `cycle` at its first request)."""
    return FRESH_GRACE_S if getattr(connection, "cycle", None) is None else IDLE_GRACE_S


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose shutdown follows the module docstring's four steps."""

    def __init__(
        self, config: uvicorn.Config, runtime: ServiceRuntime, delay_s: float, guard: ConnectionGuard | None = None
    ) -> None:
        super().__init__(config)
        self.runtime = runtime
        self.delay_s = delay_s
        self.guard = guard  # the connection guard of config.http, if any (service/connection_guard.py)
        self._drain_started: float | None = None
        self._announcer: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's startup (lifespan, then listening); then, once the models are warmed up, one line that says the
        service is ready, for whoever started it by hand (`make run`)."""
        await super().startup(sockets)
        if not self.should_exit and self.servers:
            self._announcer = asyncio.create_task(self._announce_ready())

    async def _announce_ready(self) -> None:
        while not self.runtime.ready:
            if self.should_exit or self.runtime.draining:
                return
            await asyncio.sleep(_SWEEP_S)
        if self.guard is not None:
            self.guard.refit()  # the compute processes hold descriptors now
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        shown = "localhost" if host in ("0.0.0.0", "::") else host
        cap = f"; at most {self.guard.limit} connections" if self.guard is not None else ""
        log.info("ready: http://%s:%d (/readyz answers 200%s)", shown, port, cap)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._begin_drain()
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        if self.runtime.begin_drain():
            self._drain_started = time.monotonic()
            log.info("draining: not ready; the listener closes in %.1f s", max(self.delay_s, IDLE_GRACE_S))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._begin_drain()  # also when uvicorn stops for another reason than a signal
        started = self._drain_started or time.monotonic()
        sweeper = asyncio.create_task(self._close_idle_connections())
        try:
            while not self.force_exit and time.monotonic() < started + max(self.delay_s, IDLE_GRACE_S):
                await asyncio.sleep(_SWEEP_S)
            await self._stop_listening(sockets)
            try:
                await asyncio.wait_for(self._connections_done(), timeout=self.config.timeout_graceful_shutdown)
            except TimeoutError:
                log.error("graceful shutdown timed out: cancelling %d request(s)", len(self.server_state.tasks))
                for task in self.server_state.tasks:
                    task.cancel(msg="graceful shutdown timed out")
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _close_idle_connections(self) -> None:
        """Step 2, until shutdown ends: close each connection that stayed idle IDLE_GRACE_S during the drain."""
        idle_since: dict[Any, float] = {}
        while True:
            now = time.monotonic()
            connections = list(self.server_state.connections)
            for connection in connections:
                if _in_request(connection):  # its response carries Connection: close
                    idle_since.pop(connection, None)
                elif now - idle_since.setdefault(connection, now) >= _grace(connection):
                    connection.shutdown()  # uvicorn closes an idle connection's transport
            for gone in idle_since.keys() - set(connections):
                del idle_since[gone]
            await asyncio.sleep(_SWEEP_S)

    async def _stop_listening(self, sockets: list[socket.socket] | None) -> None:
        """Step 3: refuse new connections in the kernel, answer the queued ones, then close the listening sockets."""
        listening = [sock for server in self.servers for sock in server.sockets]
        refused = [refuse_new_connections(sock) for sock in listening]  # every socket, not up to the first failure
        if all(refused):
            deadline = time.monotonic() + _ACCEPT_QUEUE_WAIT_S
            while any(_has_pending(sock) for sock in listening) and time.monotonic() < deadline:
                await asyncio.sleep(0.005)  # the event loop accepts them meanwhile
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        log.info("listener closed; waiting for %d connection(s)", len(self.server_state.connections))

    async def _connections_done(self) -> None:
        while (self.server_state.connections or self.server_state.tasks) and not self.force_exit:
            await asyncio.sleep(_SWEEP_S)
