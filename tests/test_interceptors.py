"""The interceptor chain: order (enter outer-to-inner, exit inner-to-outer), built-ins, user hooks."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flow_orchestrator import (
    ExecuteNodeInput,
    Interceptor,
    NodeContext,
    NodeTimeout,
    PublishInput,
    RetryInterceptor,
    RetryPolicy,
    RunFailed,
    TimeoutInterceptor,
    TriggerInput,
    Workflow,
)
from flow_orchestrator.bus import InterceptorChain
from flow_orchestrator.bus.types import NodeCall, PublishCall, TriggerCall
from flow_orchestrator.runtime._interceptors import run_action
from flow_orchestrator.testing import LocalEnvironment


class Recorder(Interceptor):
    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
        self.log.append(f"{self.name}>{input.node}")
        result = await call_next(input)
        self.log.append(f"{self.name}<{input.node}")
        return result

    async def receive_trigger(self, input: TriggerInput, call_next: TriggerCall) -> Any:
        self.log.append(f"{self.name}>trigger")
        return await call_next(input)


async def test_chain_order_is_outer_to_inner_then_back() -> None:
    log: list[str] = []

    async def terminal(input: ExecuteNodeInput) -> Any:
        log.append("action")
        return 42

    async def accept(input: TriggerInput) -> Any:
        return input.payload

    async def publish(input: PublishInput) -> None:
        return None

    chain = InterceptorChain(
        [Recorder("a", log), Recorder("b", log), Recorder("c", log)],
        receive_trigger=accept,
        execute_node=terminal,
        publish=publish,
    )
    request = ExecuteNodeInput(
        workflow="w", run_id="r", node="n", attempt=1, context=None, action=terminal, headers={}
    )
    assert await chain.execute_node(request) == 42
    assert log == ["a>n", "b>n", "c>n", "action", "c<n", "b<n", "a<n"]


async def test_interceptor_that_does_not_override_a_hook_is_not_in_that_chain() -> None:
    calls: list[str] = []

    async def publish(input: PublishInput) -> None:
        calls.append(input.subject)

    async def never(input: Any) -> Any:
        raise AssertionError("not called")

    chain = InterceptorChain([Recorder("a", [])], receive_trigger=never, execute_node=never, publish=publish)
    assert chain.publish is publish  # Recorder does not override publish: zero cost on that path
    await chain.publish(PublishInput("s", {}))
    assert calls == ["s"]


class HeaderStamp(Interceptor):
    async def publish(self, input: PublishInput, call_next: PublishCall) -> None:
        input.headers["X-Tenant"] = "acme"
        await call_next(input)


async def test_interceptors_see_real_runs_in_order(env_factory: Any) -> None:
    log: list[str] = []
    wf = Workflow("intercepted")

    @wf.node()
    async def only(ctx: NodeContext) -> int:
        log.append("action")
        return 1

    env: LocalEnvironment = await env_factory(
        [wf], interceptors=[Recorder("outer", log), HeaderStamp(), Recorder("inner", log)]
    )
    sub = await env.client.bus.nc.subscribe(env.names.event("intercepted", "*", "only", "completed"))
    assert await env.client.run("intercepted", {}) == 1
    assert log == [
        "outer>trigger",
        "inner>trigger",
        "outer>only",
        "inner>only",
        "action",
        "inner<only",
        "outer<only",
    ]
    msg = await sub.next_msg(timeout=5)
    assert msg.headers is not None
    assert msg.headers["X-Tenant"] == "acme"


async def test_default_retry_and_timeout_interceptors(env_factory: Any) -> None:
    wf = Workflow("defaults")
    attempts: list[int] = []

    @wf.node()
    async def slow_then_fast(ctx: NodeContext) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt == 1:
            import asyncio

            await asyncio.sleep(5)
        return ctx.attempt

    env: LocalEnvironment = await env_factory(
        [wf],
        interceptors=[RetryInterceptor(RetryPolicy(max_attempts=2, initial=0.0)), TimeoutInterceptor(0.2)],
    )
    assert await env.client.run("defaults", {}) == 2
    assert attempts == [1, 2]


async def test_interceptor_error_fails_the_attempt(env_factory: Any) -> None:
    class Deny(Interceptor):
        async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
            raise PermissionError(f"{input.node} not allowed")

    wf = Workflow("denied")

    @wf.node()
    async def forbidden(ctx: NodeContext) -> int:
        return 1

    env: LocalEnvironment = await env_factory([wf], interceptors=[Deny()])
    with pytest.raises(RunFailed, match="not allowed"):
        await env.client.run("denied", {})


async def test_an_action_that_swallows_its_timeout_still_times_out() -> None:
    async def stubborn(ctx: object) -> str:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.05)  # ignores the cancellation and returns late
        return "late"

    request = ExecuteNodeInput(
        workflow="w",
        run_id="r1",
        node="n",
        attempt=1,
        context=None,
        action=stubborn,
        headers={},
        timeout=0.05,
    )
    with pytest.raises(NodeTimeout, match=r"timed out after 0\.05s"):
        await run_action(request)
