"""Workflows the CLI tests host in a worker subprocess (``flowctl worker tests.cli_workflows:workflows``)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import nats
from pydantic import BaseModel

from flow_orchestrator import NodeContext, RetryPolicy, Workflow


class SumIn(BaseModel):
    a: int
    b: int


wf = Workflow("cli_sum", input_model=SumIn)


@wf.node()
async def parse(ctx: NodeContext) -> dict[str, int]:
    await ctx.data.set("inputs", {"a": ctx.input.a, "b": ctx.input.b})
    return {"a": ctx.input.a, "b": ctx.input.b}


@wf.node(depends_on=[parse], retry=RetryPolicy(max_attempts=3, initial=0.05, jitter=0.0))
async def double(ctx: NodeContext) -> int:
    if ctx.attempt == 1:
        raise RuntimeError("flaky on the first attempt")
    return 2 * int(ctx.output("parse")["a"])


@wf.node(depends_on=[parse])
def square(ctx: NodeContext) -> int:
    return int(ctx.output("parse")["b"]) ** 2


@wf.node(depends_on=[double, square])
async def total(ctx: NodeContext) -> dict[str, Any]:
    inputs = await ctx.data.get_dict("inputs")
    return {"total": ctx.output("double") + ctx.output("square"), "inputs": inputs}


failing = Workflow("cli_fail")


@failing.node()
async def start(ctx: NodeContext) -> str:
    return "started"


@failing.node(depends_on=[start])
async def explode(ctx: NodeContext) -> None:
    raise ValueError("boom: the widget is missing")


@failing.node(depends_on=[explode])
async def after(ctx: NodeContext) -> str:
    return "never"


slow = Workflow("cli_slow")


@slow.node()
async def nap(ctx: NodeContext) -> float:
    seconds = float((ctx.input or {}).get("seconds", 1.0))
    await asyncio.sleep(seconds)
    return seconds


@slow.node(depends_on=[nap])
async def wake(ctx: NodeContext) -> str:
    return "awake"


workflows = [wf, failing, slow]


gated = Workflow("cli_gated")


@gated.node()
async def prepare(ctx: NodeContext) -> str:
    return "ready"


@gated.node(depends_on=[prepare], timeout=60)
async def wait_for_gate(ctx: NodeContext) -> str:
    """Runs until a request arrives on the subject named by the input's ``gate`` (and answers it),
    so a test decides when the run goes on."""
    nc = await nats.connect(os.environ.get("NATS_URL", "nats://127.0.0.1:4222"))
    try:
        sub = await nc.subscribe(ctx.input["gate"], max_msgs=1)
        msg = await sub.next_msg(timeout=None)
        await msg.respond(b"opened")
        return msg.data.decode()
    finally:
        await nc.close()


@gated.node(depends_on=[wait_for_gate])
async def finish(ctx: NodeContext) -> str:
    return f"the gate said {ctx.output('wait_for_gate')}"


# What tests/test_observe.py hosts: the workflows above and one whose run waits for the test.
observed = [*workflows, gated]
