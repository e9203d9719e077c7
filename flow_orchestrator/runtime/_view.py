"""How ``flowctl`` shows things: run tables and the live view (rich), and the DAG as text or Mermaid.

The live view follows the run's event stream (``Client.events``). Everything degrades for logs:
without a terminal it prints one line per status change, then the final table, so CI output stays
readable.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from contextlib import aclosing
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from flow_orchestrator.runtime._client import Client, RunHandle, RunSnapshot, snapshot_of
from flow_orchestrator.runtime._events import REJECTED, RUN_END_KINDS, RunEvent, follow_run
from flow_orchestrator.runtime._journal import NodeView, fold_event
from flow_orchestrator.runtime._status import GraphShape, NodeStatus, RunStatus
from flow_orchestrator.runtime._workflow import WorkflowDefinition, shape_from_description

STATUS_STYLES: Mapping[str, str] = {
    "pending": "dim",
    "running": "cyan",
    "retrying": "yellow",
    "waiting": "blue",
    "completed": "green",
    "failed": "bold red",
    "skipped": "magenta",
    "bypassed": "dim",
    "cancelled": "yellow",
    "compensated": "blue",
    "compensation_failed": "bold red",
}
TERMINAL_RUN = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


LOG_WIDTH = 160


def make_console(*, stderr: bool = False) -> Console:
    """A console for the CLI. Without a terminal (CI logs, pipes) rich would assume 80 columns and
    squeeze the tables; logs take long lines, so use a wider fixed width unless COLUMNS says otherwise."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = LOG_WIDTH
    return console


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLES.get(status, ""))


def _error_text(error: Mapping[str, Any] | None) -> str:
    if not error:
        return ""
    return f"{error.get('type') or 'Error'}: {error.get('message') or ''}"


