"""Node and run statuses, and the pure rules that make a run's status total over its DAG.

Nothing here touches the bus: the supervisor, the client and the CLI all derive statuses through
these functions, so one rule set decides what a user sees.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

# The error type of the report that fails a node whose message was dead-lettered (attempt 0).
POISON_ERROR = "PoisonMessage"


class NodeStatus(enum.StrEnum):
    """The status of one node in one run (lower-case values are the wire and CLI form)."""

    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"
    BYPASSED = "bypassed"
    CANCELLED = "cancelled"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"


class RunStatus(enum.StrEnum):
    """The status of a whole run."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_NODE_STATUSES: frozenset[NodeStatus] = frozenset(
    {
        NodeStatus.COMPLETED,
        NodeStatus.FAILED,
        NodeStatus.SKIPPED,
        NodeStatus.BYPASSED,
        NodeStatus.CANCELLED,
        NodeStatus.COMPENSATED,
        NodeStatus.COMPENSATION_FAILED,
    }
)

# Statuses that stop downstream nodes whatever the node's settings; FAILED blocks too, unless the node
# is marked continue-on-error (see _blocks).
_ALWAYS_BLOCKING: frozenset[NodeStatus] = frozenset(
    {NodeStatus.SKIPPED, NodeStatus.CANCELLED, NodeStatus.COMPENSATION_FAILED}
)


def is_terminal(status: NodeStatus) -> bool:
    """Whether the node is done for this run, so the derivation keeps its recorded status as is."""
    return status in TERMINAL_NODE_STATUSES


@dataclass(frozen=True, slots=True)
class GraphShape:
    """The part of a workflow definition the rules need."""

    order: tuple[str, ...]
    """Node names in a topological order: every node comes after all of its upstreams."""
    upstreams: Mapping[str, tuple[str, ...]]
    """Node name -> the names of its upstream nodes (a node missing here is a root)."""
    continue_on_error: frozenset[str]
    """Nodes whose Failed status does not block their downstream nodes."""

    def __post_init__(self) -> None:
        # Checked once here so the derivation can trust the order and stay a single forward pass.
        seen: set[str] = set()
        for name in self.order:
            if name in seen:
                raise ValueError(f"node {name!r} appears twice in the graph order")
            for upstream in self.upstreams.get(name, ()):
                if upstream not in seen:
                    raise ValueError(
                        f"node {name!r} has upstream {upstream!r}, which does not come before it in "
                        "the graph order; pass the nodes in a topological order"
                    )
            seen.add(name)


def _blocks(shape: GraphShape, node: str, status: NodeStatus) -> bool:
    if status is NodeStatus.FAILED:
        return node not in shape.continue_on_error
    return status in _ALWAYS_BLOCKING


def _derive_open_node(
    shape: GraphShape, node: str, recorded: NodeStatus | None, derived: Mapping[str, NodeStatus]
) -> NodeStatus:
    upstream_statuses = [(upstream, derived[upstream]) for upstream in shape.upstreams.get(node, ())]
    if any(_blocks(shape, upstream, status) for upstream, status in upstream_statuses):
        return NodeStatus.SKIPPED
    # Bypassed only when every path in was not taken: one taken path (Completed, continue-on-error
    # Failed) wins a diamond, and the node waits for it instead.
    if upstream_statuses and all(status is NodeStatus.BYPASSED for _, status in upstream_statuses):
        return NodeStatus.BYPASSED
    return recorded if recorded is not None else NodeStatus.PENDING


