"""``SupervisorActor``: decides what a failure means and when a run is over.

It consumes a workflow's ``attempt_failed`` events, its sinks' ``completed`` events and cancel
requests. A retry is a *scheduled message* (``Nats-Schedule: @at ...``) stored in the events stream,
so the backoff delay survives any worker restart; the server delivers it as the node's ``retry``
event when due. A final failure either releases downstream nodes (continue-on-error) or fails the run
at once (fail-fast). Every run-level change is a compare-and-set on the run record.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import time
from typing import Any

from nats.aio.msg import Msg

from flow_orchestrator._errors import FlowError, StateConflict, UnencodableValue
from flow_orchestrator.actors import _records as rec
from flow_orchestrator.actors._actor import Actor, ConsumerSpec, log
from flow_orchestrator.actors._faults import crash_point
from flow_orchestrator.actors._system import OWED_ARRIVAL, ActorSystem, end_event, epoch_of_record
from flow_orchestrator.bus._codec import decode_event
from flow_orchestrator.bus._propagation import carried_headers, epoch_of, trace_headers
from flow_orchestrator.bus._subjects import RUN_TOKEN, Names, parse_event_subject
from flow_orchestrator.runtime._status import RunStatus
from flow_orchestrator.runtime._workflow import WorkflowDefinition

SCHEDULE = "Nats-Schedule"
SCHEDULE_TARGET = "Nats-Schedule-Target"
_RUNNING, _FAILED = RunStatus.RUNNING.value, RunStatus.FAILED.value
RETRY_CHOOSES_WITHIN = 30.0  # seconds a retry may take between reopening a run and naming its attempts


def _superseded(record: dict[str, Any], node: str, attempt: int, lineage: int) -> bool:
    """Whether a retry after epoch ``lineage`` issued ``node`` an attempt after ``attempt``."""
    entries = [e for e in record.get("resumed") or [] if int(e.get("epoch") or 0) > lineage]
    for entry in entries:
        issued = entry.get("attempts")
        if issued is None:
            if entry is entries[-1] and time.time() - float(entry.get("at") or 0) < RETRY_CHOOSES_WITHIN:
                # That retry is choosing its nodes right now: look again in a moment.
                raise RetryNotSettled(f"the run's retry has not named its attempts yet (node {node!r})")
            continue  # a retry that never named them (it stopped halfway): it tells nothing
        if node in issued and attempt < int(issued[node]):
            return True
    return False


class RetryNotSettled(FlowError, ConnectionError):
    """A failure report met a retry halfway through: it is handed back, to be delivered again. A
    ``ConnectionError`` so that actors treat it as transient (never poison): how long the retry
    takes is not the message's fault."""


