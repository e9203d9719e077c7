"""Workflows for the fault tests (``test_faults.py``), importable by worker subprocesses.

Every execution appends ``"<run> <node> <pid>"`` to ``$FLOW_TEST_MARKERS/executions.log`` *before*
it does its work, so an execution cut short by a fault is still counted. The actions touch nothing
but the clock and that file: a repeated execution can then only come from the engine re-running an
attempt, never from a retry of a failed action.
"""

from __future__ import annotations

import asyncio
import os
import random
from typing import Any

from flow_orchestrator import NodeContext, Workflow


def record_execution(ctx: NodeContext) -> None:
    """Append one line per execution; lines this short are written atomically with O_APPEND."""
    path = os.path.join(os.environ["FLOW_TEST_MARKERS"], "executions.log")
    with open(path, "a") as log:
        log.write(f"{ctx.run_id} {ctx.node} {os.getpid()}\n")


async def _work() -> None:
    await asyncio.sleep(random.uniform(0.05, 0.2))


# ingest -> (double, square) -> combine -> report: a fork, a join and a tail, 5 nodes, ~0.5 s a run.
relay = Workflow("relay")


@relay.node()
async def ingest(ctx: NodeContext) -> dict[str, Any]:
    record_execution(ctx)
    await _work()
    return {"x": int(ctx.input["x"])}


@relay.node(depends_on=[ingest])
async def double(ctx: NodeContext) -> dict[str, Any]:
    record_execution(ctx)
    await _work()
    return {"v": 2 * ctx.output("ingest")["x"]}


@relay.node(depends_on=[ingest])
async def square(ctx: NodeContext) -> dict[str, Any]:
    record_execution(ctx)
    await _work()
    return {"v": ctx.output("ingest")["x"] ** 2}


@relay.node(depends_on=[double, square])
async def combine(ctx: NodeContext) -> dict[str, Any]:
    record_execution(ctx)
    await _work()
    return {"v": ctx.output("double")["v"] + ctx.output("square")["v"]}


@relay.node(depends_on=[combine])
async def report(ctx: NodeContext) -> dict[str, Any]:
    record_execution(ctx)
    await _work()
    return {"x": ctx.input["x"], "result": ctx.output("combine")["v"]}


RELAY_NODES = ("ingest", "double", "square", "combine", "report")


def relay_expected(x: int) -> dict[str, int]:
    """The output of a ``relay`` run with input ``{"x": x}``."""
    return {"x": x, "result": 2 * x + x * x}
