"""A workflow for crash tests: a diamond with a retrying node; every execution is logged to a file."""

from __future__ import annotations

import os
from typing import Any

from flow_orchestrator import NodeContext, RetryPolicy, Workflow

wf = Workflow("crashy")


def _record(ctx: NodeContext) -> None:
    with open(os.path.join(os.environ["FLOW_TEST_MARKERS"], "executions.log"), "a") as log:
        log.write(f"{ctx.run_id} {ctx.node} {ctx.attempt} {os.getpid()}\n")


@wf.node()
async def a(ctx: NodeContext) -> dict[str, Any]:
    _record(ctx)
    await ctx.data.set("seed", ctx.input["x"])
    return {"x": ctx.input["x"]}


@wf.node(depends_on=[a])
async def b(ctx: NodeContext) -> dict[str, Any]:
    _record(ctx)
    return {"b": ctx.output("a")["x"] + 1}


@wf.node(depends_on=[a], retry=RetryPolicy(max_attempts=3, initial=0.3, jitter=0.0))
async def c(ctx: NodeContext) -> dict[str, Any]:
    _record(ctx)
    if ctx.attempt == 1:
        raise ConnectionError("first attempt always fails")
    return {"c": ctx.output("a")["x"] + 2}


@wf.node(depends_on=[b, c])
async def d(ctx: NodeContext) -> dict[str, Any]:
    _record(ctx)
    return {"d": ctx.output("b")["b"] + ctx.output("c")["c"] + await ctx.data.get_int("seed")}
