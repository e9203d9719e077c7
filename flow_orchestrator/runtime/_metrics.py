"""``MetricsInterceptor``: run and node-attempt metrics with the OpenTelemetry metrics API.

Attempts are measured around the action; run starts and ends, retries, lost attempts and dead letters
are counted from the events the worker publishes, so each is counted once, where it is decided.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from opentelemetry import metrics

from flow_orchestrator._bounded import remember
from flow_orchestrator.bus._interceptors import Interceptor
from flow_orchestrator.bus._subjects import DLQ_TOKEN, RUN_TOKEN, TRIGGER_TOKEN
from flow_orchestrator.bus.types import ExecuteNodeInput, NodeCall, PublishCall, PublishInput
from flow_orchestrator.runtime._tracing import INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION

# Seconds: from a millisecond step to a long action (the SDK's default buckets are for milliseconds).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_WATCHED = frozenset(
    {"started", "completed", "failed", "cancelled", "retrying", "lost", "rejected", "dead_lettered"}
)


class MetricsInterceptor(Interceptor):
    """Counters and histograms for runs and node attempts (names, units and attributes in
    ``docs/observability.md``). ``meter_provider``: None for the global one."""

    def __init__(
        self, meter_provider: metrics.MeterProvider | None = None, *, capacity: int = 10_000
    ) -> None:
        meter = (meter_provider or metrics.get_meter_provider()).get_meter(
            INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION
        )
        run, attempt = "{run}", "{attempt}"
        self.runs_started = meter.create_counter("flow.runs.started", run, "Runs started.")
        self.runs_completed = meter.create_counter("flow.runs.completed", run, "Runs that completed.")
        self.runs_failed = meter.create_counter("flow.runs.failed", run, "Runs that failed.")
        self.runs_cancelled = meter.create_counter("flow.runs.cancelled", run, "Runs cancelled.")
        self.run_duration = meter.create_histogram(
            "flow.run.duration",
            "s",
            "From a run's start to its end.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.attempt_duration = meter.create_histogram(
            "flow.node.attempt.duration",
            "s",
            "Duration of one attempt of a node's action (with the interceptors inside this one).",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.queue_lag = meter.create_histogram(
            "flow.node.queue_lag",
            "s",
            "From the publication of the event that starts an attempt to the attempt's start.",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
        )
        self.in_flight = meter.create_up_down_counter(
            "flow.node.attempts.in_flight", attempt, "Attempts running on this worker."
        )
        self.retries = meter.create_counter(
            "flow.node.retries", attempt, "Retries scheduled after a failed attempt."
        )
        self.attempts_lost = meter.create_counter(
            "flow.node.attempts.lost", attempt, "Attempts lost with their worker and run again."
        )
        self.dead_letters = meter.create_counter(
            "flow.dead_letters", "{message}", "Messages rejected and dead-lettered (by reason)."
        )
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._capacity = capacity

    async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
        attributes = {"workflow": input.workflow, "node": input.node}
        # Queue lag: from the triggering message's storage (an upstream's completion) to this start.
        published_at = input.published_at
        if published_at is not None:
            self.queue_lag.record(max(0.0, time.time() - published_at), attributes)
        self.in_flight.add(1, attributes)
        started, outcome = time.perf_counter(), "failed"
        try:
            output = await call_next(input)
            outcome = "completed"
            return output
        except BaseException as exc:
            if not isinstance(exc, Exception):
                outcome = "cancelled"
            raise
        finally:
            self.in_flight.add(-1, attributes)
            self.attempt_duration.record(time.perf_counter() - started, {**attributes, "outcome": outcome})

    async def publish(self, input: PublishInput, call_next: PublishCall) -> None:
        await call_next(input)
        subject = input.subject
        if input.duplicate or subject[subject.rfind(".") + 1 :] not in _WATCHED:
            return  # a repeat JetStream already had (a redelivery's re-announcement) counts once
        parts = subject.split(".")
        if len(parts) != 6 or parts[1] != "evt":
            return
        _, _, workflow, run_id, node, kind = parts
        payload = input.payload if isinstance(input.payload, Mapping) else {}
        attributes = {"workflow": workflow}
        if node == RUN_TOKEN:
            self._run_event(workflow, run_id, kind, payload)
        elif (node == TRIGGER_TOKEN and kind == "rejected") or (
            node == DLQ_TOKEN and kind == "dead_lettered"
        ):
            # A trigger that became no run, or a message of a running run (poison, max_deliveries).
            self.dead_letters.add(1, {**attributes, "reason": str(payload.get("reason") or "unknown")})
        elif kind == "retrying":
            self.retries.add(1, {**attributes, "node": node})
        elif kind == "lost":
            self.attempts_lost.add(1, {**attributes, "node": node})

    def _run_event(self, workflow: str, run_id: str, kind: str, payload: Mapping[str, Any]) -> None:
        attributes = {"workflow": workflow}
        if kind == "started":
            self.runs_started.add(1, attributes)
            return
        ends = {
            "completed": self.runs_completed,
            "failed": self.runs_failed,
            "cancelled": self.runs_cancelled,
        }
        counter = ends.get(kind)
        # A run's end may be announced more than once (recovery after a crash): count it once here.
        if counter is None or run_id in self._ended:
            return
        remember(self._ended, run_id, None, self._capacity)
        counter.add(1, attributes)
        created, finished = payload.get("created_at"), payload.get("finished_at")
        if isinstance(created, int | float) and isinstance(finished, int | float):
            self.run_duration.record(max(0.0, finished - created), {**attributes, "status": kind})
