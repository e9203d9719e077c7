"""The asyncio floor: the same workflows run in one process with no bus and no persistence (a dict of
nodes, a task per node, a future per node's output). What the workloads cost with orchestration free."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from flow_orchestrator import Workflow
from flow_orchestrator.runtime import WorkflowDefinition


@dataclass(frozen=True, slots=True)
class FloorContext:
    """What the benchmark actions read from their context: the run's input and upstream outputs."""

    input: Any
    outputs: dict[str, Any]


class AsyncioFloor:
    """Runs workflows by name: ``await floor.run("chain20", {})`` returns the sink's output."""

    def __init__(self, workflows: list[Workflow]) -> None:
        self._definitions = {wf.name: wf.definition for wf in workflows}

    async def run(self, workflow: str, input: Any) -> Any:
        definition = self._definitions[workflow]
        loop = asyncio.get_running_loop()
        futures: dict[str, asyncio.Future[Any]] = {name: loop.create_future() for name in definition.order}
        await asyncio.gather(*(self._node(definition, name, input, futures) for name in definition.order))
        sinks = definition.sinks
        if len(sinks) == 1:
            return futures[sinks[0]].result()
        return {name: futures[name].result() for name in sinks}

    @staticmethod
    async def _node(
        definition: WorkflowDefinition, name: str, input: Any, futures: dict[str, asyncio.Future[Any]]
    ) -> None:
        spec = definition.nodes[name]
        outputs = {up: await futures[up] for up in spec.upstreams}
        result = spec.action(FloorContext(input, outputs))
        futures[name].set_result(await result if spec.is_async else result)