def schedule_time(delay: float, now: float | None = None) -> str:
    """An ``@at`` schedule expression ``delay`` seconds from now (RFC 3339, UTC, microseconds)."""
    when = dt.datetime.fromtimestamp((now or time.time()) + delay, tz=dt.UTC)
    return "@at " + when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SupervisorActor(Actor):
    def __init__(self, system: ActorSystem, definition: WorkflowDefinition, **options: Any) -> None:
        names = system.names
        wf = definition.name
        self.sinks = frozenset(definition.sinks)
        subjects = [names.event(wf, "*", "*", "attempt_failed"), names.run_event(wf, "*", "cancel")]
        subjects += [names.event(wf, "*", sink, "completed") for sink in definition.sinks]
        super().__init__(
            system,
            ConsumerSpec(
                stream=names.events_stream,
                durable=names.supervisor_consumer(wf),
                filter_subjects=tuple(subjects),
                ack_wait=options.pop("ack_wait", 30.0),
            ),
            **options,
        )
        self.definition = definition

    async def receive(self, msg: Msg) -> None:
        _, run_id, node, kind = parse_event_subject(msg.subject)
        payload = decode_event(msg.data, msg.subject, empty_ok=True)
        trace = carried_headers(msg.headers)
        if node == RUN_TOKEN and kind == "cancel":
            await self._cancel(run_id, payload, trace)
        elif kind == "attempt_failed":
            await self._attempt_failed(run_id, node, payload, trace)
        elif kind == "completed" and node in self.sinks:
            await self._sink_resolved(run_id, node, payload.get("output"), trace)
        await msg.ack()

    async def _attempt_failed(
        self, run_id: str, node: str, payload: dict[str, Any], trace: dict[str, str]
    ) -> None:
        attempt = int(payload["attempt"])
        error = payload.get("error") or {}
        if payload.get("retry"):
            policy = rec.policy_from(payload.get("policy") or {})
            requested = error.get("retry_after")
            delay = (
                min(float(requested), policy.max_delay) if requested is not None else policy.delay(attempt)
            )
            await self._schedule_retry(run_id, node, attempt + 1, delay=delay, payload=payload, trace=trace)
            return
        if payload.get(OWED_ARRIVAL) and await self._went_ahead(run_id, node):
            # The give-up found this join owed the message's arrival, but it went ahead since: an
            # earlier delivery of the same message, stalled past its ack wait, recorded the arrival
            # and made it ready, or a retry's message started it from the journal.
            log.warning("run %s: %s went ahead after all; its poison report is dropped", run_id, node)
            return
        spec = self.definition.nodes[node]
        if spec.continue_on_error:
            await self.system.emit(
                self._subject(run_id, node, "failed"),
                {"output": None, "input": payload.get("input"), "error": error, "attempt": attempt},
                msg_id=f"{run_id}.{node}.failed",
                headers=trace,
            )
            if node in self.sinks:
                await self._sink_resolved(run_id, node, None, trace)
            return
        await self._fail_run(run_id, node, error, trace, attempt=attempt)

    async def _went_ahead(self, run_id: str, join: str) -> bool:
        _, epoch = await self.system.run_state(run_id)
        return await self.system.join_went_ahead(self.definition.name, run_id, join, epoch)

    async def _schedule_retry(
        self,
        run_id: str,
        node: str,
        attempt: int,
        *,
        delay: float,
        payload: dict[str, Any],
        trace: dict[str, str],
    ) -> None:
        names = self.system.names
        body = {"attempt": attempt, "input": payload.get("input"), "outputs": payload.get("outputs") or {}}
        target = self._subject(run_id, node, "retry")
        await self.system.emit(
            self._subject(run_id, node, "retrying"),
            {"attempt": attempt - 1, "next_attempt": attempt, "delay": delay, "error": payload.get("error")},
            headers=trace,
            durable=False,
        )
        if delay <= 0:
            await self.system.emit(target, body, msg_id=f"{run_id}.{node}.{attempt}.retry", headers=trace)
            return
        # The server keeps a scheduled message's own headers when it delivers it: the trace goes along.
        await self.system.emit(
            names.schedule(self.definition.name, run_id, node, attempt),
            body,
            msg_id=f"{run_id}.{node}.{attempt}.schedule",
            headers={**trace, SCHEDULE: schedule_time(delay), SCHEDULE_TARGET: target},
        )
        crash_point("supervisor.after_schedule", node)

    async def _fail_run(
        self,
        run_id: str,
        node: str,
        error: dict[str, Any],
        trace: dict[str, str],
        *,
        attempt: int | None = None,
    ) -> None:
        """Fail the run, unless ``attempt`` (None: not an attempt's report) is from before a retry
        that issued the node a later one (a dead-lettered delivery reports attempt 0)."""
        info = {"node": node, "type": error.get("type"), "message": error.get("message")}
        lineage = epoch_of(trace)

        def fail(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None or current.get("status") != _RUNNING:
                return None
            if (
                attempt is not None
                and lineage < epoch_of_record(current)
                and _superseded(current, node, attempt, lineage)
            ):
                return None  # an attempt from before the run's retry, which issued a later one
            return {**current, "status": RunStatus.FAILED.value, "error": info, "finished_at": time.time()}

        written, _ = await self.system.store.mutate(Names.run_key(run_id), fail)
        await self._announce_end(run_id, written, trace)

    async def _sink_resolved(self, run_id: str, sink: str, output: Any, trace: dict[str, str]) -> None:
        def resolve(current: dict[str, Any] | None) -> dict[str, Any] | None:
            # A failed run keeps its sinks' results too: if it is retried, they still count.
            if current is None or current.get("status") not in (_RUNNING, _FAILED):
                return None
            results = dict(current.get("results") or {})
            if sink in results:
                return None
            results[sink] = output
            new = {**current, "results": results}
            if current["status"] == _RUNNING and self.sinks.issubset(results):
                new.update(status=RunStatus.COMPLETED.value, finished_at=time.time())
            return new

        try:
            written, _ = await self.system.store.mutate(Names.run_key(run_id), resolve)
        except UnencodableValue as exc:  # the results do not fit in the run record: the run cannot end well
            error = {"type": "UnencodableValue", "message": f"the run's results cannot be stored: {exc}"}
            await self._mark_unstorable(run_id, sink, error)
            await self._fail_run(run_id, sink, error, trace)
            return
        if written is None or written["status"] == RunStatus.COMPLETED.value:
            await self._announce_end(run_id, written, trace)

    async def _mark_unstorable(self, run_id: str, sink: str, error: dict[str, Any]) -> None:
        """Keep that ``sink``'s result does not fit the run's record, in a key of its own (so that it
        always fits), before the run is failed for it. The result is not kept and the sink,
        completed, never runs again: no retry could complete the run, and ``flowctl retry`` refuses
        it (it used to run the rest and then wait for that result for good). Written first: a retry
        that reopened the run before it sees no mark, but the failure that follows ends that run."""
        info = {"node": sink, "type": error["type"], "message": error["message"]}
        with contextlib.suppress(StateConflict):  # a redelivery, or another sink's result
            await self.system.store.create(Names.unstorable_key(run_id), info)

    async def _cancel(self, run_id: str, payload: dict[str, Any], trace: dict[str, str]) -> None:
        def cancel(current: dict[str, Any] | None) -> dict[str, Any] | None:
            if current is None or current.get("status") != _RUNNING:
                return None
            error = {"type": "RunCancelled", "message": payload.get("reason") or "cancelled"}
            return {
                **current,
                "status": RunStatus.CANCELLED.value,
                "finished_at": time.time(),
                "error": error,
            }

        written, _ = await self.system.store.mutate(Names.run_key(run_id), cancel)
        await self._announce_end(run_id, written, trace)

    async def _announce_end(self, run_id: str, written: dict[str, Any] | None, trace: dict[str, str]) -> None:
        """Publish the run's terminal event. Also when this delivery changed nothing (``written`` is
        None): a redelivery after a crash between the record write and the event must still announce
        it; the message id makes a repeat harmless. The run's own trace context (kept in its record)
        goes on the event, so tracing can close the run's root span."""
        if written is not None:
            crash_point("supervisor.after_record")
        record = written
        if record is None:
            current = await self.system.store.get(Names.run_key(run_id))
            record = current.value if current else None
        if record is None or record.get("status") == _RUNNING:
            return
        body, msg_id = end_event(run_id, record)
        headers = {**trace, **trace_headers(record.get("trace"))}
        subject = self._run_subject(run_id, record["status"])
        try:
            await self.system.emit(subject, body, msg_id=msg_id, headers=headers)
        except UnencodableValue:
            if "results" not in body:
                raise
            # Results that fit in the run record, but not in one message with the event's other
            # fields and headers: the event says where they are instead of never going out.
            del body["results"]
            body["results_in_record"] = True
            await self.system.emit(subject, body, msg_id=msg_id, headers=headers)

    def _subject(self, run_id: str, node: str, kind: str) -> str:
        return self.system.names.event(self.definition.name, run_id, node, kind)

    def _run_subject(self, run_id: str, kind: str) -> str:
        return self.system.names.run_event(self.definition.name, run_id, kind)
