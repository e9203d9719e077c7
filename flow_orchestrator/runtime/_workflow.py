"""Workflow definitions: the decorator API, node specs, and the immutable, validated definition."""

from __future__ import annotations

import functools
import hashlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from flow_orchestrator._errors import DuplicateNodeError, InvalidNameError, WorkflowDefinitionError
from flow_orchestrator.bus._codec import encode
from flow_orchestrator.bus._subjects import check_name
from flow_orchestrator.runtime._dag import validate_graph
from flow_orchestrator.runtime._retry import RetryPolicy
from flow_orchestrator.runtime._status import GraphShape

F = TypeVar("F", bound=Callable[..., Any])
NodeRef = "str | Callable[..., Any]"


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node: its action and how it runs. ``action`` takes a :class:`NodeContext`."""

    name: str
    action: Callable[[Any], Any]
    upstreams: tuple[str, ...] = ()
    retry: RetryPolicy | None = None
    timeout: float | None = None
    continue_on_error: bool = False
    output_model: type[Any] | None = None
    is_async: bool = True


@dataclass(frozen=True, slots=True)
class WorkflowDefinition:
    """A validated, immutable workflow: what workers host and clients describe."""

    name: str
    nodes: Mapping[str, NodeSpec]
    order: tuple[str, ...]
    input_model: type[Any] | None = None
    downstreams: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @functools.cached_property
    def shape(self) -> GraphShape:
        return GraphShape(
            order=self.order,
            upstreams={name: spec.upstreams for name, spec in self.nodes.items()},
            continue_on_error=frozenset(n for n, spec in self.nodes.items() if spec.continue_on_error),
        )

    @property
    def roots(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if not self.nodes[n].upstreams)

    @property
    def sinks(self) -> tuple[str, ...]:
        return tuple(n for n in self.order if not self.downstreams[n])

    def describe(self) -> dict[str, Any]:
        """The registry record: enough for clients and the CLI to compute statuses and draw the DAG."""
        nodes = {
            name: {"upstreams": list(spec.upstreams), "continue_on_error": spec.continue_on_error}
            for name, spec in self.nodes.items()
        }
        body = {"name": self.name, "order": list(self.order), "nodes": nodes}
        body["hash"] = hashlib.sha256(encode(body)).hexdigest()[:16]
        return body


def shape_from_description(description: Mapping[str, Any]) -> GraphShape:
    """Rebuild the status-rule view of a workflow from its registry record."""
    nodes: Mapping[str, Any] = description["nodes"]
    return GraphShape(
        order=tuple(description["order"]),
        upstreams={name: tuple(spec["upstreams"]) for name, spec in nodes.items()},
        continue_on_error=frozenset(n for n, spec in nodes.items() if spec.get("continue_on_error")),
    )


def _action_of(target: Any) -> Callable[[Any], Any]:
    """Accept a function taking the context, or a Go-style object with ``execute(ctx)``."""
    if callable(target) and not hasattr(target, "execute"):
        return target  # type: ignore[no-any-return]
    execute = getattr(target, "execute", None)
    if callable(execute):
        return execute  # type: ignore[no-any-return]
    raise WorkflowDefinitionError(
        f"an action must be callable or have an execute(ctx) method, got {target!r}"
    )


def _is_async(action: Callable[..., Any]) -> bool:
    # Functions and bound methods answer directly; an object with an async __call__ answers via its type.
    return inspect.iscoroutinefunction(action) or inspect.iscoroutinefunction(type(action).__call__)


def make_node(
    name: str,
    action: Any,
    *,
    depends_on: Sequence[str] = (),
    retry: RetryPolicy | None = None,
    timeout: float | None = None,
    continue_on_error: bool = False,
    output_model: type[Any] | None = None,
) -> NodeSpec:
    check_name("node", name)
    if name.startswith("_"):
        raise InvalidNameError(f"node name {name!r} may not start with '_' (reserved for run-level events)")
    if timeout is not None and timeout <= 0:
        raise WorkflowDefinitionError(f"node {name!r}: timeout must be > 0 seconds, got {timeout}")
    fn = _action_of(action)
    return NodeSpec(
        name=name,
        action=fn,
        upstreams=tuple(dict.fromkeys(depends_on)),
        retry=retry,
        timeout=timeout,
        continue_on_error=continue_on_error,
        output_model=output_model,
        is_async=_is_async(fn),
    )


class Workflow:
    """A workflow under construction with the decorator API; :attr:`definition` validates and freezes it.

    >>> wf = Workflow("order")
    >>> @wf.node()
    ... async def validate(ctx): return {"ok": True}
    """

    def __init__(self, name: str, *, input_model: type[Any] | None = None) -> None:
        self.name = check_name("workflow", name)
        self.input_model = input_model
        self._nodes: dict[str, NodeSpec] = {}
        self._definition: WorkflowDefinition | None = None

    def node(
        self,
        name: str | None = None,
        *,
        depends_on: Sequence[str | Callable[..., Any]] = (),
        retry: RetryPolicy | None = None,
        timeout: float | None = None,
        continue_on_error: bool = False,
        output_model: type[Any] | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as a node; ``depends_on`` takes node names or functions."""

        def register(fn: F) -> F:
            self.add(
                make_node(
                    name or fn.__name__,
                    fn,
                    depends_on=[_ref_name(dep) for dep in depends_on],
                    retry=retry,
                    timeout=timeout,
                    continue_on_error=continue_on_error,
                    output_model=output_model,
                )
            )
            return fn

        return register

    def add(self, spec: NodeSpec) -> None:
        if self._definition is not None:
            raise WorkflowDefinitionError(
                f"workflow {self.name!r} is already built; it cannot change any more"
            )
        if spec.name in self._nodes:
            raise DuplicateNodeError(f"workflow {self.name!r} defines node {spec.name!r} twice")
        self._nodes[spec.name] = spec

    @property
    def definition(self) -> WorkflowDefinition:
        """The validated definition (built once; later changes are refused)."""
        if self._definition is None:
            self._definition = build_definition(self.name, list(self._nodes.values()), self.input_model)
        return self._definition

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, nodes={list(self._nodes)})"


def _ref_name(ref: str | Callable[..., Any]) -> str:
    if isinstance(ref, str):
        return ref
    name = getattr(ref, "__name__", None)
    if not isinstance(name, str):
        raise WorkflowDefinitionError(f"depends_on takes node names or node functions, got {ref!r}")
    return name


def build_definition(
    name: str, specs: Sequence[NodeSpec], input_model: type[Any] | None
) -> WorkflowDefinition:
    names = [spec.name for spec in specs]
    upstreams = {spec.name: spec.upstreams for spec in specs}
    order = validate_graph(name, names, upstreams)
    nodes = {spec.name: spec for spec in specs}
    downstreams: dict[str, list[str]] = {n: [] for n in names}
    for spec in specs:
        for dep in spec.upstreams:
            downstreams[dep].append(spec.name)
    return WorkflowDefinition(
        name=name,
        nodes={n: nodes[n] for n in order},
        order=order,
        input_model=input_model,
        downstreams={n: tuple(d) for n, d in downstreams.items()},
    )
