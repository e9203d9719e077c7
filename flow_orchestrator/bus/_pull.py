"""A credit-based pull feed: messages arrive as fast as a push subscription, but only as many as the
worker has room for, so back-pressure keeps surplus work in JetStream for other workers.

Each feed keeps pull requests outstanding for up to ``batch`` messages on its consumer (the server
delivers each to the feed's inbox the moment it is available) and tops them up as handled messages
finish, while the worker-wide :class:`Capacity` has room.

Requests live long (``expires``, 30 s) and ask for idle heartbeats: a worker hosts a consumer per
node of every workflow, and renewing hundreds of requests every few seconds kept an idle worker and
its server busy (9 % of a core for the server and 4 % per worker with the benchmark's four workflows;
2 % each with long-lived requests). A feed whose requests went silent (no message and no heartbeat
for two heartbeat periods since it last asked: a consumer leader lost on a cluster) asks again; a
reconnection (:attr:`Bus.reconnected`) makes every feed ask again at once, as a restarted server
forgot its requests; a refused request is asked again after :data:`REFUSED_PAUSE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

log = logging.getLogger("flow_orchestrator.bus")
STATUS = "Status"
PENDING_MESSAGES = "Nats-Pending-Messages"
EARLY_REQUESTS = 3  # a feed's first requests live under a second: see _request_loop
REFUSED_PAUSE = 1.0  # seconds before asking again after a refusal (no leader yet, limits, bad request)
# Statuses that end a request in the normal course: renew at once. Any other status is a refusal.
_ENDED = {"408": "Request Timeout", "404": "No Messages", "409": "Leadership Change"}


class Capacity:
    """How many messages one worker may hold at once (being handled), across all its feeds."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a worker must be able to hold at least one message, got {limit}")
        self.limit = limit
        self.held = 0
        self._changed = asyncio.Event()

    @property
    def free(self) -> int:
        return max(0, self.limit - self.held)

    def hold(self) -> None:
        self.held += 1

    def release(self) -> None:
        self.held -= 1
        self._changed.set()

    async def wait_for_room(self) -> None:
        """Return once some held message is released (callers bound the wait themselves)."""
        self._changed.clear()
        if not self.free:
            await self._changed.wait()


class PullFeed:
    """Feeds one durable pull consumer's messages to ``handle`` (which must call :meth:`done`)."""

    def __init__(
        self,
        nc: NatsClient,
        *,
        api_prefix: str,
        stream: str,
        consumer: str,
        handle: Callable[[Msg], Awaitable[None]],
        capacity: Capacity,
        batch: int = 64,
        expires: float = 30.0,
        heartbeat: float = 5.0,
    ) -> None:
        self._nc = nc
        self._next = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self._handle = handle
        self._capacity = capacity
        self._batch = batch
        self._expires = expires
        self._heartbeat = heartbeat
        self._requests = 0  # pull requests sent so far
        self._outstanding = 0  # requested from the server, not delivered yet
        self._local = 0  # delivered to this feed, not done yet
        self._heard = time.monotonic()  # the last message, heartbeat or status from the server
        self._asked = 0.0  # when the last request went out
        self._refused_until = 0.0
        self._wake = asyncio.Event()
        self._sub: Subscription | None = None
        self._loop: asyncio.Task[None] | None = None

    async def start(self) -> None:
        inbox = self._nc.new_inbox()
        self._sub = await self._nc.subscribe(inbox, cb=self._on_message)
        self._inbox = inbox
        self._loop = asyncio.create_task(self._request_loop(), name=f"pull {self._next}")

    async def stop(self) -> None:
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()

    def forget_requests(self) -> None:
        """The connection was re-established: a restarted server forgot this feed's requests, so ask
        again now instead of waiting for the silence to show. (A server that did not restart may still
        hold them; the feed then gets up to one batch more than it asked for, which it handles.)"""
        self._outstanding = 0
        self._wake.set()

    def done(self) -> None:
        """A delivered message is finished (acked, nak'd or terminated): its room is free again."""
        self._local -= 1
        self._capacity.release()
        if self._outstanding <= self._batch // 2:
            self._wake.set()  # only then would the request loop ask for more: no wake-up per message

    async def _on_message(self, msg: Msg) -> None:
        self._heard = time.monotonic()
        status = msg.headers.get(STATUS) if msg.headers else None
        if status is not None and not msg.data and not msg.reply:
            if status == "100":
                return  # an idle heartbeat: the requests are alive
            # The request is over: expired, leadership changed, or refused (503 no leader yet, 409
            # limits, 400). The server says how much of it went unfilled; without that, start afresh.
            headers = msg.headers or {}
            unfilled = headers.get(PENDING_MESSAGES)
            self._outstanding = max(0, self._outstanding - int(unfilled)) if unfilled is not None else 0
            description = str(headers.get("Description", ""))
            ended_normally = status in _ENDED and _ENDED[status] in description
            if not ended_normally:
                # Asking again at once would loop as fast as the server can refuse.
                self._refused_until = time.monotonic() + REFUSED_PAUSE
                log.debug("pull request on %s refused: %s %s", self._next, status, description)
            self._wake.set()
            return
        self._outstanding = max(0, self._outstanding - 1)
        self._local += 1
        self._capacity.hold()
        await self._handle(msg)

    async def _request_loop(self) -> None:
        while True:
            want = min(self._batch - self._outstanding - self._local, self._capacity.free)
            refused = self._refused_until - time.monotonic()
            if want > 0 and self._outstanding <= self._batch // 2 and refused <= 0:
                # A consumer hands each message to the pull request first in its queue. Workers that
                # started together would renew their requests in lockstep and lead every queue in
                # the same order, so one worker would take all of a fan-out's leaves. A random
                # lifetime per request (short for the first ones) shuffles the order per consumer.
                early = self._requests < EARLY_REQUESTS
                lifetime = random.uniform(0.1, 1.0) if early else random.uniform(0.5, 1.0) * self._expires
                self._requests += 1
                expires_ns = int(min(lifetime, self._expires) * 1e9)
                ask: dict[str, int] = {"batch": want, "expires": expires_ns}
                if lifetime >= 2 * self._heartbeat:  # the server refuses a heartbeat over half the lifetime
                    ask["idle_heartbeat"] = int(self._heartbeat * 1e9)
                request = json.dumps(ask).encode()
                try:
                    await self._nc.publish(self._next, request, reply=self._inbox)
                    self._outstanding += want
                    self._asked = time.monotonic()
                except Exception as exc:  # disconnected: try again shortly
                    log.debug("pull request on %s failed: %s", self._next, exc)
            silent = time.monotonic() - max(self._heard, self._asked)
            if self._outstanding and silent > 2 * self._heartbeat + 1.0:
                # No message, heartbeat or expiry since we last asked: the server lost our requests.
                self._outstanding = 0
                self._heard = time.monotonic()
                continue
            self._wake.clear()
            if self._capacity.free == 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._expires):
                        await self._capacity.wait_for_room()
                continue
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(refused if refused > 0 else self._heartbeat):
                    await self._wake.wait()
