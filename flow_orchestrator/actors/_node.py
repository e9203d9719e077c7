"""``NodeActor``: runs one node of one workflow for every run, on whichever worker gets the event.

It consumes its upstreams' ``completed`` events (the run's ``started`` event for a root, the
``failed`` events of continue-on-error upstreams, and its own scheduled ``retry`` events) through one
durable consumer shared by all workers. Per (run, node) the KV record is the fence: an attempt starts
only by a compare-and-set that claims it, and it finishes only by a compare-and-set on the revision
it claimed, so two workers can never both finish an attempt, and a finished node never runs again.

A message that claimed an attempt is its *holder* (the record keeps its stream sequence). If that
very message comes back (its worker died and the ack wait expired), the attempt was lost: it is
resumed as the next attempt. Any other duplicate is acknowledged and dropped.
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg

from flow_orchestrator._errors import StateConflict
from flow_orchestrator.actors import _records as rec
from flow_orchestrator.actors._actor import Actor, ConsumerSpec
from flow_orchestrator.actors._system import ActorSystem
from flow_orchestrator.bus._codec import decode
from flow_orchestrator.bus._kv import Versioned
from flow_orchestrator.bus._subjects import RUN_TOKEN, Names, parse_event_subject
from flow_orchestrator.bus.types import ExecuteNodeInput
from flow_orchestrator.runtime._context import NodeContext
from flow_orchestrator.runtime._data import WorkflowData
from flow_orchestrator.runtime._retry import NO_RETRY
from flow_orchestrator.runtime._workflow import NodeSpec, WorkflowDefinition


@dataclass(slots=True)
class Claim:
    run_id: str
    attempt: int
    revision: int
    record: dict[str, Any]
    raw_input: Any
    outputs: dict[str, Any]


class NodeActor(Actor):
    """Hosts one node on one worker; see the module docstring for the protocol."""

    def __init__(
        self, system: ActorSystem, definition: WorkflowDefinition, spec: NodeSpec, **options: Any
    ) -> None:
        names = system.names
        wf = definition.name
        subjects = [names.event(wf, "*", up, "completed") for up in spec.upstreams]
        subjects += [
            names.event(wf, "*", up, "failed")
            for up in spec.upstreams
            if definition.nodes[up].continue_on_error
        ]
        if not spec.upstreams:
            subjects.append(names.run_event(wf, "*", "started"))
        subjects.append(names.event(wf, "*", spec.name, "retry"))
        super().__init__(
            system,
            ConsumerSpec(
                stream=names.events_stream,
                durable=names.node_consumer(wf, spec.name),
                filter_subjects=tuple(subjects),
                ack_wait=options.pop("ack_wait", 30.0),
            ),
            **options,
        )
        self.definition = definition
        self.node = spec
        self._needed = frozenset(spec.upstreams)
        self._action = self._wrap(spec)

    def _wrap(self, spec: NodeSpec) -> Any:
        if spec.is_async:
            return spec.action
        loop_executor = self.system.executor

        async def run_sync(ctx: NodeContext) -> Any:
            return await asyncio.get_running_loop().run_in_executor(
                loop_executor, functools.partial(spec.action, ctx)
            )

        return run_sync

    # --- receiving ------------------------------------------------------------------------------
    async def receive(self, msg: Msg) -> None:
        _, run_id, source, kind = parse_event_subject(msg.subject)
        if self.system.gate.closed(run_id):
            await msg.ack()
            return
        payload = decode(msg.data)
        seq = int(msg.metadata.sequence.stream)
        if kind == "retry":
            claim = await self._claim_retry(run_id, payload, seq)
        elif source == RUN_TOKEN:
            claim = await self._claim_first(run_id, payload, seq, {})
        elif len(self._needed) == 1:
            claim = await self._claim_first(run_id, payload, seq, {source: payload.get("output")})
        else:
            claim = await self._join(run_id, source, payload, seq)
        if claim is None:
            await msg.ack()
            return
        await self._run_attempt(msg, claim)

    async def _claim_first(
        self, run_id: str, payload: dict[str, Any], seq: int, outputs: dict[str, Any]
    ) -> Claim | None:
        """Single upstream (or a root): one create claims attempt 1; no join record is needed."""
        record = rec.running(1, seq, self.system.worker_id)
        try:
            revision = await self.system.store.create(self._key(run_id), record)
        except StateConflict:
            return await self._recover(run_id, payload, seq, outputs)
        return Claim(run_id, 1, revision, record, payload.get("input"), outputs)

    async def _join(self, run_id: str, source: str, payload: dict[str, Any], seq: int) -> Claim | None:
        """Several upstreams: record the arrival; whoever completes the set claims attempt 1."""
        key = self._key(run_id)

        def arrive(current: dict[str, Any] | None) -> dict[str, Any] | None:
            current = current or {"status": rec.PENDING, "arrived": []}
            if current["status"] != rec.PENDING or source in current["arrived"]:
                return None
            arrived = [*current["arrived"], source]
            if self._needed.issubset(arrived):
                return rec.running(1, seq, self.system.worker_id, arrived)
            return {"status": rec.PENDING, "arrived": arrived}

        written, revision = await self.system.store.mutate(key, arrive)
        if written is None:
            return await self._recover(run_id, payload, seq, None)
        if written["status"] != rec.RUNNING or revision is None:
            return None
        outputs = await self._gather_outputs(run_id, {source: payload.get("output")})
        return Claim(run_id, 1, revision, written, payload.get("input"), outputs)

    async def _gather_outputs(self, run_id: str, known: dict[str, Any]) -> dict[str, Any]:
        missing = [up for up in self.node.upstreams if up not in known]
        found = await asyncio.gather(*(self.system.store.get(Names.node_key(run_id, up)) for up in missing))
        outputs = dict(known)
        for up, entry in zip(missing, found, strict=True):
            outputs[up] = entry.value.get("output") if entry is not None else None
        return {up: outputs.get(up) for up in self.node.upstreams}

    async def _claim_retry(self, run_id: str, payload: dict[str, Any], seq: int) -> Claim | None:
        attempt = int(payload["attempt"])
        current = await self.system.store.get(self._key(run_id))
        if current is None:
            return None
        record = current.value
        if record.get("status") == rec.RETRYING and record.get("attempt") == attempt - 1:
            new = {**rec.running(attempt, seq, self.system.worker_id), "arrived": record.get("arrived")}
            try:
                revision = await self.system.store.update(self._key(run_id), new, current.revision)
            except StateConflict:
                return await self._recover(run_id, payload, seq, payload.get("outputs"))
            return Claim(run_id, attempt, revision, new, payload.get("input"), payload.get("outputs") or {})
        return await self._recover(run_id, payload, seq, payload.get("outputs"))

    async def _recover(
        self, run_id: str, payload: dict[str, Any], seq: int, outputs: dict[str, Any] | None
    ) -> Claim | None:
        """The claim found an existing record: a duplicate, a lost attempt, or a half-finished one.

        Only the record's holder (the message that claimed the current attempt) may act on it; any
        other message is a duplicate and is dropped.
        """
        current = await self.system.store.get(self._key(run_id))
        if current is None or current.value.get("holder") != seq:
            return None
        record = current.value
        status = record.get("status")
        if status == rec.COMPLETED:
            # Finished, but the worker may have died before its completion event: publish it again
            # (deduplicated by message id if it did go out).
            await self._announce_completed(run_id, record, payload.get("input"))
        elif status in (rec.RETRYING, rec.FAILED):
            await self._announce_failure(run_id, record, payload.get("input"), outputs or {})
        elif status == rec.RUNNING:
            return await self._resume_lost(run_id, current, seq=seq, payload=payload, outputs=outputs)
        return None

    async def _resume_lost(
        self,
        run_id: str,
        current: Versioned,
        *,
        seq: int,
        payload: dict[str, Any],
        outputs: dict[str, Any] | None,
    ) -> Claim | None:
        """The holder came back while its attempt was running: that worker lost it. Resume as the
        next attempt; the compare-and-set fences the old worker out if it is merely slow."""
        record, revision = current.value, current.revision
        attempt = int(record["attempt"]) + 1
        lost = {"attempt": attempt - 1, "worker": record.get("worker")}
        new = {
            **rec.running(attempt, seq, self.system.worker_id),
            "arrived": record.get("arrived"),
            "lost": [*record.get("lost", []), lost],
        }
        try:
            new_revision = await self.system.store.update(self._key(run_id), new, revision)
        except StateConflict:
            return None
        await self.system.emit(self._subject(run_id, "lost"), lost, durable=False)
        if outputs is None:
            outputs = await self._gather_outputs(run_id, {})
        return Claim(run_id, attempt, new_revision, new, payload.get("input"), outputs)

    # --- running --------------------------------------------------------------------------------
    async def _run_attempt(self, msg: Msg, claim: Claim) -> None:
        ctx = NodeContext(
            workflow=self.definition.name,
            run_id=claim.run_id,
            node=self.node.name,
            attempt=claim.attempt,
            raw_input=claim.raw_input,
            input_model=self.definition.input_model,
            outputs=claim.outputs,
            data=WorkflowData(self.system.store, claim.run_id),
        )
        request = ExecuteNodeInput(
            workflow=self.definition.name,
            run_id=claim.run_id,
            node=self.node.name,
            attempt=claim.attempt,
            context=ctx,
            action=self._action,
            headers=msg.headers or {},
            timeout=self.node.timeout,
            retry=self.node.retry,
            output_model=self.node.output_model,
        )
        await self.system.emit(
            self._subject(claim.run_id, "started"),
            {"attempt": claim.attempt, "worker": self.system.worker_id},
            durable=False,
        )
        task = asyncio.current_task()
        assert task is not None
        self.system.gate.track(claim.run_id, task)
        try:
            output = await self.system.chain.execute_node(request)
        except asyncio.CancelledError:
            if self.system.gate.closed(claim.run_id) == "cancelled":
                task.uncancel()
                await self._finish_cancelled(msg, claim)
                return
            raise
        except Exception as exc:
            await self._finish_failed(msg, claim, request, exc)
            return
        finally:
            self.system.gate.untrack(claim.run_id, task)
        await self._finish_completed(msg, claim, output)

    async def _finish_completed(self, msg: Msg, claim: Claim, output: Any) -> None:
        record = {**claim.record, "status": rec.COMPLETED, "output": output, "finished_at": time.time()}
        try:
            await self.system.store.update(self._key(claim.run_id), record, claim.revision)
        except StateConflict:
            return  # fenced: another worker took this attempt over; its delivery owns the message
        await self._announce_completed(claim.run_id, record, claim.raw_input)
        await msg.ack()

    async def _announce_completed(self, run_id: str, record: dict[str, Any], raw_input: Any) -> None:
        await self.system.emit(
            self._subject(run_id, "completed"),
            {"output": record.get("output"), "input": raw_input, "attempt": record.get("attempt")},
            msg_id=f"{run_id}.{self.node.name}.completed",
        )

    async def _finish_failed(
        self, msg: Msg, claim: Claim, request: ExecuteNodeInput, exc: BaseException
    ) -> None:
        policy = request.retry or NO_RETRY
        error = rec.error_info(exc, policy)
        retry = bool(error["retryable"]) and policy.allows_another(claim.attempt)
        record = {
            **claim.record,
            "status": rec.RETRYING if retry else rec.FAILED,
            "error": error,
            "finished_at": time.time(),
            "policy": rec.policy_dict(policy),
        }
        try:
            await self.system.store.update(self._key(claim.run_id), record, claim.revision)
        except StateConflict:
            return
        await self._announce_failure(claim.run_id, record, claim.raw_input, claim.outputs)
        await msg.ack()

    async def _announce_failure(
        self, run_id: str, record: dict[str, Any], raw_input: Any, outputs: dict[str, Any]
    ) -> None:
        attempt = int(record["attempt"])
        await self.system.emit(
            self._subject(run_id, "attempt_failed"),
            {
                "attempt": attempt,
                "error": record.get("error"),
                "retry": record["status"] == rec.RETRYING,
                "policy": record.get("policy"),
                "input": raw_input,
                "outputs": outputs,
            },
            msg_id=f"{run_id}.{self.node.name}.{attempt}.attempt_failed",
        )

    async def _finish_cancelled(self, msg: Msg, claim: Claim) -> None:
        record = {**claim.record, "status": rec.CANCELLED, "finished_at": time.time()}
        try:
            await self.system.store.update(self._key(claim.run_id), record, claim.revision)
        except StateConflict:
            return
        await msg.ack()

    def _key(self, run_id: str) -> str:
        return Names.node_key(run_id, self.node.name)

    def _subject(self, run_id: str, kind: str) -> str:
        return self.system.names.event(self.definition.name, run_id, self.node.name, kind)
