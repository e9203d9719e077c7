"""The interceptor chain: middleware as message interceptors, built once per worker.

The first interceptor listed runs outermost: it enters first and exits last. Each hook receives its
input and ``call_next``; the base class delegates, so an interceptor overrides only what it needs.
Interceptors that do not override a hook are left out of that hook's chain, so unused hooks cost
nothing on the hot path.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from flow_orchestrator.bus.types import (
    ExecuteNodeInput,
    NodeCall,
    PublishCall,
    PublishInput,
    TriggerCall,
    TriggerInput,
)


class Interceptor:
    """Base class of every interceptor. Override any of the hooks; each must call ``call_next`` once
    (or raise) to keep the chain going. One instance serves every message: keep per-message state in
    locals, shared state (tracer, meter, policy) on ``self``.
    """

    async def receive_trigger(self, input: TriggerInput, call_next: TriggerCall) -> Any:
        """Around turning a trigger into a run; returns the run's validated input."""
        return await call_next(input)

    async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
        """Around one attempt of a node's action; returns the node's output."""
        return await call_next(input)

    async def publish(self, input: PublishInput, call_next: PublishCall) -> None:
        """Around every event the worker publishes."""
        await call_next(input)


def _overrides(interceptor: Interceptor, hook: str) -> bool:
    return getattr(type(interceptor), hook) is not getattr(Interceptor, hook)


class InterceptorChain:
    """The composed hooks for a list of interceptors (first = outermost)."""

    def __init__(
        self,
        interceptors: Sequence[Interceptor],
        *,
        receive_trigger: TriggerCall,
        execute_node: NodeCall,
        publish: PublishCall,
    ) -> None:
        self.interceptors = tuple(interceptors)
        self.receive_trigger: TriggerCall = self._compose("receive_trigger", receive_trigger)
        self.execute_node: NodeCall = self._compose("execute_node", execute_node)
        self.publish: PublishCall = self._compose("publish", publish)

    def _compose(self, hook: str, terminal: Any) -> Any:
        call = terminal
        for interceptor in reversed(self.interceptors):
            if _overrides(interceptor, hook):
                call = functools.partial(getattr(interceptor, hook), call_next=call)
        return call
