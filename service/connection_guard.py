"""Slow clients cannot hold the service: a deadline for every request head, and a cap on open connections.

uvicorn closes idle keep-alive connections, but a connection that has not sent a complete request head yet has no
deadline at all. Measured before this module: with the common open-file limit of 1,024, 1,100 connections that each
sent half a request head once took the service down (a normal request got no answer; 70 s later 1,001 of them were
still open), because every file descriptor was held and the server could accept nothing more. So:

- Head deadline: from the connect (or from the first byte of the next request on a kept-alive connection) until the
  request head is complete, at most `head_timeout_s`. Beyond it the connection gets a 408 and is closed (closed
  without a word when nothing arrived). Bodies have their own deadline in the app (--body-timeout-s).
- Connection cap: at most `limit` open connections, set below the open-file limit so that there is always a
  descriptor to accept with. At the cap a new connection takes the place of the one that has waited longest for its
  next request head (a slow or idle client): a normal request gets through a flood of slow ones. When every
  connection is carrying a request, the new one is refused at once with a 503 and closed.

The guard is the HTTP protocol uvicorn runs for each connection (its httptools protocol with three hooks added).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .errors import ErrorCode

log = logging.getLogger("service.connections")

# Descriptors kept free beside the connections: the listener, the compute processes' pipes, temporary files of
# large multipart uploads, log files, and the connections accepted in one burst before the cap sees them.
FD_HEADROOM = 64
# The open-file limit the service raises its soft limit to, when the hard limit allows (the fd limit in the image,
# compose file and manifests is this value too).
WANTED_OPEN_FILES = 65536
WARN_EVERY_S = 60.0


def _plain_response(status: str, error: ErrorCode, detail: str, *headers: str) -> bytes:
    """A complete HTTP/1.1 response that closes the connection, written before any request was read: the same
    {"error", "detail"} body as every other refusal (service/errors.py)."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = [f"HTTP/1.1 {status}", "content-type: application/json", "connection: close", *headers]
    return ("\r\n".join([*head, f"content-length: {len(body)}", "", ""])).encode() + body


_HEAD_TIMEOUT = _plain_response(
    "408 Request Timeout", ErrorCode.HEAD_TIMEOUT, "the request head did not arrive in time (--head-timeout-s)"
)
_TOO_MANY_CONNECTIONS = _plain_response(
    "503 Service Unavailable",
    ErrorCode.TOO_MANY_CONNECTIONS,
    "every connection is carrying a request (--max-connections); retry shortly",
    "retry-after: 1",
)


def raise_open_file_limit(wanted: int = WANTED_OPEN_FILES) -> int:
    """Raise this process's soft open-file limit towards `wanted`, as far as the hard limit allows (no privilege
    needed); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    return soft


def open_descriptors() -> int:
    """File descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 16  # not Linux: a small process's usual count


def connection_limit(configured: int | None, soft_limit: int, open_now: int) -> int:
    """The cap on open connections: as configured, but never more than the open-file limit leaves after the
    descriptors already open and FD_HEADROOM (at least 1)."""
    room = soft_limit - open_now - FD_HEADROOM if soft_limit != resource.RLIM_INFINITY else 1 << 20
    return max(1, min(configured or room, room))


@dataclass(eq=False)
class ConnectionGuard:
    """The shared state of every connection of one server: the deadline, the cap, and the connections waiting for a
    request head, longest-waiting first (a dict keeps insertion order; moving one to the end is O(1))."""

    head_timeout_s: float
    max_connections: int | None  # as configured (None: what the open-file limit leaves)
    open_file_limit: int
    limit: int = 1
    waiting: dict[GuardedHttpToolsProtocol, None] = field(default_factory=dict)
    open: int = 0
    _warned_at: float = float("-inf")

    def __post_init__(self) -> None:
        self.refit()

    def refit(self) -> int:
        """Set the cap from the descriptors open now (again after the models are loaded and the compute processes
        started, which hold descriptors of their own)."""
        self.limit = connection_limit(self.max_connections, self.open_file_limit, open_descriptors())
        return self.limit

    def protocol_class(self) -> type[GuardedHttpToolsProtocol]:
        """The protocol class uvicorn instantiates per connection (uvicorn.Config(http=...)), bound to this guard."""
        return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"guard": self})

    def make_room(self) -> bool:
        """At the cap: close the connection that has waited longest for a request head. False when every
        connection is carrying a request."""
        if not self.waiting:
            return False
        victim = next(iter(self.waiting))
        victim.close_waiting()
        self.warn_at_cap("closing the connection that has waited longest for a request head")
        return True

    def warn_at_cap(self, action: str) -> None:
        """Say in the log that the cap is reached, at most once a minute (a flood would otherwise flood the log)."""
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("%d connections open, the cap (--max-connections): %s", self.open, action)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the module docstring's head deadline and connection cap."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_deadline: float | None = None  # loop time by which the awaited head must be complete
        self._head_started = False  # bytes of the awaited head have arrived
        self._counted = False  # counts towards guard.open
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if guard.open >= guard.limit and not guard.make_room():
            self._refused = True
            guard.warn_at_cap("every connection carries a request; refusing new ones with 503")
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        guard.open += 1
        self._counted = True
        super().connection_made(transport)
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        self._stop_waiting()
        self._cancel_head_timer()
        self._uncount()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self in self.guard.waiting:
            self._head_started = True
            if self._head_deadline is None:  # an idle kept-alive connection: its next request begins
                self._set_head_deadline()
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle now (uvicorn armed its keep-alive timeout)
            self._await_head(deadline=False)  # the keep-alive timeout runs until the next request's first byte

    def close_waiting(self) -> None:
        """Close this connection, which is waiting for a request head (eviction)."""
        self._stop_waiting()
        self._uncount()
        if not self.transport.is_closing():
            self.transport.close()

    def _await_head(self, deadline: bool = True) -> None:
        self.guard.waiting.pop(self, None)
        self.guard.waiting[self] = None  # the longest-waiting connection is first
        self._head_started = False
        if deadline:
            self._set_head_deadline()

    def _set_head_deadline(self) -> None:
        """The head is due head_timeout_s from now. The timer is lazy: one already pending stays (it fires earlier
        than this deadline and re-arms itself for the rest), so a kept-alive connection costs one call_later per
        head timeout, not one per request (a timer per request was measurable event-loop time at 64 clients)."""
        self._head_deadline = self.loop.time() + self.guard.head_timeout_s
        if self._head_timer is None:
            self._head_timer = self.loop.call_at(self._head_deadline, self._check_head_deadline)

    def _stop_waiting(self) -> None:
        self.guard.waiting.pop(self, None)
        self._head_deadline = None  # a pending timer finds no deadline and lapses

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _check_head_deadline(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self.transport.is_closing():
            return
        if self.loop.time() < deadline:  # the deadline moved on since the timer was armed
            self._head_timer = self.loop.call_at(deadline, self._check_head_deadline)
            return
        if self._head_started:
            self.transport.write(_HEAD_TIMEOUT)
        self._stop_waiting()
        self._uncount()
        self.transport.close()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self.guard.open -= 1
