"""``TriggerActor`` turns trigger messages into runs; ``TriggerRouter`` dead-letters unknown workflows.

A trigger's ``Nats-Msg-Id`` is its idempotency key and becomes the run id: the stream drops repeats
within its duplicate window, and the run record's create-only write drops them forever after.
Without the header, the run id is derived from the message's stream sequence and time, so a
redelivered trigger still maps to the same run.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from flow_orchestrator._errors import (
    InvalidRunId,
    PayloadTooLarge,
    StateConflict,
    UnencodableValue,
    UnknownWorkflow,
)
from flow_orchestrator.actors._actor import Actor, ConsumerSpec
from flow_orchestrator.actors._faults import crash_point
from flow_orchestrator.actors._system import MSG_ID, ActorSystem
from flow_orchestrator.bus._codec import decode_trigger
from flow_orchestrator.bus._propagation import trace_headers
from flow_orchestrator.bus._subjects import Names, is_valid_run_id
from flow_orchestrator.bus.types import TriggerInput
from flow_orchestrator.runtime._status import RunStatus
from flow_orchestrator.runtime._workflow import WorkflowDefinition

RUN_ID_HEADER = "Flow-Run-Id"


def run_id_for(msg: Msg) -> str:
    """The run id of a trigger: ``Flow-Run-Id`` (a replayed dead letter), else its ``Nats-Msg-Id``,
    else one derived from the message, stable across redeliveries."""
    headers = msg.headers or {}
    header = RUN_ID_HEADER if headers.get(RUN_ID_HEADER) else MSG_ID
    given = headers.get(header)
    if given is not None:
        if not is_valid_run_id(given):
            raise InvalidRunId(
                f"trigger on {msg.subject!r} has run id ({header}) {given!r}, which is not valid: "
                "use 1-128 letters, digits, '_' or '-'"
            )
        return given
    meta = msg.metadata
    stamp = int(meta.timestamp.timestamp() * 1_000_000) if meta.timestamp else 0
    return f"r{meta.sequence.stream:x}-{stamp:x}"


class TriggerActor(Actor):
    """Validates one workflow's triggers and creates their runs."""

    def __init__(
        self,
        system: ActorSystem,
        definition: WorkflowDefinition,
        *,
        start_time: datetime.datetime,
        **options: Any,
    ) -> None:
        names = system.names
        super().__init__(
            system,
            ConsumerSpec(
                stream=names.triggers_stream,
                durable=names.trigger_consumer(definition.name),
                filter_subjects=(names.trigger(definition.name),),
                deliver_policy=DeliverPolicy.BY_START_TIME,
                opt_start_time=start_time,
                ack_wait=options.pop("ack_wait", 30.0),
            ),
            **options,
        )
        self.definition = definition

    async def receive(self, msg: Msg) -> None:
        run_id = run_id_for(msg)
        headers = dict(msg.headers or {})
        payload = decode_trigger(msg.data, headers, self.system.max_trigger_bytes)
        request = TriggerInput(self.definition.name, run_id, payload, headers, self.definition.input_model)
        validated = await self.system.chain.receive_trigger(request)
        # Interceptors may have set the run's trace context (a tracing interceptor does): keep it.
        trace = trace_headers(request.headers)
        seq = int(msg.metadata.sequence.stream)
        record: dict[str, Any] = {
            "workflow": self.definition.name,
            "status": RunStatus.RUNNING.value,
            "input": validated,
            "created_at": time.time(),
            "trigger_seq": seq,
            "results": {},
        }
        if trace:
            record["trace"] = trace
        key = Names.run_key(run_id)
        try:
            await self.system.store.create(key, record)
        except UnencodableValue as exc:  # the input fits a trigger but not a run record
            raise PayloadTooLarge(f"the run's input cannot be stored: {exc}") from exc
        except StateConflict:
            existing = await self.system.store.get(key)
            # Same trigger message redelivered after the record was written: finish starting it.
            # Anything else is a repeated idempotency key: one run, not two.
            if existing is None or existing.value.get("trigger_seq") != seq:
                await msg.ack()
                return
            record = existing.value
        crash_point("trigger.after_record")
        await self.system.emit(
            self.system.names.run_event(self.definition.name, run_id, "started"),
            {"input": record["input"], "created_at": record["created_at"]},
            msg_id=f"{run_id}.run.started",
            headers=trace_headers(record.get("trace")),
        )
        await msg.ack()


class TriggerRouter(Actor):
    """Sees every trigger; dead-letters those for a workflow no worker has registered.

    A workflow's trigger consumer starts ``grace`` seconds before its registration time, so a trigger
    is owned by that consumer exactly when its timestamp is at least registration time minus grace.
    Unowned triggers wait out the grace (a worker may be starting) and are then dead-lettered.
    """

    def __init__(self, system: ActorSystem, **options: Any) -> None:
        names = system.names
        super().__init__(
            system,
            ConsumerSpec(
                stream=names.triggers_stream,
                durable=names.router_consumer,
                filter_subjects=(f"{names.prefix}.trigger.>",),
                ack_wait=options.pop("ack_wait", 30.0),
            ),
            **options,
        )
        self._registered: dict[str, float] = {}

    async def _registration(self, workflow: str) -> float | None:
        if workflow in self._registered:
            return self._registered[workflow]
        found = await self.system.store.get(Names.workflow_key(workflow))
        if found is None:
            return None
        registered = float(found.value["registered_at"])
        self._registered[workflow] = registered
        return registered

    async def receive(self, msg: Msg) -> None:
        workflow = msg.subject.split(".", 2)[2]
        if "." in workflow:  # no workflow has a name of several tokens: waiting would not help
            raise UnknownWorkflow(
                f"trigger subject {msg.subject!r} names no workflow: a workflow's trigger subject is "
                f"{self.system.names.trigger('<workflow>')!r}, one token after 'trigger'"
            )
        meta = msg.metadata
        published = meta.timestamp.timestamp() if meta.timestamp else time.time()
        grace = self.system.unknown_workflow_grace
        registered = await self._registration(workflow)
        if registered is None and workflow in self._registered:
            del self._registered[workflow]
        if registered is not None and published >= registered - grace:
            await msg.ack()
            return
        waited = time.time() - published
        if waited < grace:
            await msg.nak(delay=max(0.05, grace - waited))
            return
        raise UnknownWorkflow(
            f"no worker has registered workflow {workflow!r} (trigger waited {waited:.1f}s); start a worker "
            f"that hosts it, then replay the dead letter"
        )
