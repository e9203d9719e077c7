"""The actor base: one durable JetStream consumer shared by every worker, a bounded mailbox, a lifecycle.

Each actor owns a durable pull consumer shared by all workers, so a message goes to exactly one
worker at a time and the work spreads across processes. A credit-based pull feed is the mailbox: it
takes only as many messages as the actor (``concurrency``) and the worker (``max_in_flight``) have
room for, so surplus work waits in JetStream for whichever worker is free. Each message is handled
in its own task so one slow action never blocks the others.
Messages held longer than a third of the ack wait get ``in_progress`` heartbeats, so a long action is
not mistaken for a dead worker, while a killed worker's messages come back after the ack wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from flow_orchestrator._errors import ActorStopped, FlowError, MessageError
from flow_orchestrator.actors._system import ActorSystem
from flow_orchestrator.bus._pull import Capacity, PullFeed

log = logging.getLogger("flow_orchestrator.actors")
TRANSIENT = (nats.errors.Error, js_errors.Error, asyncio.TimeoutError, ConnectionError, OSError)
GIVE_UP_TRIES = 20  # about a minute and a half of backoff for a message's last delivery


def _server_max_deliver(max_deliver: int) -> int:
    """The server's limit for a consumer whose worker gives up at delivery ``max_deliver``: one
    more, so that a give-up interrupted (its worker stopped, or died, meanwhile) is done again by
    the next worker instead of the message being dropped undelivered. (-1 or 1: no give-up.)"""
    return max_deliver + 1 if max_deliver > 1 else max_deliver


@dataclass(frozen=True, slots=True)
class ConsumerSpec:
    """A durable consumer: which stream, which subjects, how long a worker may hold a message."""

    stream: str
    durable: str
    filter_subjects: tuple[str, ...]
    ack_wait: float = 30.0
    max_deliver: int = 20
    max_ack_pending: int = 10_000
    deliver_policy: DeliverPolicy = DeliverPolicy.ALL
    opt_start_time: datetime.datetime | None = None
    extra: dict[str, object] = field(default_factory=dict)


class Actor:
    """Base class of node, supervisor and trigger actors.

    Subclasses implement :meth:`receive`, which must ack, nak or term the message. The base class
    handles the rest: an exception of type :class:`MessageError` (or a message redelivered more than
    ``poison_after`` times) is dead-lettered and terminated; any other exception is retried with a
    growing delay.
    """

    poison_after = 10

    def __init__(
        self,
        system: ActorSystem,
        spec: ConsumerSpec,
        *,
        concurrency: int = 256,
        capacity: Capacity | None = None,
        max_deliver: int | None = None,
    ) -> None:
        if max_deliver is not None:
            spec = dataclasses.replace(spec, max_deliver=max_deliver)
        self.system = system
        self.spec = spec
        self.name = spec.durable
        self._concurrency = concurrency
        # Node attempts share the worker's budget (max_in_flight); bookkeeping actors (triggers,
        # supervisor) get their own, so a worker full of long actions still starts and finishes runs.
        self._capacity = capacity or Capacity(concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._held: dict[int, tuple[Msg, float]] = {}
        self._feed: PullFeed | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._stopping = False

    # --- lifecycle hooks: documented no-ops -------------------------------------------------------
    async def on_start(self) -> None:
        """Runs once before the consumer starts delivering. If it raises, the actor does not start."""

    async def on_stop(self) -> None:
        """Runs once after the last in-flight message finished or was released. Errors are logged."""

    async def on_failure(self, msg: Msg, error: BaseException) -> None:
        """Runs when handling ``msg`` raised ``error`` (after the message was nak'd or dead-lettered).
        Errors raised here are logged and otherwise ignored."""

    async def receive(self, msg: Msg) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- mechanics --------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.on_start()
        config = ConsumerConfig(
            durable_name=self.spec.durable,
            filter_subjects=list(self.spec.filter_subjects),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.spec.ack_wait,
            max_deliver=_server_max_deliver(self.spec.max_deliver),
            max_ack_pending=self.spec.max_ack_pending,
            max_waiting=4096,
            deliver_policy=self.spec.deliver_policy,
            opt_start_time=self.spec.opt_start_time,
            **self.spec.extra,  # type: ignore[arg-type]
        )
        await self.system.ensure_consumer(self.spec.stream, config)
        self._feed = PullFeed(
            self.system.bus.nc,
            api_prefix=self.system.api_prefix,
            stream=self.spec.stream,
            consumer=self.spec.durable,
            handle=self._dispatch,
            capacity=self._capacity,
            batch=self._concurrency,
        )
        await self._feed.start()
        self.system.bus.reconnected.add(self._feed.forget_requests)
        self._heartbeat = asyncio.create_task(self._heartbeats(), name=f"{self.name}-heartbeat")

    async def _dispatch(self, msg: Msg) -> None:
        task = asyncio.create_task(self._handle(msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, msg: Msg) -> None:
        try:
            self._held[id(msg)] = (msg, time.monotonic())
            delivered = _num_delivered(msg)
            if delivered >= self.spec.max_deliver > 1:
                # Every earlier delivery crashed or stalled a worker: do not run it again.
                await self._give_up(msg, delivered)
                return
            await self.receive(msg)
        except asyncio.CancelledError:
            # Stopping: leave the message for another worker, promptly.
            with contextlib.suppress(Exception):
                await msg.nak()
            raise
        except MessageError as exc:
            await self._reject(msg, exc)
        except Exception as exc:
            await self._retry_later(msg, exc)
        finally:
            self._held.pop(id(msg), None)
            if self._feed is not None:
                self._feed.done()

    async def give_up(self, msg: Msg, delivered: int) -> None:
        """The last allowed delivery of a message every earlier delivery of which crashed or stalled
        its worker: dead-letter it (see :meth:`ActorSystem.give_up`)."""
        await self.system.give_up(msg, self.spec.durable, delivered)
        await msg.term()

    async def _give_up(self, msg: Msg, delivered: int) -> None:
        """:meth:`give_up`, tried again in place through transient errors (the server delivers the
        message no more, so this is its last chance; heartbeats keep it held meanwhile). Should that
        keep failing, the message is still dead-lettered, without its report."""
        delay = 0.1
        for _ in range(GIVE_UP_TRIES):
            try:
                await self.give_up(msg, delivered)
                return
            except TRANSIENT as exc:
                subject = msg.subject
                log.warning("%s: giving up on %s failed (%r); again in %.1fs", self.name, subject, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception as exc:
                log.error("%s: giving up on %s failed: %r", self.name, msg.subject, exc)
                break
        try:
            error = "its last delivery could not be handled"
            await self.system.dead_letter(msg, reason="max_deliveries", error=error)
            await msg.term()
        except Exception as exc:
            log.error("%s: %s is lost: it could not be dead-lettered (%r)", self.name, msg.subject, exc)

    async def _reject(self, msg: Msg, exc: BaseException) -> None:
        reason = exc.reason if isinstance(exc, MessageError) else "poison"
        try:
            await self.system.dead_letter(msg, reason=reason, error=exc)
            await msg.term()
        except Exception as dlq_exc:
            log.error(
                "%s: could not dead-letter %s (%s); leaving it for redelivery",
                self.name,
                msg.subject,
                dlq_exc,
            )
            with contextlib.suppress(Exception):
                await msg.nak(delay=1.0)
        log.warning("%s: dead-lettered %s: %s: %s", self.name, msg.subject, type(exc).__name__, exc)
        await self._notify_failure(msg, exc)

    async def _retry_later(self, msg: Msg, exc: BaseException) -> None:
        delivered = _num_delivered(msg)
        if delivered >= self.poison_after and not isinstance(exc, TRANSIENT):
            await self._reject(msg, exc)
            return
        delay = min(0.05 * 2**delivered, 10.0)
        level = logging.DEBUG if isinstance(exc, (*TRANSIENT, FlowError)) else logging.ERROR
        log.log(
            level,
            "%s: %s failed (%s: %s); redelivery in %.2fs",
            self.name,
            msg.subject,
            type(exc).__name__,
            exc,
            delay,
            exc_info=level == logging.ERROR,
        )
        with contextlib.suppress(Exception):
            await msg.nak(delay=delay)
        await self._notify_failure(msg, exc)

    async def _notify_failure(self, msg: Msg, exc: BaseException) -> None:
        try:
            await self.on_failure(msg, exc)
        except Exception:
            log.exception("%s: on_failure raised", self.name)

    async def _heartbeats(self) -> None:
        interval = self.spec.ack_wait / 3
        while True:
            await asyncio.sleep(interval)
            threshold = time.monotonic() - interval
            for msg, since in list(self._held.values()):
                if since < threshold:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop taking messages, let in-flight ones finish for ``grace`` seconds, then release the rest
        (nak'd, so another worker takes them at once). Pending work fails with :class:`ActorStopped`."""
        if self._stopping:
            return
        self._stopping = True
        if self._feed is not None:
            self.system.bus.reconnected.discard(self._feed.forget_requests)
            await self._feed.stop()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
            for task in pending:
                task.cancel(msg=str(ActorStopped(f"actor {self.name} stopped before this message finished")))
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        try:
            await self.on_stop()
        except Exception:
            log.exception("%s: on_stop raised", self.name)


def _num_delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:
        return 1
