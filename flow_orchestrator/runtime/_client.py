"""The client: start runs, wait for results, read statuses, cancel, list runs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import nats.errors
import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.js.api import PubAck
from opentelemetry import propagate
from pydantic import BaseModel, ValidationError

from flow_orchestrator._errors import (
    FlowError,
    InvalidPayload,
    PayloadTooLarge,
    PermissionDenied,
    RunCancelled,
    RunFailed,
    RunNotFound,
    UnknownWorkflow,
    message_error_for,
)
from flow_orchestrator.bus._codec import CONTENT_TYPE, MSGPACK_TYPE, decode, encode
from flow_orchestrator.bus._connection import DEFAULT_URL, Bus, connect
from flow_orchestrator.bus._journal import last_event, read_events
from flow_orchestrator.bus._kv import StateStore
from flow_orchestrator.bus._streams import StorageSettings, bind, provision
from flow_orchestrator.bus._subjects import (
    TRIGGER_TOKEN,
    Names,
    check_name,
    check_run_id,
    parse_event_subject,
)
from flow_orchestrator.runtime._dead_letters import DeadLetter, list_dead_letters, replay_dead_letter
from flow_orchestrator.runtime._events import RunEvent, follow_run, follow_workflow
from flow_orchestrator.runtime._journal import NodeView, fold_events
from flow_orchestrator.runtime._resume import RetryInterrupted, resume_failed_run
from flow_orchestrator.runtime._status import GraphShape, NodeStatus, RunStatus, derive_node_statuses
from flow_orchestrator.runtime._workflow import Workflow, shape_from_description

READ_TRIES = 30  # about half a minute of backoff, longer than a leader election
log = logging.getLogger("flow_orchestrator.client")
_TERMINAL_RUN = {RunStatus.COMPLETED.value, RunStatus.FAILED.value, RunStatus.CANCELLED.value}


@dataclass(frozen=True, slots=True)
class NodeSnapshot:
    status: NodeStatus
    attempts: int = 0
    error: dict[str, Any] | None = None
    started_at: float | None = None
    finished_at: float | None = None
    output: Any = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None or self.finished_at is None:
            return None
        return self.finished_at - self.started_at


@dataclass(frozen=True, slots=True)
class RunSnapshot:
    """A run as seen now: its status and every node's (total over the DAG)."""

    run_id: str
    workflow: str
    status: RunStatus
    nodes: Mapping[str, NodeSnapshot] = field(default_factory=dict)
    input: Any = None
    results: Mapping[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None
    created_at: float | None = None
    finished_at: float | None = None

    @property
    def outputs(self) -> dict[str, Any]:
        return {name: node.output for name, node in self.nodes.items() if node.status == NodeStatus.COMPLETED}

    def to_json(self) -> dict[str, Any]:
        """The document ``flowctl run/status --json`` prints."""
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status.value,
            "error": self.error,
            "nodes": {
                name: {
                    "status": node.status.value,
                    "attempts": node.attempts,
                    "error": (node.error or {}).get("message") if node.error else None,
                    "duration_ms": round(node.duration * 1000, 3) if node.duration is not None else None,
                }
                for name, node in self.nodes.items()
            },
            "outputs": self.outputs,
        }


@dataclass(slots=True)
class _Watch:
    """A run's terminal event (or trigger rejection) as it arrives, and the subscriptions for it.

    A core subscription misses what is published while its connection is down, so after each
    reconnection ``on_reconnect`` looks the run up instead (``looks`` holds those tasks)."""

    done: asyncio.Future[tuple[str, str | None, dict[str, Any]]]
    bus: Bus
    on_reconnect: Callable[[], None] | None = None
    subs: list[Any] = field(default_factory=list)
    looks: set[asyncio.Task[None]] = field(default_factory=set)

    async def close(self) -> None:
        if self.on_reconnect is not None:
            self.bus.reconnected.discard(self.on_reconnect)
            self.on_reconnect = None
        for task in self.looks:
            task.cancel()
        for sub in self.subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self.subs.clear()