def derive_node_statuses(
    shape: GraphShape, recorded: Mapping[str, NodeStatus], run_status: RunStatus
) -> dict[str, NodeStatus]:
    """Give every node exactly one status, filling the gaps the recorded events leave.

    Recorded events only cover nodes that ran; a node that could not run (blocked upstream, not-taken
    branch, cancelled run) has no event of its own, so its status follows from its upstreams here.
    A run that Failed or Completed follows the same rules as a running one: nodes it never reached
    stay Pending. Feeding the result back in as ``recorded`` gives the same result.
    """
    derived: dict[str, NodeStatus] = {}
    for node in shape.order:
        status = recorded.get(node)
        if status is not None and is_terminal(status):
            derived[node] = status
        elif run_status is RunStatus.CANCELLED:
            derived[node] = NodeStatus.CANCELLED
        else:
            derived[node] = _derive_open_node(shape, node, status, derived)
    return derived


def derive_run_status(shape: GraphShape, statuses: Mapping[str, NodeStatus]) -> RunStatus | None:
    """The run's status from its (derived) node statuses; None while the run is still in progress.

    Fail-fast: one blocking failure fails the run even while other nodes still run. A node missing
    from ``statuses`` counts as Pending.
    """
    current = [(node, statuses.get(node, NodeStatus.PENDING)) for node in shape.order]
    if any(
        status is NodeStatus.COMPENSATION_FAILED
        or (status is NodeStatus.FAILED and node not in shape.continue_on_error)
        for node, status in current
    ):
        return RunStatus.FAILED
    if not all(is_terminal(status) for _, status in current):
        return None
    if any(status is NodeStatus.CANCELLED for _, status in current):
        return RunStatus.CANCELLED
    # A Skipped node only exists because something upstream failed, so the run did not succeed.
    if any(status is NodeStatus.SKIPPED for _, status in current):
        return RunStatus.FAILED
    return RunStatus.COMPLETED


_S = NodeStatus
ALLOWED_TRANSITIONS: Mapping[NodeStatus, frozenset[NodeStatus]] = MappingProxyType(
    {
        _S.PENDING: frozenset({_S.RUNNING, _S.WAITING, _S.SKIPPED, _S.BYPASSED, _S.CANCELLED}),
        # RUNNING -> RUNNING: an attempt lost with its worker is resumed as a new attempt.
        _S.RUNNING: frozenset({_S.COMPLETED, _S.FAILED, _S.RETRYING, _S.WAITING, _S.CANCELLED, _S.RUNNING}),
        _S.RETRYING: frozenset({_S.RUNNING, _S.FAILED, _S.CANCELLED}),
        _S.WAITING: frozenset({_S.RUNNING, _S.COMPLETED, _S.FAILED, _S.CANCELLED}),
        # Only work that completed can be undone.
        _S.COMPLETED: frozenset({_S.COMPENSATED, _S.COMPENSATION_FAILED}),
        **{status: frozenset() for status in TERMINAL_NODE_STATUSES - {_S.COMPLETED}},
    }
)
"""Status -> the statuses it may be replaced by; every other terminal status is final.

The rules of a node's lifecycle, not of what its journal shows: an attempt that ends before the
worker announces it (``Worker(announce_starts_after=...)``) went through Running without a
``started`` event, so a view built from the journal may move from Pending to its outcome at once."""


class InvalidTransition(ValueError):
    """A node was asked to move to a status its current status cannot lead to."""

    def __init__(self, node: str, current: NodeStatus, new: NodeStatus) -> None:
        allowed = ", ".join(sorted(status.value for status in ALLOWED_TRANSITIONS[current])) or "none"
        super().__init__(
            f"node {node!r} cannot go from {current.value} to {new.value} "
            f"(allowed from {current.value}: {allowed}); the event is stale or out of order"
        )
        self.node = node
        self.current = current
        self.new = new


def can_transition(current: NodeStatus, new: NodeStatus) -> bool:
    """Whether a recorded status may be replaced by ``new``, so stale or duplicate events are refused."""
    return new in ALLOWED_TRANSITIONS[current]


def check_transition(current: NodeStatus, new: NodeStatus, *, node: str) -> None:
    """Raise InvalidTransition unless ``current`` may become ``new`` for ``node``."""
    if not can_transition(current, new):
        raise InvalidTransition(node, current, new)
