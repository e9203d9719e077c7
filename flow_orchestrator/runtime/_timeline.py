"""A run's timeline for ``flowctl show``: one span per node attempt, folded from the journal, drawn as
a Gantt chart scaled to the terminal (or printed as JSON).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.segment import Segment
from rich.style import Style
from rich.table import Table
from rich.text import Text

from flow_orchestrator.runtime._status import RunStatus

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")
_ATTEMPT_KINDS = frozenset({"started", "completed", "attempt_failed", "cancelled", "lost"})
OUTCOME_STYLES: Mapping[str, str] = {
    "completed": "green",
    "retried": "yellow",
    "failed": "bold red",
    "cancelled": "yellow",
    "lost": "magenta",
    "running": "cyan",
    "unfinished": "dim",
}


@dataclass(frozen=True, slots=True)
class AttemptSpan:
    """One attempt of one node: when it ran and how it ended (``completed``, ``retried`` (failed, and
    another attempt follows), ``failed``, ``cancelled``, ``lost`` (its worker vanished), ``running``,
    or ``unfinished`` when the run ended without a word from it)."""

    node: str
    attempt: int
    started_at: float | None
    finished_at: float | None
    outcome: str
    error: str | None = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)


@dataclass(frozen=True, slots=True)
class Timeline:
    run_id: str
    workflow: str
    status: str
    started_at: float | None
    finished_at: float | None
    trace_id: str | None
    spans: tuple[AttemptSpan, ...]
    error: Mapping[str, Any] | None = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return max(0.0, self.finished_at - self.started_at)

    def to_json(self) -> dict[str, Any]:
        """The document ``flowctl show --json`` prints; span times are ms since the run started."""

        def ms(at: float | None) -> float | None:
            return None if at is None or self.started_at is None else round((at - self.started_at) * 1000, 3)

        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status,
            "trace_id": self.trace_id,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "duration_ms": _ms(self.duration),
            "error": dict(self.error) if self.error else None,
            "attempts": [
                {
                    "node": span.node,
                    "attempt": span.attempt,
                    "start_ms": ms(span.started_at),
                    "end_ms": ms(span.finished_at),
                    "duration_ms": _ms(span.duration),
                    "outcome": span.outcome,
                    "error": span.error,
                }
                for span in self.spans
            ],
        }


def trace_id_of(record: Mapping[str, Any]) -> str | None:
    """The trace id in a run record's ``traceparent`` (``00-<trace id>-<span id>-<flags>``), if any."""
    traceparent = (record.get("trace") or {}).get("traceparent")
    match = _TRACEPARENT.match(traceparent) if isinstance(traceparent, str) else None
    return match.group(1) if match else None


def build_timeline(
    run_id: str,
    record: Mapping[str, Any],
    events: Iterable[Mapping[str, Any]],
    order: Sequence[str] = (),
    *,
    now: float | None = None,
) -> Timeline:
    """Fold journal events (``{node, kind, at, data}``, oldest first) into attempt spans (pure).

    Times are the workers' (``started_at``/``finished_at`` in the events), else the server's. A span
    with no end runs until ``now`` while the run runs. Spans are sorted by start, ties in ``order``.
    """
    status = str(record.get("status"))
    running = status == RunStatus.RUNNING.value
    now = time.time() if now is None else now
    spans: dict[tuple[str, int], dict[str, Any]] = {}
    for event in events:
        node, kind = str(event["node"]), str(event["kind"])
        data: Mapping[str, Any] = event.get("data") or {}
        if node.startswith("_") or kind not in _ATTEMPT_KINDS or "attempt" not in data:
            continue  # run-level events, and the supervisor's bookkeeping (retrying, retry, failed)
        span = spans.setdefault((node, int(data["attempt"])), {"outcome": None})
        at = event.get("at")
        if kind == "started":
            span["started_at"] = data.get("started_at", at)
        else:
            if span["outcome"] is None:  # the first word on an attempt is final
                span["outcome"] = _outcome(kind, data)
                span["error"] = _error_text(data.get("error"))
            span.setdefault("started_at", data.get("started_at"))
            span["finished_at"] = data.get("finished_at", at)
    position = {name: index for index, name in enumerate(order)}
    built = [
        AttemptSpan(
            node=node,
            attempt=attempt,
            started_at=span.get("started_at"),
            finished_at=span.get("finished_at") or (now if running and span["outcome"] is None else None),
            outcome=span["outcome"] or ("running" if running else "unfinished"),
            error=span.get("error"),
        )
        for (node, attempt), span in spans.items()
    ]
    built.sort(key=lambda s: (_first(s.started_at, s.finished_at), position.get(s.node, len(position))))
    starts = [s.started_at for s in built if s.started_at is not None]
    ends = [s.finished_at for s in built if s.finished_at is not None]
    started_at = min([*starts, record["created_at"]] if record.get("created_at") else starts, default=None)
    finished_at = record.get("finished_at") or (now if running else max(ends, default=None))
    return Timeline(
        run_id=run_id,
        workflow=str(record.get("workflow")),
        status=status,
        started_at=started_at,
        finished_at=finished_at,
        trace_id=trace_id_of(record),
        spans=tuple(built),
        error=record.get("error"),
    )


