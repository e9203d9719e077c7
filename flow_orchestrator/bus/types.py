"""Shapes shared across the bus: the interceptor inputs and the callables of the chain.

Each intercepted operation takes one input dataclass, so fields can be added without breaking
interceptors users have written.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class TriggerInput:
    """A decoded trigger about to become a run. ``payload`` may be replaced (validated) by interceptors."""

    workflow: str
    run_id: str
    payload: Any
    headers: dict[str, str]
    input_model: type[Any] | None = None


@dataclass(slots=True)
class ExecuteNodeInput:
    """One attempt of one node. ``timeout`` and ``retry`` may be set by interceptors as defaults."""

    workflow: str
    run_id: str
    node: str
    attempt: int
    context: Any
    action: Callable[[Any], Awaitable[Any]]
    headers: Mapping[str, str]
    timeout: float | None = None
    retry: Any = None
    output_model: type[Any] | None = None
    subject: str | None = None  # the message that started the attempt
    published_at: float | None = None  # when that message was stored (queue lag = start - this)


@dataclass(slots=True)
class PublishInput:
    """An outgoing message. Interceptors may add headers (trace context, tenant ids...)."""

    subject: str
    payload: Any
    headers: dict[str, str] = field(default_factory=dict)
    duplicate: bool = False  # set after publishing: JetStream had it already (message id seen)
    seq: int | None = None  # set after a durable publish: the stream sequence JetStream stored it at
    size: int = 0  # set after publishing: the encoded payload's bytes


class TriggerCall(Protocol):
    def __call__(self, input: TriggerInput, /) -> Awaitable[Any]: ...


class NodeCall(Protocol):
    def __call__(self, input: ExecuteNodeInput, /) -> Awaitable[Any]: ...


class PublishCall(Protocol):
    def __call__(self, input: PublishInput, /) -> Awaitable[None]: ...
