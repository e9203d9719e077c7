"""Workflows the tracing and metrics tests run, in-process and in worker subprocesses
(``flowctl worker tests.tracing_workflows:wf``)."""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

from flow_orchestrator import NodeContext, NonRetryableError, RetryPolicy, Workflow

# fetch -> enrich (fails on its first attempt, then succeeds) -> store
wf = Workflow("traced")


@wf.node()
async def fetch(ctx: NodeContext) -> dict[str, Any]:
    return {"n": 1}


@wf.node(depends_on=[fetch], retry=RetryPolicy(max_attempts=3, initial=0.05, jitter=0.0))
async def enrich(ctx: NodeContext) -> dict[str, Any]:
    if ctx.attempt == 1:
        raise RuntimeError("enrich is flaky on its first attempt")
    return {"n": ctx.output("fetch")["n"] + 1}


@wf.node(depends_on=[enrich])
async def store(ctx: NodeContext) -> dict[str, Any]:
    return {"stored": ctx.output("enrich")["n"]}


# one node that always fails for good: the run fails
doomed = Workflow("doomed")


@doomed.node()
async def explode(ctx: NodeContext) -> None:
    raise NonRetryableError("explode cannot succeed")


# one node that logs through ctx.log
logged = Workflow("logged")


@logged.node()
async def say(ctx: NodeContext) -> dict[str, bool]:
    ctx.log.info("hello")
    return {"said": True}


# An action that instruments itself: it annotates the attempt's span and opens a child span with
# TRACER (the test sets it from its provider; an application would use the global one)
instrumented = Workflow("instrumented")
TRACER: trace.Tracer = trace.NoOpTracer()


@instrumented.node()
async def lookup(ctx: NodeContext) -> dict[str, Any]:
    span = trace.get_current_span()
    span.set_attribute("order.id", ctx.input["order"])
    span.set_attribute("order.bad", {"not": "an attribute value"})  # dropped, as the SDK drops it
    span.add_event("cache miss", {"key": ctx.input["order"]})
    with TRACER.start_as_current_span("inventory query"):
        pass
    return {"ok": True}