def render_timeline(timeline: Timeline) -> RenderableType:
    """The run's status, duration and trace id, then one row per attempt with a bar placed on the
    run's time axis (the bar column takes the console's remaining width), then the attempts' errors
    (below the chart, so a long message never squeezes the bars)."""
    heading = Text(f"run {timeline.run_id} of {timeline.workflow}: ", style="bold")
    heading.append(timeline.status, style=OUTCOME_STYLES.get(timeline.status, "bold"))
    total = timeline.duration
    if total is not None:
        heading.append(f" in {total * 1000:.1f} ms")
    trace = Text(f"trace: {timeline.trace_id or '(tracing off)'}")
    table = Table(expand=True)
    table.add_column("node", no_wrap=True)
    table.add_column("attempt", justify="right", no_wrap=True)
    table.add_column("timeline", ratio=1, min_width=10, no_wrap=True)
    table.add_column("duration ms", justify="right", no_wrap=True)
    table.add_column("outcome", no_wrap=True)
    errors: list[RenderableType] = []
    origin = timeline.started_at or 0.0
    size = total or 0.0
    for span in timeline.spans:
        style = OUTCOME_STYLES.get(span.outcome, "")
        start = (span.started_at or span.finished_at or origin) - origin
        end = (span.finished_at or span.started_at or origin) - origin
        table.add_row(
            span.node,
            str(span.attempt),
            SpanBar(size, start, end, style),
            f"{span.duration * 1000:.1f}" if span.duration is not None else "",
            Text(span.outcome, style=style),
        )
        if span.error:
            errors.append(Text(f"{span.node} attempt {span.attempt}: {span.error}", style="red"))
    return Group(heading, trace, table, *errors)


class SpanBar:
    """A bar from ``begin`` to ``end`` on an axis of ``size``, as wide as its column allows; even an
    instant gets one cell, so every attempt is visible."""

    def __init__(self, size: float, begin: float, end: float, style: str) -> None:
        self.size, self.begin, self.end, self.style = size, begin, end, Style.parse(style or "none")

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        if self.size > 0:
            first = min(width - 1, max(0, int(width * self.begin / self.size)))
            last = min(width, max(first + 1, round(width * self.end / self.size)))
        else:
            first, last = 0, 1
        yield Segment(" " * first)
        yield Segment("█" * (last - first), self.style)
        yield Segment(" " * (width - last))

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(1, options.max_width)


def _outcome(kind: str, data: Mapping[str, Any]) -> str:
    if kind == "attempt_failed":
        return "retried" if data.get("retry") else "failed"
    return kind


def _error_text(error: Any) -> str | None:
    if not isinstance(error, Mapping):
        return None
    return f"{error.get('type') or 'Error'}: {error.get('message') or ''}"


def _first(*values: float | None) -> float:
    return next((v for v in values if v is not None), float("inf"))


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 3) if seconds is not None else None
