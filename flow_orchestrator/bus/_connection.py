"""The NATS connection: reconnects forever, logs its life, and drains on shutdown."""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext

from flow_orchestrator._bounded import remember

log = logging.getLogger("flow_orchestrator.bus")
DEFAULT_URL = "nats://127.0.0.1:4222"
# The server refuses a publish with an error on the connection, not with a reply: the request then
# only times out. What it refused is kept so that the timeout can be reported as what it is.
_REFUSED_PUBLISH = re.compile(r'permissions violation for publish to "([^"]+)"', re.IGNORECASE)
REFUSALS_KEPT = 256


@dataclass(slots=True)
class Bus:
    """An open connection and its JetStream context."""

    nc: NatsClient
    js: JetStreamContext
    # Called after each reconnection: a restarted server has forgotten this connection's pull requests,
    # and what was published meanwhile never reached its plain subscriptions. A set: each waiting
    # client call adds and removes itself, thousands at once in a batch of runs.
    reconnected: set[Callable[[], None]] = field(default_factory=set)
    # Subjects (lower case, as the client reports them) the server refused to let us publish to.
    refused: OrderedDict[str, str] = field(default_factory=OrderedDict)
    refusals: int = 0  # how many refusals this connection got (a repeat of a subject counts again)

    def refusal(self, subject: str) -> str | None:
        """The server's words if it refused a publish to ``subject`` on this connection."""
        return self.refused.get(subject.lower())

    def refusal_since(self, count: int) -> tuple[str, str] | None:
        """The latest refusal (subject, the server's words), if any came after the ``count``-th."""
        if self.refusals <= count or not self.refused:
            return None
        return next(reversed(self.refused.items()))

    async def close(self) -> None:
        """Drain: flush what was published and deliver what was received, then close."""
        if not self.nc.is_closed:
            try:
                await self.nc.drain()
            except Exception as exc:  # draining a broken connection: close is all that is left
                log.debug("drain failed (%s); closing", exc)
                await self.nc.close()


def _split_urls(url: str) -> list[str]:
    return [part.strip() for part in url.split(",") if part.strip()]


async def connect(
    url: str = DEFAULT_URL,
    *,
    name: str = "flow-orchestrator",
    connect_timeout: float = 5.0,
    first_attempts: int = 8,
    user_credentials: str | None = None,
) -> Bus:
    """Connect to NATS (a comma-separated list of servers is fine).

    The first connection gives up after ``first_attempts`` tries per server (a wrong URL fails fast
    with ``nats.errors.NoServersError``); once connected, it reconnects forever.
    """

    async def on_error(exc: Exception) -> None:
        log.warning("nats connection error: %s", exc)
        refused = _REFUSED_PUBLISH.search(str(exc))
        if refused is not None:
            remember(bus.refused, refused.group(1).lower(), str(exc), REFUSALS_KEPT)
            bus.refusals += 1

    async def on_disconnected() -> None:
        if not (nc.is_closed or nc.is_draining):
            log.warning("disconnected from NATS; reconnecting")

    async def on_reconnected() -> None:
        log.info("reconnected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?")
        for listener in list(bus.reconnected):
            try:
                listener()
            except Exception:  # one listener's bug must not keep the others from hearing
                log.exception("a reconnection listener failed")

    nc = await nats.connect(
        servers=_split_urls(url),
        name=name,
        connect_timeout=connect_timeout,
        max_reconnect_attempts=first_attempts,
        reconnect_time_wait=0.25,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnected,
        reconnected_cb=on_reconnected,
        user_credentials=user_credentials,
    )
    # nats-py applies one limit to the first connection and to reconnections; from now on a lost
    # connection is retried forever (workers must ride out server restarts and leader changes).
    nc.options["max_reconnect_attempts"] = -1
    bus = Bus(nc=nc, js=nc.jetstream())
    return bus
