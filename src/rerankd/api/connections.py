"""Connection hygiene for `rerankd serve`: what uvicorn leaves open, bounded.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`), but never one that
has not sent a full request head: a client that connects and says nothing, or trickles its headers a byte at a
time, holds its socket (and a file descriptor) for ever, and enough of them make the server refuse everyone
(EMFILE on accept). Here, on uvicorn's h11 protocol:

* a request head must arrive in full within `header_timeout` seconds of the connection opening (on a keep-alive
  connection: of the end of its keep-alive wait after the previous response), however it trickles; otherwise the
  connection is closed;
* at most `max_connections` connections are open: a new one past the cap closes the connection idle the longest
  (no request in progress: idle keep-alive, or a head still arriving); when none is idle it is answered 503 and
  closed;
* the body's own deadline (`--body-timeout`, 408) is kept by the app's BodyLimitMiddleware, which reads bodies.

`raise_open_files_limit` lifts the process's soft file limit to its hard one, and `connection_limits` keeps the cap
below it with room for asyncio's accept bursts: each time the listening socket is ready, asyncio accepts up to
`backlog` connections before any of them reaches the protocol, and the cap's evictions close descriptors a loop turn or
two later. Without that room, accept fails with EMFILE, and Python 3.11's asyncio then logs one traceback per queued
connection (thousands) in one loop turn; `quiet_accept_errors` makes that one warning a minute.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import time
from collections.abc import Callable

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_body

log = logging.getLogger("rerankd.server")

RESERVED_FILES = 64  # descriptors kept for what is not a client connection (image fetches, logs, lazily opened files)
ACCEPT_BURSTS = 4  # accept bursts (of `backlog` each) the room above the cap holds before evictions close descriptors
MAX_BACKLOG = 2048  # uvicorn's default listen backlog, where the file limit allows it


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard limit; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, target, e)
    return soft


class Every:
    """A log line at most once every `seconds`, with the count of those left out since: what a flood of clients
    triggers per connection must not become a flood of log lines."""

    def __init__(self, seconds: float = 60.0):
        self.seconds, self.last, self.left_out = seconds, float("-inf"), 0

    def log(self, level: int, message: str, *args) -> None:
        now = time.monotonic()
        if now - self.last < self.seconds:
            self.left_out += 1
            return
        more = f" ({self.left_out} more like it in the last {now - self.last:.0f} s)" if self.left_out else ""
        self.last, self.left_out = now, 0
        log.log(level, message + more, *args)


def open_descriptors() -> int:
    """The file descriptors this process has open (0 where the platform does not say)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def connection_limits(max_connections: int, open_files: int, in_use: int | None = None) -> tuple[int, int]:
    """(cap on open connections, listen backlog) under a file limit of `open_files` with `in_use` descriptors
    already open: RESERVED_FILES kept free, and ACCEPT_BURSTS x backlog between the cap and the limit."""
    room = open_files - (open_descriptors() if in_use is None else in_use) - RESERVED_FILES
    backlog = max(1, min(MAX_BACKLOG, room // (2 * ACCEPT_BURSTS)))
    cap = min(max_connections, room - ACCEPT_BURSTS * backlog)
    if cap < 1:
        raise ValueError(f"the open files limit ({open_files}) leaves no room for connections: raise it (ulimit -n)")
    if cap < max_connections:
        log.warning("--max-connections %d lowered to %d by the open files limit (%d); raise the limit (ulimit -n) to "
                    "keep %d", max_connections, cap, open_files, max_connections)  # fmt: skip
    return cap, backlog


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, every: float = 60.0) -> None:
    """Report asyncio's 'out of system resource' on accept as one line every `every` seconds instead of a traceback
    per queued connection; asyncio itself pauses accepting for a second each time. Other errors: the default."""
    once = Every(every)

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if context.get("message") != "socket.accept() out of system resource":
            return loop.default_exception_handler(context)
        once.log(logging.WARNING, "cannot accept connections: %s; retrying each second (lower --max-connections or "
                 "raise the open files limit, ulimit -n)", context.get("exception"))  # fmt: skip

    loop.set_exception_handler(handler)


def guarded_protocol(max_connections: int, header_timeout: float,
                     closed: Callable[[str], None] | None = None) -> type[H11Protocol]:  # fmt: skip
    """uvicorn's h11 protocol with a deadline on request heads and a cap on open connections (module docstring).
    `closed(reason)` counts each connection it closes: "idle_evicted" (the cap reached), "refused" (the cap reached,
    none idle: a 503) or "head_timeout"; these never reach the app, nor its request metrics."""
    evicted, refused, timed_out = Every(), Every(), Every()
    count = closed or (lambda reason: None)

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self.waiting_since = self.loop.time()
            self.head_timer: asyncio.TimerHandle | None = None
            if len(self.connections) >= max_connections and not self._evict_one():
                super().connection_made(transport)
                return self._refuse()
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request head arrived in full
                self._disarm_head_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.waiting_since = self.loop.time()
                self._arm_head_timer(self.timeout_keep_alive)  # idle first (keep-alive), then the next head's time

        @property
        def idle(self) -> bool:
            """No request in progress: a head still arriving, or a keep-alive connection between requests."""
            return self.cycle is None or self.cycle.response_complete

        def _evict_one(self) -> bool:
            idle = [c for c in self.connections if isinstance(c, GuardedH11Protocol) and c.idle
                    and not c.transport.is_closing()]  # fmt: skip
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.waiting_since)
            count("idle_evicted")
            evicted.log(logging.INFO, "connection cap (%d) reached: closing the connection idle longest",
                        max_connections)
            oldest._close()
            return True

        def _refuse(self) -> None:
            count("refused")
            refused.log(logging.WARNING, "connection cap (%d) reached and every connection is busy: refusing one",
                        max_connections)
            message = f"the server has {max_connections} connections open (--max-connections), all busy; retry later"
            body = json.dumps(error_body(503, message)).encode()
            head = (f"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {len(body)}"
                    "\r\nretry-after: 1\r\nconnection: close\r\n\r\n").encode()  # fmt: skip
            self.transport.write(head + body)
            self.transport.close()

        def _arm_head_timer(self, idle_first: float = 0.0) -> None:
            self._disarm_head_timer()
            self.head_timer = self.loop.call_later(idle_first + header_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if getattr(self, "head_timer", None) is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_timed_out(self) -> None:
            self.head_timer = None
            if self.idle and not self.transport.is_closing():
                count("head_timeout")
                timed_out.log(logging.INFO, "closing a connection whose request head did not arrive within %.0f s",
                              header_timeout)
                self._close()

        def _close(self) -> None:
            self._disarm_head_timer()
            self._unset_keepalive_if_required()
            self.transport.close()

    return GuardedH11Protocol
