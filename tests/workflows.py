"""Workflows used by the integration tests, importable by worker subprocesses too."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pydantic import BaseModel, Field

from flow_orchestrator import NodeContext, NonRetryableError, RetryPolicy, Workflow


def chain(length: int, name: str = "chain") -> Workflow:
    """``s0 -> s1 -> ...``: s0 returns k=0, acc=1; each next adds 1 to both (BENCH-SPEC W1)."""
    wf = Workflow(name)

    def step(i: int) -> Any:
        async def action(ctx: NodeContext) -> dict[str, int]:
            if i == 0:
                return {"k": 0, "acc": 1}
            prev = ctx.output(f"s{i - 1}")
            return {"k": prev["k"] + 1, "acc": prev["acc"] + 1}

        action.__name__ = f"s{i}"
        return action

    for i in range(length):
        wf.node(f"s{i}", depends_on=[f"s{i - 1}"] if i else [])(step(i))
    return wf


def fan(width: int, name: str = "fan") -> Workflow:
    """``root -> leaf_0..leaf_{width-1} -> join`` (BENCH-SPEC W2 shape)."""
    wf = Workflow(name)

    @wf.node()
    async def root(ctx: NodeContext) -> dict[str, int]:
        return {"n": width}

    def leaf(i: int) -> Any:
        async def action(ctx: NodeContext) -> dict[str, int]:
            assert ctx.output("root") == {"n": width}
            return {"i": i}

        return action

    leaves = [f"leaf_{i}" for i in range(width)]
    for i, leaf_name in enumerate(leaves):
        wf.node(leaf_name, depends_on=["root"])(leaf(i))

    @wf.node(depends_on=leaves)
    async def join(ctx: NodeContext) -> dict[str, int]:
        values = [ctx.output(name)["i"] for name in leaves]
        return {"sum": sum(values), "count": len(values)}

    return wf


class OrderIn(BaseModel):
    order_id: str
    amount: float = Field(gt=0)


diamond = Workflow("diamond", input_model=OrderIn)


@diamond.node()
async def validate(ctx: NodeContext) -> dict[str, Any]:
    await ctx.data.set("order_id", ctx.input.order_id)
    return {"amount": ctx.input.amount}


@diamond.node(depends_on=[validate])
def reserve(ctx: NodeContext) -> dict[str, Any]:
    # A plain function: runs in the worker's thread pool.
    time.sleep(0.01)
    return {"reserved": True, "thread": "sync"}


@diamond.node(depends_on=[validate])
async def charge(ctx: NodeContext) -> dict[str, Any]:
    await ctx.data.set("payment_id", f"pmt-{ctx.input.order_id}")
    return {"charged": ctx.output("validate")["amount"]}


@diamond.node(depends_on=[reserve, charge])
async def ship(ctx: NodeContext) -> dict[str, Any]:
    payment = await ctx.data.get_str("payment_id")
    return {
        "shipped": ctx.output("reserve")["reserved"],
        "payment": payment,
        "charged": ctx.output("charge")["charged"],
    }


# Node behaviour for the failure tests is chosen by the run's input, so one definition serves all.
failing = Workflow("failing")


@failing.node()
async def start(ctx: NodeContext) -> dict[str, Any]:
    return {"ok": True}


@failing.node(
    depends_on=[start], retry=RetryPolicy(max_attempts=3, initial=0.05, backoff=1.0, jitter=0.0), timeout=1.0
)
async def flaky(ctx: NodeContext) -> dict[str, Any]:
    mode = ctx.input["mode"]
    if mode == "flaky" and ctx.attempt < 3:
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")
    if mode == "fatal":
        raise NonRetryableError("card declined")
    if mode == "always":
        raise RuntimeError("still broken")
    if mode == "slow":
        await asyncio.sleep(5)
    return {"attempt": ctx.attempt}


@failing.node(depends_on=[flaky])
async def after(ctx: NodeContext) -> dict[str, Any]:
    return {"after": ctx.output("flaky")}


@failing.node(depends_on=[start])
async def side(ctx: NodeContext) -> dict[str, Any]:
    await asyncio.sleep(0.2)
    return {"side": True}


@failing.node(depends_on=[after, side])
async def end(ctx: NodeContext) -> dict[str, Any]:
    return {"end": True}


tolerant = Workflow("tolerant")


@tolerant.node(continue_on_error=True)
async def optional(ctx: NodeContext) -> dict[str, Any]:
    raise RuntimeError("optional enrichment unavailable")


@tolerant.node()
async def required(ctx: NodeContext) -> dict[str, Any]:
    return {"required": True}


@tolerant.node(depends_on=[optional, required])
async def combine(ctx: NodeContext) -> dict[str, Any]:
    return {"optional": ctx.output("optional"), "required": ctx.output("required")}


# Two worker processes share this one: every execution appends "<run> <node> <pid>" to a file, so the
# test can count executions per (run, node) and see that both processes did work.
counted = Workflow("counted")


def _record(ctx: NodeContext) -> None:
    path = os.path.join(os.environ["FLOW_TEST_MARKERS"], "executions.log")
    with open(path, "a") as log:
        log.write(f"{ctx.run_id} {ctx.node} {os.getpid()}\n")


@counted.node()
async def begin(ctx: NodeContext) -> dict[str, Any]:
    _record(ctx)
    return {"n": 6}


def _counted_leaf(i: int) -> Any:
    async def action(ctx: NodeContext) -> dict[str, Any]:
        _record(ctx)
        await asyncio.sleep(0.005)
        return {"i": i}

    return action


for _i in range(6):
    counted.node(f"work_{_i}", depends_on=["begin"])(_counted_leaf(_i))


@counted.node(depends_on=[f"work_{i}" for i in range(6)])
async def finish(ctx: NodeContext) -> dict[str, Any]:
    _record(ctx)
    return {"sum": sum(ctx.output(f"work_{i}")["i"] for i in range(6))}
