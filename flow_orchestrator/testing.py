"""Testing helpers for users: a local environment (embedded NATS server, workers, a client) and a way
to run one node's action in isolation against real run data.

    async with LocalEnvironment([order]) as env:
        result = await env.client.run("order", {"order_id": "o-1"})
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

from flow_orchestrator.bus._connection import Bus, connect
from flow_orchestrator.bus._interceptors import Interceptor
from flow_orchestrator.bus._server import EmbeddedServer
from flow_orchestrator.bus._streams import StorageSettings, provision
from flow_orchestrator.bus._subjects import Names
from flow_orchestrator.runtime._client import Client
from flow_orchestrator.runtime._context import NodeContext
from flow_orchestrator.runtime._data import WorkflowData
from flow_orchestrator.runtime._worker import Worker
from flow_orchestrator.runtime._workflow import Workflow

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T | None]] | Callable[[], T | None],
    *,
    within: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
    retry_on: tuple[type[BaseException], ...] = (AssertionError, LookupError),
) -> T:
    """Poll ``check`` until it returns something truthy (returned), or fail after ``within`` seconds.

    Exceptions in ``retry_on`` (failed assertions, not-found errors) mean "not yet"; others propagate.
    """
    deadline = time.monotonic() + within
    last_error: BaseException | None = None
    while True:
        try:
            result = check()
            value = await result if isinstance(result, Awaitable) else result
            if value:
                return value
        except retry_on as exc:  # not yet: a failed assertion, or a run/key that does not exist yet
            last_error = exc
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{message} not met within {within}s" + (f": {last_error}" if last_error else "")
            )
        await asyncio.sleep(interval)


class LocalEnvironment:
    """An embedded nats-server (or ``nats_url``), ``workers`` worker(s) hosting ``workflows``, a client.

    Each environment uses its own subject prefix, so several can share one server.
    """

    def __init__(
        self,
        workflows: Workflow | Sequence[Workflow] = (),
        *,
        nats_url: str | None = None,
        workers: int = 1,
        interceptors: Sequence[Interceptor] = (),
        prefix: str | None = None,
        **worker_options: Any,
    ) -> None:
        self.workflows = [workflows] if isinstance(workflows, Workflow) else list(workflows)
        self.prefix = prefix or f"t{uuid.uuid4().hex[:10]}"
        self.names = Names(self.prefix)
        self._url = nats_url
        self._server: EmbeddedServer | None = None
        self._worker_count = workers
        self.interceptors = list(interceptors)
        self.worker_options = worker_options
        self.workers: list[Worker] = []
        self._client: Client | None = None

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("the environment has not started")
        return self._url

    @property
    def client(self) -> Client:
        if self._client is None:
            raise RuntimeError("the environment has not started")
        return self._client

    async def start(self) -> None:
        if self._url is None:
            self._server = EmbeddedServer()
            self._url = await asyncio.to_thread(self._server.start)
        for _ in range(self._worker_count if self.workflows else 0):
            await self.add_worker()
        self._client = await Client.connect(self._url, prefix=self.prefix)

    async def add_worker(self, **options: Any) -> Worker:
        worker = Worker(
            self.workflows,
            nats_url=self.url,
            prefix=self.prefix,
            interceptors=self.interceptors,
            **{**self.worker_options, **options},
        )
        await worker.start()
        self.workers.append(worker)
        return worker

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()
        for worker in self.workers:
            await worker.stop()
        self.workers.clear()
        if self._server is not None:
            await asyncio.to_thread(self._server.stop)

    async def __aenter__(self) -> LocalEnvironment:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def run_node(
        self,
        workflow: Workflow,
        node: str,
        *,
        input: Any = None,
        outputs: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        run_id: str | None = None,
        attempt: int = 1,
    ) -> Any:
        """Run one node's action alone, with the given upstream outputs and run data (in real KV)."""
        spec = workflow.definition.nodes[node]
        bus: Bus = await connect(self.url)
        try:
            store = await provision(bus.js, self.names, StorageSettings(), update=False)
            run_data = WorkflowData(store, run_id or f"isolated-{uuid.uuid4().hex[:8]}")
            for key, value in (data or {}).items():
                await run_data.set(key, value)
            ctx = NodeContext(
                workflow=workflow.name,
                run_id=run_data.run_id,
                node=node,
                attempt=attempt,
                raw_input=input,
                input_model=workflow.input_model,
                outputs=dict(outputs or {}),
                data=run_data,
            )
            if spec.is_async:
                return await spec.action(ctx)
            return await asyncio.to_thread(spec.action, ctx)
        finally:
            await bus.close()