def render_snapshot(
    snapshot: RunSnapshot,
    *,
    title: str | None = None,
    depths: Mapping[str, int] | None = None,
    now: float | None = None,
) -> RenderableType:
    """A heading line, then one row per node in topological order: status (coloured), attempts,
    duration of the last attempt and its error. With ``depths`` the names are indented by depth as in
    ``flowctl graph``; with ``now`` a running node shows how long it has been running. The heading
    sits outside the table so it never wraps into the table's (possibly narrow) width."""
    heading = Text(title or f"run {snapshot.run_id} of {snapshot.workflow}: ", style="bold")
    if title is None:
        heading.append_text(status_text(snapshot.status.value))
    table = Table()
    table.add_column("node", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("attempts", justify="right")
    table.add_column("duration ms", justify="right")
    table.add_column("error", overflow="fold")
    for name, node in snapshot.nodes.items():
        seconds = node.duration
        if seconds is None and now is not None and node.status is NodeStatus.RUNNING and node.started_at:
            seconds = max(0.0, now - node.started_at)
        table.add_row(
            "  " * (depths or {}).get(name, 0) + name,
            status_text(node.status.value),
            str(node.attempts) if node.attempts else "",
            f"{seconds * 1000:.1f}" if seconds is not None else "",
            Text(_error_text(node.error), style="red"),
        )
    return Group(heading, table)


def render_result(snapshot: RunSnapshot) -> RenderableType:
    """The run's output when it completed (its sink's output), else what stopped it."""
    if snapshot.status is RunStatus.COMPLETED:
        results = dict(snapshot.results)
        result = next(iter(results.values())) if len(results) == 1 else results
        return Group(Text("result:", style="bold"), Text(_json(result)))
    error = snapshot.error or {}
    where = f" at node {error['node']}" if error.get("node") else ""
    return Text(f"run {snapshot.status.value}{where}: {_error_text(error)}", style="bold red")


def render_runs(runs: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title=f"{len(runs)} run(s), newest first", title_justify="left")
    # Run ids are what users copy into the next command: never shorten them; the error column gives way.
    id_width = max((len(str(run["run_id"])) for run in runs), default=6)
    table.add_column("run id", no_wrap=True, min_width=id_width)
    table.add_column("workflow", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("created", no_wrap=True)
    table.add_column("duration s", justify="right")
    table.add_column("error", overflow="fold")
    for run in runs:
        created, finished = run.get("created_at"), run.get("finished_at")
        duration = f"{finished - created:.2f}" if created and finished else ""
        when = dt.datetime.fromtimestamp(created).strftime("%m-%d %H:%M:%S") if created else ""
        table.add_row(
            str(run["run_id"]),
            str(run.get("workflow")),
            status_text(str(run.get("status"))),
            when,
            duration,
            Text(_error_text(run.get("error")), style="red"),
        )
    return table


async def watch_run(client: Client, handle: RunHandle, console: Console) -> RunSnapshot:
    """Follow a run's events until it ends, then print the final table and its result.

    On a terminal the DAG (indented by depth) refreshes in place; otherwise each change of a node's
    status is one line. All nodes show (pending) before a worker accepts the run. A trigger that a
    worker rejects (invalid payload...) never gets a record: its typed error is raised.
    It waits as long as the run lasts: bound it with ``asyncio.timeout``.
    """
    shape = shape_from_description(await client.describe(handle.workflow))
    depths = node_depths(shape.order, shape.upstreams)
    run = LiveRun(handle, shape)
    events = follow_run(
        client, handle.run_id, workflow=handle.workflow, rejection_is_ours=handle._concerns_us
    )
    if console.is_terminal:
        title = f"run {handle.run_id} of {handle.workflow}: waiting for a worker to accept it"
        initial = render_snapshot(run.snapshot(), title=title, depths=depths)
        with Live(initial, console=console, transient=True, auto_refresh=False) as live:

            def redraw() -> None:
                if run.accepted:
                    live.update(render_snapshot(run.snapshot(), depths=depths, now=time.time()), refresh=True)

            # Events only mark the view dirty; a tick redraws it (and the running durations) 10 times
            # a second, so a run with thousands of events costs thousands of folds, not renders.
            ticker = asyncio.ensure_future(_tick(redraw, 0.1))
            try:
                await _follow(events, run, lambda _: None)
            finally:
                ticker.cancel()
    else:
        printer = _ChangePrinter(console, run.snapshot())
        await _follow(events, run, lambda event: printer(run.snapshot(), event.at))
    final = await client.snapshot(handle.run_id)
    console.print(render_snapshot(final, depths=depths))
    console.print(render_result(final))
    return final


class LiveRun:
    """A run's state folded from its events as they arrive, by the same fold and status rules as
    ``Client.snapshot`` (``fold_event`` and ``snapshot_of``), so the live view and ``status`` agree."""

    def __init__(self, handle: RunHandle, shape: GraphShape) -> None:
        self.handle = handle
        self.run_id = handle.run_id
        self.shape = shape
        self.views: dict[str, NodeView] = {}
        self.record: dict[str, Any] = {"workflow": handle.workflow, "status": RunStatus.RUNNING.value}
        self.accepted = False
        self.rejection: dict[str, Any] | None = None

    def apply(self, event: RunEvent) -> None:
        self.accepted = True
        if event.node is not None:
            fold_event(self.views, event.journal_entry())
        elif event.kind == "started":
            self.record.update(input=event.data.get("input"), created_at=event.data.get("created_at"))
        elif event.kind in RUN_END_KINDS:
            self.record.update(event.data, status=event.kind)
        elif event.kind == REJECTED and self.handle._concerns_us(event.data):  # not an earlier trigger's
            self.accepted = False
            self.rejection = event.data

    def snapshot(self) -> RunSnapshot:
        return snapshot_of(self.run_id, self.record, self.shape, self.views)


async def _follow(
    events: AsyncGenerator[RunEvent, None], run: LiveRun, changed: Callable[[RunEvent], None]
) -> None:
    async with aclosing(events):
        async for event in events:
            run.apply(event)
            if run.rejection is not None:
                raise run.handle._rejected(run.rejection)
            changed(event)


async def _tick(redraw: Callable[[], None], interval: float) -> None:
    while True:
        redraw()
        await asyncio.sleep(interval)


class _ChangePrinter:
    """Prints a line whenever the run or one of its nodes changes status or attempt (for logs), with
    the time since the run's first event by the server's clock, so a replayed run reads as it ran."""

    def __init__(self, console: Console, initial: RunSnapshot) -> None:
        self.console = console
        self.origin: float | None = None
        self.seen = {name: (node.status.value, node.attempts) for name, node in initial.nodes.items()}
        self.run_status: str | None = None

    def __call__(self, snapshot: RunSnapshot, at: float) -> None:
        self.origin = at if self.origin is None else self.origin
        elapsed = f"{at - self.origin:6.2f}s"
        if snapshot.status.value != self.run_status and snapshot.status not in TERMINAL_RUN:
            self._run_line(elapsed, snapshot)
        for name, node in snapshot.nodes.items():
            state = (node.status.value, node.attempts)
            if self.seen.get(name) == state:
                continue
            self.seen[name] = state
            line = Text(f"{elapsed}  {name:<20} ")
            line.append_text(status_text(node.status.value))
            if node.attempts:
                line.append(f" (attempt {node.attempts})")
            if node.error and node.status in (NodeStatus.RETRYING, NodeStatus.FAILED):
                line.append(f" {_error_text(node.error)}", style="red")
            self.console.print(line)
        if snapshot.status.value != self.run_status:
            self._run_line(elapsed, snapshot)

    def _run_line(self, elapsed: str, snapshot: RunSnapshot) -> None:
        """The run's own status: before its nodes' lines while it runs, after them once it ended."""
        self.run_status = snapshot.status.value
        line = Text(f"{elapsed}  run {snapshot.run_id} ")
        self.console.print(line.append_text(status_text(snapshot.status.value)))


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str, ensure_ascii=False)


# --- the DAG -------------------------------------------------------------------------------------
def node_depths(order: Sequence[str], upstreams: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Each node's depth: 0 for a root, else one more than its deepest upstream (``order`` is
    topological)."""
    depth: dict[str, int] = {}
    for name in order:
        ups = upstreams.get(name, ())
        depth[name] = 1 + max(depth[u] for u in ups) if ups else 0
    return depth


def render_graph_text(definition: WorkflowDefinition) -> str:
    """The nodes in topological order, indented by depth, each with ``<- upstreams`` and its options."""
    model = definition.input_model
    lines = [
        f"workflow {definition.name}: {len(definition.nodes)} node(s)"
        + (f", input {model.__name__}" if model is not None else "")
    ]
    depth = node_depths(definition.order, {n: spec.upstreams for n, spec in definition.nodes.items()})
    width = max(2 * depth[n] + len(n) for n in definition.order)
    for name in definition.order:
        spec = definition.nodes[name]
        label = "  " * depth[name] + name
        line = f"  {label:<{width}}"
        if spec.upstreams:
            line += "  <- " + ", ".join(spec.upstreams)
        notes = []
        if spec.retry is not None and spec.retry.max_attempts > 1:
            notes.append(f"retry x{spec.retry.max_attempts}")
        if spec.timeout is not None:
            notes.append(f"timeout {spec.timeout:g}s")
        if spec.continue_on_error:
            notes.append("continue on error")
        if not spec.is_async:
            notes.append("sync")
        if notes:
            line += f"  [{', '.join(notes)}]"
        lines.append(line.rstrip())
    return "\n".join(lines)


_MERMAID_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_MERMAID_RESERVED = frozenset({"end", "graph", "subgraph", "style", "class", "click", "flowchart"})


def render_graph_mermaid(definition: WorkflowDefinition) -> str:
    """A Mermaid ``graph TD`` block; continue-on-error edges are dotted (the downstream runs anyway)."""
    ids: dict[str, str] = {}
    for index, name in enumerate(definition.order):
        readable = _MERMAID_ID.match(name) and name.lower() not in _MERMAID_RESERVED
        ids[name] = name if readable else f"n{index}"
    lines = ["graph TD"]
    lines += [f'    {ids[name]}["{name}"]' for name in definition.order]
    for name in definition.order:
        for up in definition.nodes[name].upstreams:
            arrow = "-.->" if definition.nodes[up].continue_on_error else "-->"
            lines.append(f"    {ids[up]} {arrow} {ids[name]}")
    return "\n".join(lines)
