"""The shapes users implement: actions (a function, or an object with ``execute``) and stores."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from flow_orchestrator.runtime._context import NodeContext


class Action(Protocol):
    """A node's action: an ``async def`` or a plain function of the context; returns the output."""

    def __call__(self, ctx: NodeContext, /) -> Any | Awaitable[Any]: ...


class ActionObject(Protocol):
    """A Go-style action: an object whose ``execute(ctx)`` returns (or awaits to) the output."""

    def execute(self, ctx: NodeContext, /) -> Any | Awaitable[Any]: ...


class WorkflowStore(Protocol):
    """Persist and restore a run's data, as ``WorkflowStore.Save/Load`` in the original library."""

    async def save(self, run_id: str, data: Mapping[str, Any]) -> None: ...

    async def load(self, run_id: str) -> dict[str, Any]: ...
