"""Built-in interceptors (logging, retry policy, timeout, payload validation) and the chain's core.

The core calls sit at the inner end of the chain: they run the action (with the node's timeout) and
validate trigger payloads and node outputs, so these guarantees hold whatever a user adds outside.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pydantic import BaseModel, ValidationError

from flow_orchestrator._errors import InvalidPayload, NodeTimeout, NonRetryableError
from flow_orchestrator.bus._interceptors import Interceptor
from flow_orchestrator.bus.types import ExecuteNodeInput, NodeCall, TriggerCall, TriggerInput
from flow_orchestrator.runtime._retry import RetryPolicy

log = logging.getLogger("flow_orchestrator.worker")


class LoggingInterceptor(Interceptor):
    """One compact log line per trigger accepted and per attempt finished."""

    def __init__(self, logger: logging.Logger | None = None, level: int = logging.INFO) -> None:
        self.logger = logger or log
        self.level = level

    async def receive_trigger(self, input: TriggerInput, call_next: TriggerCall) -> Any:
        result = await call_next(input)
        self.logger.log(
            self.level,
            "run %s of %s accepted",
            input.run_id,
            input.workflow,
            extra={"workflow": input.workflow, "run_id": input.run_id},
        )
        return result

    async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
        extra = {
            "workflow": input.workflow,
            "run_id": input.run_id,
            "node": input.node,
            "attempt": input.attempt,
        }
        started = time.perf_counter()
        try:
            result = await call_next(input)
        except Exception as exc:
            self.logger.log(
                self.level,
                "%s/%s %s attempt %d failed after %.1fms: %s: %s",
                input.workflow,
                input.run_id,
                input.node,
                input.attempt,
                (time.perf_counter() - started) * 1e3,
                type(exc).__name__,
                exc,
                extra=extra,
            )
            raise
        self.logger.log(
            self.level,
            "%s/%s %s attempt %d completed in %.1fms",
            input.workflow,
            input.run_id,
            input.node,
            input.attempt,
            (time.perf_counter() - started) * 1e3,
            extra=extra,
        )
        return result


class RetryInterceptor(Interceptor):
    """A default retry policy for nodes that declare none (``RetryMiddleware`` of the original)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy

    async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
        if input.retry is None:
            input.retry = self.policy
        return await call_next(input)


class TimeoutInterceptor(Interceptor):
    """A default per-attempt timeout for nodes that declare none (``TimeoutMiddleware``)."""

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError("TimeoutInterceptor needs a positive number of seconds")
        self.seconds = seconds

    async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
        if input.timeout is None:
            input.timeout = self.seconds
        return await call_next(input)


class PayloadValidationInterceptor(Interceptor):
    """Validates trigger payloads against the workflow's ``input_model`` and node outputs against their
    ``output_model``. Always installed innermost by the worker; add it yourself only to change where
    it sits in the chain."""

    async def receive_trigger(self, input: TriggerInput, call_next: TriggerCall) -> Any:
        model = input.input_model
        if model is not None and isinstance(model, type) and issubclass(model, BaseModel):
            try:
                input.payload = model.model_validate(input.payload).model_dump(mode="json")
            except ValidationError as exc:
                raise InvalidPayload(
                    f"trigger for workflow {input.workflow!r} (run {input.run_id!r}) does not match "
                    f"{model.__name__}: {exc.error_count()} error(s): {_summary(exc)}"
                ) from exc
        return await call_next(input)

    async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
        output = await call_next(input)
        model = input.output_model
        if model is not None and isinstance(model, type) and issubclass(model, BaseModel):
            try:
                output = model.model_validate(output).model_dump(mode="json")
            except ValidationError as exc:
                raise NonRetryableError(
                    f"output of node {input.node!r} (run {input.run_id!r}) does not match {model.__name__}: "
                    f"{_summary(exc)}"
                ) from exc
        elif isinstance(output, BaseModel):
            output = output.model_dump(mode="json")
        return output


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]
    )


async def accept_trigger(input: TriggerInput) -> Any:
    """The innermost trigger call: the payload, as validated by the interceptors."""
    return input.payload


async def run_action(input: ExecuteNodeInput) -> Any:
    """The innermost node call: run the action under its timeout. (An output that cannot be stored
    fails the attempt where it is encoded, once, on its way into the completion event.)"""
    if input.timeout is None:
        return await input.action(input.context)
    try:
        async with asyncio.timeout(input.timeout) as scope:
            output = await input.action(input.context)
    except TimeoutError as exc:
        if scope.expired():
            raise _timed_out(input) from exc
        raise
    if scope.expired():  # the action swallowed its cancellation and returned late: still a timeout
        raise _timed_out(input)
    return output


def _timed_out(input: ExecuteNodeInput) -> NodeTimeout:
    return NodeTimeout(
        f"node {input.node!r} of run {input.run_id!r} timed out after {input.timeout}s "
        f"(attempt {input.attempt})"
    )
