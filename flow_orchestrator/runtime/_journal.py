"""Folding a run's journal into node views: pure, so the status of a run can be tested without a server."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flow_orchestrator.runtime._status import POISON_ERROR, NodeStatus


@dataclass(slots=True)
class NodeView:
    """What the journal says of one node: its recorded status, attempts, times, error and output."""

    status: NodeStatus | None = None
    attempts: int = 0
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, Any] | None = None
    output: Any = None
    lost: list[int] = field(default_factory=list)


_TERMINAL_EVENT = {"completed", "failed", "cancelled"}


def fold_events(events: Iterable[Mapping[str, Any]]) -> dict[str, NodeView]:
    """Node views from journal events (``{node, kind, at, data}``), oldest first. Run-level and
    trigger-level events are skipped. Completed and cancelled are final; failed is final unless a
    later attempt follows (the run was retried with ``flowctl retry``)."""
    views: dict[str, NodeView] = {}
    for event in events:
        fold_event(views, event)
    return views


def _poisoned(view: NodeView) -> bool:
    """Whether the view's failure is a dead-lettered message's report (attempt 0), not an attempt's."""
    return (view.error or {}).get("type") == POISON_ERROR


def fold_event(views: dict[str, NodeView], event: Mapping[str, Any]) -> None:
    """Fold one more event into ``views`` (in place): what a live view does as each event arrives,
    so folding event by event and :func:`fold_events` over the whole journal always agree."""
    node = event["node"]
    if node.startswith("_"):
        return
    view = views.setdefault(node, NodeView())
    data = event.get("data") or {}
    if view.status in (NodeStatus.COMPLETED, NodeStatus.CANCELLED):
        return
    if (
        view.status is NodeStatus.FAILED
        and event["kind"] != "failed"
        and int(data.get("attempt") or 0) <= view.attempts
        and not (event["kind"] == "completed" and _poisoned(view))
    ):
        # A failure is final unless the run is retried (a later attempt supersedes it). A node that
        # completed after a dead-lettered message's report failed it did run: a stalled delivery
        # made it ready after all (it completes once per run).
        return
    kind = event["kind"]
    attempt = int(data.get("attempt") or 0)
    if kind == "started":
        view.status = NodeStatus.RUNNING
        view.attempts = max(view.attempts, attempt)
        view.started_at = data.get("started_at", event.get("at"))
        view.finished_at = None
    elif kind == "lost":
        view.lost.append(attempt)
    elif kind == "attempt_failed":
        view.attempts = max(view.attempts, attempt)
        view.status = NodeStatus.RETRYING if data.get("retry") else NodeStatus.FAILED
        view.error = data.get("error")
        # Its own start: a quick attempt has no started event, and an earlier one's would be wrong.
        view.started_at = data.get("started_at", view.started_at)
        view.finished_at = data.get("finished_at", event.get("at"))
    elif kind == "completed":
        view.status = NodeStatus.COMPLETED
        view.attempts = max(view.attempts, attempt)
        view.output = data.get("output")
        view.error = None
        view.started_at = data.get("started_at", view.started_at)
        view.finished_at = data.get("finished_at", event.get("at"))
    elif kind == "failed":
        view.status = NodeStatus.FAILED
        view.error = data.get("error", view.error)
    elif kind == "cancelled":
        view.status = NodeStatus.CANCELLED
        view.started_at = data.get("started_at", view.started_at)
        view.finished_at = data.get("finished_at", event.get("at"))
