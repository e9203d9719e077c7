"""DAG validation and ordering, pure: duplicate and unknown nodes, cycles (printed), topological order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flow_orchestrator._errors import (
    CycleError,
    DuplicateNodeError,
    EmptyWorkflowError,
    UnknownDependencyError,
)


def find_cycle(upstreams: Mapping[str, Sequence[str]]) -> list[str] | None:
    """A dependency cycle as ``[a, b, ..., a]`` (each depends on the next), or ``None``."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(upstreams, white)
    for start in upstreams:
        if colour[start] != white:
            continue
        # Iterative DFS so deep chains cannot hit the recursion limit.
        path: list[str] = [start]
        iters = [iter(upstreams[start])]
        colour[start] = grey
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                iters.pop()
            elif colour.get(nxt, black) == grey:
                return [*path[path.index(nxt) :], nxt]
            elif colour.get(nxt) == white:
                colour[nxt] = grey
                path.append(nxt)
                iters.append(iter(upstreams[nxt]))
    return None


def topological_order(upstreams: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Kahn's order, stable with respect to the declaration order of ``upstreams``."""
    remaining = {node: len(set(deps)) for node, deps in upstreams.items()}
    downstream: dict[str, list[str]] = {node: [] for node in upstreams}
    for node, deps in upstreams.items():
        for dep in dict.fromkeys(deps):
            downstream[dep].append(node)
    ready = [node for node, count in remaining.items() if count == 0]
    order: list[str] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for child in downstream[node]:
            remaining[child] -= 1
            if remaining[child] == 0:
                ready.append(child)
    return tuple(order)


def validate_graph(
    workflow: str, names: Sequence[str], upstreams: Mapping[str, Sequence[str]]
) -> tuple[str, ...]:
    """Check a graph and return its topological order, or raise the error that names the problem."""
    if not names:
        raise EmptyWorkflowError(
            f"workflow {workflow!r} has no nodes; add at least one with @workflow.node()"
        )
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DuplicateNodeError(
                f"workflow {workflow!r} defines node {name!r} twice; node names must be unique"
            )
        seen.add(name)
    for name, deps in upstreams.items():
        for dep in deps:
            if dep not in seen:
                raise UnknownDependencyError(
                    f"node {name!r} of workflow {workflow!r} depends on {dep!r}, which the workflow does not "
                    f"define (known nodes: {', '.join(sorted(seen))})"
                )
            if dep == name:
                raise CycleError(workflow, [name, name])
    cycle = find_cycle(upstreams)
    if cycle is not None:
        # find_cycle walks node -> upstream; print it in execution order (upstream first).
        raise CycleError(workflow, list(reversed(cycle)))
    return topological_order(upstreams)
