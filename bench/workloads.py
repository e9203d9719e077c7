"""The benchmark workloads of BENCH-SPEC, as Flow Orchestrator workflows. Each step is a no-op that
takes its upstream outputs and returns a small dict, so data really flows along the edges."""

from __future__ import annotations

import asyncio
from typing import Any

from flow_orchestrator import NodeContext, Workflow


def _chain(length: int) -> Workflow:
    wf = Workflow(f"chain{length}")

    def step(i: int) -> Any:
        async def action(ctx: NodeContext) -> dict[str, int]:
            if i == 0:
                return {"k": 0, "acc": 1}
            prev = ctx.outputs[f"s{i - 1}"]
            return {"k": prev["k"] + 1, "acc": prev["acc"] + 1}

        return action

    for i in range(length):
        wf.node(f"s{i}", depends_on=[f"s{i - 1}"] if i else [])(step(i))
    return wf


def _fan(width: int) -> Workflow:
    wf = Workflow(f"fan{width}")
    leaves = [f"leaf_{i}" for i in range(width)]

    @wf.node()
    async def root(ctx: NodeContext) -> dict[str, int]:
        return {"n": width}

    def leaf(i: int) -> Any:
        async def action(ctx: NodeContext) -> dict[str, int]:
            return {"i": i}

        return action

    for i, name in enumerate(leaves):
        wf.node(name, depends_on=["root"])(leaf(i))

    @wf.node(depends_on=leaves)
    async def join(ctx: NodeContext) -> dict[str, int]:
        values = [ctx.outputs[name]["i"] for name in leaves]
        return {"sum": sum(values), "count": len(values)}

    return wf


def _diamond() -> Workflow:
    # Node names A, B, C, D as in BENCH-SPEC.
    wf = Workflow("diamond4")

    @wf.node()
    async def A(ctx: NodeContext) -> dict[str, int]:
        return {"x": ctx.input["x"]}

    @wf.node(depends_on=[A])
    async def B(ctx: NodeContext) -> dict[str, int]:
        return {"b": ctx.outputs["A"]["x"] + 1}

    @wf.node(depends_on=[A])
    async def C(ctx: NodeContext) -> dict[str, int]:
        return {"c": ctx.outputs["A"]["x"] + 2}

    @wf.node(depends_on=[B, C])
    async def D(ctx: NodeContext) -> dict[str, int]:
        return {"d": ctx.outputs["B"]["b"] + ctx.outputs["C"]["c"]}

    return wf


def _io(width: int) -> Workflow:
    wf = Workflow(f"io{width}")
    leaves = [f"io_{i}" for i in range(width)]

    @wf.node()
    async def root(ctx: NodeContext) -> dict[str, int]:
        return {"n": width}

    async def wait(ctx: NodeContext) -> dict[str, bool]:
        await asyncio.sleep(0.05)
        return {"ok": True}

    for name in leaves:
        wf.node(name, depends_on=["root"])(wait)

    @wf.node(depends_on=leaves)
    async def join(ctx: NodeContext) -> dict[str, int]:
        return {"count": sum(1 for name in leaves if ctx.outputs[name]["ok"])}

    return wf


chain20 = _chain(20)
fan100 = _fan(100)
diamond4 = _diamond()
io50 = _io(50)
all_workflows = [chain20, fan100, diamond4, io50]


def _hold(seconds: float) -> Workflow:
    """For the memory figure: ``first`` returns at once, ``slow`` holds its run for ``seconds``."""
    wf = Workflow("hold")

    @wf.node()
    async def first(ctx: NodeContext) -> dict[str, Any]:
        return {"i": ctx.input["i"]}

    @wf.node(depends_on=[first])
    async def slow(ctx: NodeContext) -> dict[str, Any]:
        await asyncio.sleep(seconds)
        return ctx.outputs["first"]

    return wf


hold = _hold(120.0)