class RunHandle:
    """A started run. ``await handle.result()`` waits for it and returns its output."""

    def __init__(self, client: Client, run_id: str, workflow: str) -> None:
        self.client = client
        self.run_id = run_id
        self.workflow = workflow
        # Set by the client that published the trigger: its sequence in the triggers stream, and
        # whether JetStream had a trigger with this run id already (then it kept that one).
        self._trigger_seq: int | None = None
        self._reused = False

    def _published(self, ack: PubAck) -> bool:
        """Note the trigger's publish acknowledgement; return whether it was a duplicate."""
        self._trigger_seq, self._reused = ack.seq, bool(ack.duplicate)
        return self._reused

    def _concerns_us(self, rejection: dict[str, Any]) -> bool:
        """Whether a rejection is of this handle's trigger or a later one with its run id (a replay),
        not of an earlier one (a run id reused, past the deduplication window, after its trigger was
        rejected)."""
        seq = rejection.get("stream_seq")
        return self._trigger_seq is None or not isinstance(seq, int) or seq >= self._trigger_seq

    def _rejected(self, rejection: dict[str, Any]) -> FlowError:
        """The typed error for a rejection of this run's trigger."""
        reused = (
            " (this run id was used within the deduplication window by that trigger, so this one was "
            "dropped as its repeat: start with a new run id)"
            if self._reused
            else ""
        )
        return message_error_for(
            str(rejection.get("reason")),
            f"run {self.run_id!r} of {self.workflow!r} was rejected: {rejection.get('error')}{reused}",
        )

    async def wait(self) -> dict[str, Any]:
        """Wait until the run ends; return its run record. If a worker rejected the trigger (bad
        payload, unknown workflow...), raise that typed error instead of waiting forever.
        To bound the wait, wrap the call: ``async with asyncio.timeout(30): await handle.wait()``."""
        return await self._ended(await self._watch(), look_first=True, whole_record=True)

    async def result(self) -> Any:
        """The run's output: its sink node's output (a dict by sink name when it has several).
        Raises :class:`RunFailed` or :class:`RunCancelled` when the run did not complete, and the
        trigger's typed error (``InvalidPayload``...) when a worker rejected it."""
        return await self._output(await self._ended(await self._watch(), look_first=True, whole_record=False))

    async def _watch(self) -> _Watch:
        """Subscribe to the run's terminal events and its trigger's rejection."""
        names, nc = self.client.names, self.client.bus.nc
        # Resolved with ("end", status, body) for the run's terminal event, ("rejected", None, body).
        done: asyncio.Future[tuple[str, str | None, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )

        async def on_run_event(msg: Msg) -> None:
            kind = parse_event_subject(msg.subject)[3]
            if kind in _TERMINAL_RUN and not done.done():
                done.set_result(("end", kind, decode(msg.data) if msg.data else {}))

        async def on_rejected(msg: Msg) -> None:
            body = decode(msg.data)
            if not done.done() and self._concerns_us(body):
                done.set_result(("rejected", None, body))

        watch = _Watch(done, self.client.bus)

        def on_reconnect() -> None:
            if not done.done():
                task = asyncio.ensure_future(self._look(done))
                watch.looks.add(task)
                task.add_done_callback(watch.looks.discard)

        watch.on_reconnect = on_reconnect
        self.client.bus.reconnected.add(on_reconnect)
        try:
            watch.subs.append(
                await nc.subscribe(names.run_event(self.workflow, self.run_id, "*"), cb=on_run_event)
            )
            rejected = names.event(self.workflow, self.run_id, TRIGGER_TOKEN, "rejected")
            watch.subs.append(await nc.subscribe(rejected, cb=on_rejected))
        except BaseException:
            await watch.close()
            raise
        return watch

    async def _look(self, done: asyncio.Future[tuple[str, str | None, dict[str, Any]]]) -> None:
        """Resolve ``done`` from the run record (or the trigger's rejection) if the run has ended:
        its terminal event may have come while the connection was down."""
        try:
            record = await self.client._run_record(self.run_id)
            rejected = None if record else await self.client._rejection(self.workflow, self.run_id)
        except Exception as exc:  # the next reconnection looks again; the event may still come
            log.debug("looking up run %s after a reconnection failed: %s", self.run_id, exc)
            return
        if done.done():
            return
        if record is not None and record.get("status") in _TERMINAL_RUN:
            done.set_result(("end", record["status"], record))
        elif rejected is not None and self._concerns_us(rejected):
            done.set_result(("rejected", None, rejected))

    async def _ended(self, watch: _Watch, *, look_first: bool, whole_record: bool) -> dict[str, Any]:
        """The run's record once it has ended (closes ``watch``).

        ``look_first`` reads the record (and the trigger's rejection) before waiting, in case the run
        ended before ``watch`` was set up; a watch set up before the trigger was published needs no
        look. Without ``whole_record``, a run that ends while this waits is described by its terminal
        event alone (status, timestamps, results or error: what :meth:`result` needs)."""
        done = watch.done
        record = None
        try:
            if look_first:
                record = await self.client._run_record(self.run_id)
                if record is None:
                    rejected = await self.client._rejection(self.workflow, self.run_id)
                    if rejected is not None and not done.done() and self._concerns_us(rejected):
                        done.set_result(("rejected", None, rejected))
            if record is None or record.get("status") not in _TERMINAL_RUN:
                what, status, body = await done
                if what == "rejected":
                    raise self._rejected(body)
                if body.get("results_in_record"):
                    record = await self._terminal_record()
                elif whole_record:
                    record = await self.client._run_record(self.run_id)
                if not whole_record or record is None or record.get("status") not in _TERMINAL_RUN:
                    # The event carries what ended the run; a record read may lag behind it (a
                    # replica, after a failover), so the event is trusted.
                    record = {**(record or {"workflow": self.workflow}), "status": status, **body}
        finally:
            await watch.close()
        if record is None:
            raise RunNotFound(f"run {self.run_id!r} has no record")
        return record

    async def _terminal_record(self) -> dict[str, Any] | None:
        """The run's record once it shows the end its event announced (a replica may lag a little):
        for an end event whose results were too large to carry."""
        record = None
        for _ in range(20):
            record = await self.client._run_record(self.run_id)
            if record is not None and record.get("status") in _TERMINAL_RUN:
                break
            await asyncio.sleep(0.05)
        return record

    async def _output(self, record: dict[str, Any]) -> Any:
        status = record["status"]
        if status == RunStatus.COMPLETED.value:
            results: dict[str, Any] = record.get("results") or {}
            return next(iter(results.values())) if len(results) == 1 else results
        error = record.get("error") or {}
        snapshot = await self.status()
        if status == RunStatus.CANCELLED.value:
            raise RunCancelled(f"run {self.run_id!r} of {self.workflow!r} was cancelled", snapshot)
        raise RunFailed(
            f"run {self.run_id!r} of {self.workflow!r} failed at node {error.get('node')!r}: "
            f"{error.get('type')}: {error.get('message')}",
            snapshot,
        )

    async def status(self) -> RunSnapshot:
        return await self.client.snapshot(self.run_id)

    async def retry(self) -> list[str]:
        """Re-run this failed run from its failed nodes, keeping completed ones and the run's data.
        Returns the nodes given a new attempt. Raises :class:`RunNotRetryable` unless it failed."""
        client = self.client
        description = await client.describe(self.workflow)
        with client._denied_if_refused("retry runs"):
            return await resume_failed_run(
                client.store,
                client.bus.js,
                client.names,
                self.run_id,
                shape=shape_from_description(description),
                read_journal=lambda: client.journal(self.run_id, self.workflow),
            )

    async def cancel(self, reason: str | None = None) -> None:
        """Ask the supervisor to cancel the run; running attempts are cancelled, the rest never start."""
        subject = self.client.names.run_event(self.workflow, self.run_id, "cancel")
        with self.client._denied_if_refused("cancel runs", subject):
            await self.client.bus.js.publish(subject, encode({"reason": reason}))


class Client:
    """Talks to the workflows hosted by workers. ``async with await Client.connect(url) as client``."""

    def __init__(self, bus: Bus, store: StateStore, names: Names) -> None:
        self.bus = bus
        self.store = store
        self.names = names
        self._registry: dict[str, dict[str, Any]] = {}

    @classmethod
    async def connect(
        cls, nats_url: str | None = None, *, prefix: str = "flow", storage: StorageSettings | None = None
    ) -> Client:
        names = Names(prefix)
        bus = await connect(nats_url or os.environ.get("NATS_URL", DEFAULT_URL), name="flow-client")
        try:
            # Bind to what workers provisioned; create it only in a deployment no worker has seen yet.
            store = await bind(bus.js, names) or await provision(
                bus.js, names, storage or StorageSettings(), update=False
            )
        except BaseException:
            await bus.close()
            raise
        return cls(bus, store, names)

    async def close(self) -> None:
        await self.bus.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def describe(self, workflow: str) -> dict[str, Any]:
        """The registry record of a workflow (its nodes and edges), as its workers registered it."""
        if workflow not in self._registry:
            found = await self.store.get(Names.workflow_key(workflow))
            if found is None:
                raise UnknownWorkflow(
                    f"no worker has registered workflow {workflow!r}; "
                    "start one with `flowctl worker MODULE:ATTR`"
                )
            self._registry[workflow] = found.value
        return self._registry[workflow]

    async def start(
        self, workflow: str | Workflow, input: Any = None, *, run_id: str | None = None
    ) -> RunHandle:
        """Start a run (durably: it starts even if no worker is up yet, once one comes).

        ``run_id`` is the idempotency key: starting twice with the same id starts one run. Called
        inside an OpenTelemetry span, the run's trace joins that span's trace (W3C headers, through
        the global propagator).
        """
        name, input = await self._checked(workflow, input)
        handle = RunHandle(self, check_run_id(run_id) if run_id is not None else uuid.uuid4().hex, name)
        handle._published(await self._trigger(handle, input))
        return handle

    async def _checked(self, workflow: str | Workflow, input: Any) -> tuple[str, Any]:
        name = workflow.name if isinstance(workflow, Workflow) else workflow
        await self.describe(name)
        if isinstance(workflow, Workflow) and workflow.input_model is not None:
            input = _validate(workflow.input_model, input, name)
        return name, input

    async def _trigger(self, handle: RunHandle, input: Any) -> PubAck:
        """Publish the run's trigger; the acknowledgement says whether JetStream already had one
        with this run id (then it kept that one)."""
        headers = {"Nats-Msg-Id": handle.run_id, CONTENT_TYPE: MSGPACK_TYPE}
        propagate.inject(headers)  # nothing when no span is current
        subject = self.names.trigger(handle.workflow)
        try:
            with self._denied_if_refused("start runs", subject):
                return await self.bus.js.publish(subject, encode(input), headers=headers)
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(
                f"the input of a run of {handle.workflow!r} is larger than the NATS server accepts "
                f"in one message ({exc}); pass a reference (a URL, an object key) instead"
            ) from None

    @contextlib.contextmanager
    def _denied_if_refused(self, what: str, subject: str | None = None) -> Iterator[None]:
        """A publish the server refused only times out (the refusal comes on the connection, not as
        a reply): raise :class:`PermissionDenied` for it instead, naming the subject (``subject``'s
        refusal, or without one, any that came during the block)."""
        count = self.bus.refusals
        try:
            yield
        except (nats.errors.TimeoutError, RetryInterrupted) as exc:
            # (A retry that stopped halfway on a refused publish reports the refusal too.)
            timed_out = exc if isinstance(exc, nats.errors.TimeoutError) else exc.__cause__
            if not isinstance(timed_out, nats.errors.TimeoutError):
                raise
            if subject is not None:
                words = self.bus.refusal(subject)
                refused = (subject, words) if words is not None else None
            else:
                refused = self.bus.refusal_since(count)
            if refused is None:
                raise
            raise PermissionDenied(
                f"the NATS server refused to let this connection publish to {refused[0]!r} ({refused[1]}); "
                f"connect as a user allowed to {what} (deploy/nats/accounts.conf)"
            ) from None

    async def run(
        self,
        workflow: str | Workflow,
        input: Any = None,
        *,
        run_id: str | None = None,
    ) -> Any:
        """Start a run and wait for its output (bound it with ``asyncio.timeout`` if needed).

        It listens for the run's end before it publishes the trigger, so (unless ``run_id`` names a
        run that may exist already) it need not look for a run that ended before it listened."""
        if run_id is not None:
            return await (await self.start(workflow, input, run_id=run_id)).result()
        name, input = await self._checked(workflow, input)
        handle = RunHandle(self, uuid.uuid4().hex, name)
        watch = await handle._watch()
        try:
            repeated = handle._published(await self._trigger(handle, input))
        except BaseException:
            await watch.close()
            raise
        return await handle._output(await handle._ended(watch, look_first=repeated, whole_record=False))

    def get_handle(self, run_id: str, workflow: str) -> RunHandle:
        return RunHandle(self, check_run_id(run_id), check_name("workflow", workflow))

    async def handle_for(self, run_id: str) -> RunHandle:
        """A handle for an existing run, looking its workflow up in the run record."""
        record = await self._run_record(run_id)
        if record is None:
            raise await self._no_run(run_id)
        return RunHandle(self, run_id, record["workflow"])

    async def _no_run(self, run_id: str) -> RunNotFound:
        """The error for a run id with no record, saying so when its trigger was rejected."""
        subject = self.names.event("*", check_run_id(run_id), TRIGGER_TOKEN, "rejected")
        try:
            rejected = await last_event(self.bus.js, self.names.events_stream, subject, leader=False)
        except Exception:  # the lookup only improves the message
            rejected = None
        if rejected is None:
            return RunNotFound(f"no run with id {run_id!r} (it never started, or its record expired)")
        return RunNotFound(
            f"no run with id {run_id!r}: its trigger was rejected ({rejected.get('reason')}: "
            f"{rejected.get('error')}); it is in the dead letters (`flowctl dlq list`)"
        )

    async def _rejection(self, workflow: str, run_id: str) -> dict[str, Any] | None:
        """The ``rejected`` event of a run's trigger, if a worker dead-lettered it."""
        subject = self.names.event(workflow, run_id, TRIGGER_TOKEN, "rejected")
        return await last_event(self.bus.js, self.names.events_stream, subject, leader=False)

    async def _run_record(self, run_id: str) -> dict[str, Any] | None:
        key = Names.run_key(check_run_id(run_id))
        # Right after a server or leader loss a read can fail for a moment: retry before giving up.
        delay = 0.05
        for _ in range(READ_TRIES):
            try:
                found = await self.store.get(key)
            except (
                nats.errors.NoRespondersError,
                nats.errors.TimeoutError,
                js_errors.ServiceUnavailableError,
            ):
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            return found.value if found else None
        found = await self.store.get(key)
        return found.value if found else None

    async def snapshot(self, run_id: str) -> RunSnapshot:
        """The run's status and every node's, folded from its journal (total over the DAG)."""
        record = await self._run_record(run_id)
        if record is None:
            raise await self._no_run(run_id)
        workflow = record["workflow"]
        shape = shape_from_description(await self.describe(workflow))
        return snapshot_of(run_id, record, shape, fold_events(await self.journal(run_id, workflow)))

    async def list_runs(
        self, workflow: str | None = None, status: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """Recent runs, newest first: ``run_id``, ``workflow``, ``status``, times and error."""
        keys = await self.store.keys("run.*")
        semaphore = asyncio.Semaphore(64)

        async def load(key: str) -> dict[str, Any] | None:
            async with semaphore:
                found = await self.store.get(key)
            if found is None:
                return None
            value = found.value
            return {
                "run_id": key.split(".", 1)[1],
                "workflow": value.get("workflow"),
                "status": value.get("status"),
                "created_at": value.get("created_at"),
                "finished_at": value.get("finished_at"),
                "error": value.get("error"),
            }

        runs = [r for r in await asyncio.gather(*(load(k) for k in keys)) if r is not None]
        if workflow is not None:
            runs = [r for r in runs if r["workflow"] == workflow]
        if status is not None:
            runs = [r for r in runs if r["status"] == status]
        runs.sort(key=lambda r: r.get("created_at") or 0.0, reverse=True)
        return runs[:limit]

    def events(self, run_id: str, workflow: str | None = None) -> AsyncGenerator[RunEvent, None]:
        """A run's events in order, live, ending after its terminal event: ``async for event in
        client.events(run_id)``. What already happened is replayed first, so a finished run's journal
        is yielded and the loop ends. Without ``workflow`` it is read from the run record
        (:class:`RunNotFound` if there is none yet)."""
        return follow_run(self, run_id, workflow=workflow)

    def workflow_events(self, workflow: str, *, from_start: bool = False) -> AsyncGenerator[RunEvent, None]:
        """The events of every run of ``workflow`` as they happen; endless: break out of the loop."""
        return follow_workflow(self, workflow, from_start=from_start)

    async def dead_letters(self, workflow: str | None = None) -> list[DeadLetter]:
        """Messages that could not be processed, oldest first, with reason, error and original."""
        return await list_dead_letters(self.bus.js, self.names, workflow)

    async def replay_dead_letter(self, letter_id: int) -> str:
        """Publish a dead-lettered trigger again (after fixing what rejected it); returns its run id."""
        with self._denied_if_refused("replay dead letters"):
            return await replay_dead_letter(self.bus.js, self.names, letter_id)

    async def journal(self, run_id: str, workflow: str) -> list[dict[str, Any]]:
        """Every event of a run, oldest first: ``{node, kind, at, data, headers}``. It is read without
        a consumer (what an observer may do), and checked against the stream's leader."""
        subject = self.names.events_of_run(workflow, run_id)
        return await read_events(self.bus.nc, self.bus.js, self.names.events_stream, subject)


def snapshot_of(
    run_id: str, record: Mapping[str, Any], shape: GraphShape, views: Mapping[str, NodeView]
) -> RunSnapshot:
    """A run's snapshot from its run record and its folded journal, with every node's status
    completed over the DAG by the status rules. Pure: ``Client.snapshot`` and the live view of
    ``flowctl watch`` both build theirs here, so they always agree."""
    run_status = RunStatus(record["status"])
    recorded = {n: v.status for n, v in views.items() if v.status is not None}
    statuses = derive_node_statuses(shape, recorded, run_status)
    nodes = {}
    for name in shape.order:
        view = views.get(name, NodeView())
        nodes[name] = NodeSnapshot(
            status=statuses[name],
            attempts=view.attempts,
            error=view.error,
            started_at=view.started_at,
            finished_at=view.finished_at,
            output=view.output,
        )
    return RunSnapshot(
        run_id=run_id,
        workflow=record["workflow"],
        status=run_status,
        nodes=nodes,
        input=record.get("input"),
        results=record.get("results") or {},
        error=record.get("error"),
        created_at=record.get("created_at"),
        finished_at=record.get("finished_at"),
    )


def _validate(model: type[Any], value: Any, workflow: str) -> Any:
    if isinstance(model, type) and issubclass(model, BaseModel):
        if isinstance(value, model):
            return value.model_dump(mode="json")
        try:
            return model.model_validate(value).model_dump(mode="json")
        except ValidationError as exc:
            raise InvalidPayload(
                f"input for workflow {workflow!r} does not match {model.__name__}: {exc}"
            ) from exc
    return value
