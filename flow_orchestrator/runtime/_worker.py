"""The worker process: connects, provisions, registers its workflows and hosts their actors.

SIGINT/SIGTERM drain it: consumers stop delivering, in-flight attempts finish (up to the grace
period), and whatever could not finish is released unacknowledged for another worker. Nothing is
acknowledged before its effect is durable, so a drain (or a kill) loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Any

from flow_orchestrator._errors import StateConflict
from flow_orchestrator.actors._actor import Actor
from flow_orchestrator.actors._node import NodeActor
from flow_orchestrator.actors._supervisor import SupervisorActor
from flow_orchestrator.actors._system import ActorSystem
from flow_orchestrator.actors._trigger import TriggerActor, TriggerRouter
from flow_orchestrator.bus._codec import DEFAULT_MAX_PAYLOAD
from flow_orchestrator.bus._connection import DEFAULT_URL, Bus, connect
from flow_orchestrator.bus._interceptors import Interceptor, InterceptorChain
from flow_orchestrator.bus._streams import StorageSettings, provision
from flow_orchestrator.bus._subjects import Names
from flow_orchestrator.runtime._interceptors import PayloadValidationInterceptor, accept_trigger, run_action
from flow_orchestrator.runtime._workflow import Workflow, WorkflowDefinition

log = logging.getLogger("flow_orchestrator.worker")


class Worker:
    """Hosts workflows' actors on NATS. ``async with Worker(...)`` or ``await worker.run()``.

    Args:
        workflows: one workflow or several.
        nats_url: server URL(s), comma-separated; default ``$NATS_URL`` or ``nats://127.0.0.1:4222``.
        interceptors: message interceptors, first = outermost.
        prefix: subject/stream prefix, to share one NATS account between isolated deployments.
        storage: replicas (3 on a cluster) and retention.
        concurrency: messages one actor handles at once on this worker.
        max_in_flight: messages this worker holds at once across all its actors; beyond that, work
            stays in JetStream for other workers (back-pressure).
        unknown_workflow_grace: seconds a trigger for an unregistered workflow waits before being
            dead-lettered (a worker hosting it may be starting).
        ack_wait: seconds a worker may hold a message without a heartbeat before it moves on
            (how fast the work of a killed worker resumes elsewhere).
        max_deliver: deliveries of one message before the worker gives up on it; it is then
            dead-lettered (reason ``max_deliveries``) and a node waiting on it fails its run. (The
            server allows one delivery more, taken only if the give-up itself was interrupted.)
        shutdown_grace: seconds in-flight attempts get to finish when the worker stops.
        announce_starts_after: seconds an attempt runs before its ``started`` event is published;
            a quicker attempt is told by its outcome event alone, which carries the same start time
            and worker (one stored message less per step). 0 announces every attempt as it starts.
    """

    def __init__(
        self,
        workflows: Workflow | Sequence[Workflow],
        *,
        nats_url: str | None = None,
        interceptors: Sequence[Interceptor] = (),
        prefix: str = "flow",
        storage: StorageSettings | None = None,
        concurrency: int = 256,
        max_in_flight: int = 1024,
        max_trigger_bytes: int = DEFAULT_MAX_PAYLOAD,
        unknown_workflow_grace: float = 30.0,
        ack_wait: float = 30.0,
        max_deliver: int = 20,
        shutdown_grace: float = 30.0,
        announce_starts_after: float = 0.1,
        sync_threads: int = 32,
        worker_id: str | None = None,
    ) -> None:
        items = [workflows] if isinstance(workflows, Workflow) else list(workflows)
        self.definitions: list[WorkflowDefinition] = [wf.definition for wf in items]
        self.nats_url = nats_url or os.environ.get("NATS_URL", DEFAULT_URL)
        self.interceptors = list(interceptors)
        self.names = Names(prefix)
        self.storage = storage or StorageSettings()
        self.concurrency = concurrency
        self.max_in_flight = max_in_flight
        self.max_trigger_bytes = max_trigger_bytes
        self.unknown_workflow_grace = unknown_workflow_grace
        self.ack_wait = ack_wait
        self.max_deliver = max_deliver
        self.shutdown_grace = shutdown_grace
        # The same bounds as flowctl's options: no unlimited redelivery, no timer that never fires.
        for name, count in (
            ("concurrency", concurrency),
            ("max_in_flight", max_in_flight),
            ("max_deliver", max_deliver),
        ):
            if count < 1:
                raise ValueError(f"{name} must be 1 or more, got {count}")
        if not 0 < ack_wait < math.inf:  # also refuses nan
            raise ValueError(f"ack_wait must be more than 0 seconds (and finite), got {ack_wait}")
        if not 0 <= announce_starts_after < math.inf:
            raise ValueError(
                f"announce_starts_after must be 0 or more seconds (and finite), got {announce_starts_after}"
            )
        self.announce_starts_after = announce_starts_after
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._executor = ThreadPoolExecutor(max_workers=sync_threads, thread_name_prefix="flow-action")
        self._bus: Bus | None = None
        self._actors: list[Actor] = []
        self._stopped = asyncio.Event()
        self.system: ActorSystem | None = None
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, provision streams and state, register the workflows, start every actor."""
        self._bus = await connect(self.nats_url, name=f"flow-worker {self.worker_id}")
        store = await provision(self._bus.js, self.names, self.storage)
        system = ActorSystem(
            bus=self._bus,
            names=self.names,
            store=store,
            worker_id=self.worker_id,
            executor=self._executor,
            max_trigger_bytes=self.max_trigger_bytes,
            unknown_workflow_grace=self.unknown_workflow_grace,
            max_in_flight=self.max_in_flight,
        )
        chain = [*self.interceptors]
        if not any(isinstance(i, PayloadValidationInterceptor) for i in chain):
            chain.append(PayloadValidationInterceptor())
        system.chain = InterceptorChain(
            chain, receive_trigger=accept_trigger, execute_node=run_action, publish=system.publish_terminal
        )
        system.announce_starts_after = self.announce_starts_after
        self.system = system
        await system.open_gate()
        options: dict[str, Any] = {
            "concurrency": self.concurrency,
            "ack_wait": self.ack_wait,
            "max_deliver": self.max_deliver,
        }
        for definition in self.definitions:
            registered_at = await self._register(system, definition)
            start_time = dt.datetime.fromtimestamp(
                max(0.0, registered_at - self.unknown_workflow_grace), tz=dt.UTC
            )
            self._actors.append(SupervisorActor(system, definition, **options))
            for spec in definition.nodes.values():
                self._actors.append(NodeActor(system, definition, spec, **options))
            self._actors.append(TriggerActor(system, definition, start_time=start_time, **options))
        self._actors.append(TriggerRouter(system, **options))
        # Node actors first and triggers last, so no run starts before its nodes listen.
        for actor in self._actors:
            await actor.start()
        self._refresher = asyncio.create_task(self._refresh_registry(system), name="registry-refresh")
        log.info(
            "worker %s hosting %s on %s",
            self.worker_id,
            ", ".join(d.name for d in self.definitions),
            self.nats_url,
        )

    async def _register(self, system: ActorSystem, definition: WorkflowDefinition) -> float:
        """Record the workflow in the registry; keep its first registration time (trigger ownership)."""
        now = time.time()
        key = Names.workflow_key(definition.name)
        description = definition.describe()

        def register(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is not None and current.get("hash") == description["hash"]:
                return None
            first = current["registered_at"] if current else now
            return {**description, "registered_at": first, "updated_at": now}

        for _ in range(3):
            try:
                await system.store.mutate(key, register)
                break
            except StateConflict:
                continue
        found = await system.store.get(key)
        return float(found.value["registered_at"]) if found else now

    async def _refresh_registry(self, system: ActorSystem) -> None:
        """Rewrite the registry records now and then, so the state TTL never expires a workflow this
        worker still serves (runs' own records expire; the registry must not)."""
        interval = max(1.0, self.storage.state_ttl / 4)
        while True:
            await asyncio.sleep(interval)
            for definition in self.definitions:
                now = time.time()

                def touch(current: dict[str, Any] | None, now: float = now) -> dict[str, Any] | None:
                    return {**current, "seen_at": now} if current is not None else None

                try:
                    written, _ = await system.store.mutate(Names.workflow_key(definition.name), touch)
                    if written is None:  # expired while no worker ran: register it again
                        await self._register(system, definition)
                except Exception as exc:  # a disconnection: next round
                    log.warning("could not refresh the registry record of %s: %s", definition.name, exc)

    async def stop(self) -> None:
        """Drain: stop deliveries, let in-flight work finish (``shutdown_grace``), close the connection."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._refresher is not None:
            self._refresher.cancel()
        await asyncio.gather(
            *(actor.stop(self.shutdown_grace) for actor in reversed(self._actors)), return_exceptions=True
        )
        self._actors.clear()
        if self.system is not None:
            await self.system.close_gate()
        if self._bus is not None:
            await self._bus.close()
        self._executor.shutdown(wait=False, cancel_futures=True)
        log.info("worker %s stopped", self.worker_id)

    async def run(self) -> None:
        """Start, serve until SIGINT or SIGTERM (or :meth:`stop`), then drain."""
        loop = asyncio.get_running_loop()
        stop_requested = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop_requested.set)
        # A signal during start() (say, while the server is unreachable) must still stop the worker.
        starting = asyncio.create_task(self.start())
        requested = asyncio.create_task(stop_requested.wait())
        try:
            await asyncio.wait([starting, requested], return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # raise a failed start
                stopped = asyncio.create_task(self._stopped.wait())
                await asyncio.wait([requested, stopped], return_when=asyncio.FIRST_COMPLETED)
                stopped.cancel()
            else:
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
        finally:
            requested.cancel()
            await self.stop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    @property
    def in_flight(self) -> int:
        return sum(actor.in_flight for actor in self._actors)

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
