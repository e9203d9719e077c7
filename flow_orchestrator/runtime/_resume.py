"""Re-running a failed run from where it failed (``flowctl retry RUN_ID``).

Completed nodes keep their outputs and the run keeps its data. Each failed node gets a new attempt,
and so does every node that was ready (all upstreams resolved) but never started because fail-fast
stopped the run: workers start nothing for a closed run, so those must be issued again. (They still
record join arrivals, so a join also waiting on a failed node counts the upstreams that completed
after the failure.) The run record goes back to running first, by compare-and-set, so a run is
resumed once even if two people ask.
"""

from __future__ import annotations

import time
from typing import Any

from flow_orchestrator._errors import FlowError, StateConflict
from flow_orchestrator.bus._codec import encode
from flow_orchestrator.bus._kv import StateStore
from flow_orchestrator.bus._subjects import Names
from flow_orchestrator.runtime._journal import NodeView, fold_events
from flow_orchestrator.runtime._status import GraphShape, NodeStatus, RunStatus


class RunNotRetryable(FlowError, ValueError):
    """Only a failed run can be retried."""


def nodes_to_resume(shape: GraphShape, views: dict[str, NodeView]) -> list[str]:
    """Failed nodes (not continue-on-error), and never-started nodes whose upstreams all resolved."""
    resolved = {
        name
        for name, view in views.items()
        if view.status is NodeStatus.COMPLETED
        or (view.status is NodeStatus.FAILED and name in shape.continue_on_error)
    }

    def failed(name: str, view: NodeView | None) -> bool:
        return view is not None and view.status is NodeStatus.FAILED and name not in shape.continue_on_error

    def ready_but_never_started(name: str, view: NodeView | None) -> bool:
        never_started = view is None or view.status is None
        return never_started and all(up in resolved for up in shape.upstreams[name])

    return [n for n in shape.order if failed(n, views.get(n)) or ready_but_never_started(n, views.get(n))]


async def resume_failed_run(
    store: StateStore, js: Any, names: Names, run_id: str, *, shape: GraphShape, events: list[dict[str, Any]]
) -> list[str]:
    """Reopen the run record and publish a new attempt for each node to resume; return their names."""
    key = Names.run_key(run_id)
    current = await store.get(key)
    if current is None or current.value.get("status") != RunStatus.FAILED.value:
        status = current.value.get("status") if current else "missing"
        raise RunNotRetryable(f"run {run_id!r} is {status}; only a failed run can be retried")
    record = current.value
    reopened = {
        **record,
        "status": RunStatus.RUNNING.value,
        "error": None,
        "finished_at": None,
        "resumed": [*record.get("resumed", []), {"at": time.time(), "after": record.get("error")}],
    }
    try:
        await store.update(key, reopened, current.revision)
    except StateConflict as exc:
        raise RunNotRetryable(f"run {run_id!r} changed while retrying it; look at it again") from exc
    workflow = record["workflow"]
    views = fold_events(events)
    outputs = {name: view.output for name, view in views.items() if view.status is NodeStatus.COMPLETED}
    chosen = nodes_to_resume(shape, views)
    await js.publish(names.run_event(workflow, run_id, "resumed"), encode({"nodes": chosen}))
    for node in chosen:
        attempt = (views[node].attempts if node in views else 0) + 1
        body = {
            "attempt": attempt,
            "input": record.get("input"),
            "outputs": {up: outputs.get(up) for up in shape.upstreams[node]},
        }
        await js.publish(
            names.event(workflow, run_id, node, "retry"),
            encode(body),
            headers={"Nats-Msg-Id": f"{run_id}.{node}.{attempt}.resume", **dict(record.get("trace") or {})},
        )
    return chosen
