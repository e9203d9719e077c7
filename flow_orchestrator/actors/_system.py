"""The actor system: what a worker's actors share (bus, names, state, interceptor chain, run gate)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import nats.errors
import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.api import ConsumerConfig, DeliverPolicy

from flow_orchestrator._bounded import remember
from flow_orchestrator._errors import StateConflict, UnencodableValue
from flow_orchestrator.actors._join import JoinBook
from flow_orchestrator.bus._codec import decode, decode_event, encode
from flow_orchestrator.bus._connection import Bus
from flow_orchestrator.bus._dlq import Letter, dead_letter, rejected_subject
from flow_orchestrator.bus._interceptors import InterceptorChain
from flow_orchestrator.bus._journal import is_subject_conflict, last_message
from flow_orchestrator.bus._kv import KeyTaken, StateStore
from flow_orchestrator.bus._propagation import EPOCH_HEADER, carried_headers, epoch_of, trace_headers
from flow_orchestrator.bus._pull import Capacity
from flow_orchestrator.bus._reader import ReadFailed, read_stored
from flow_orchestrator.bus._subjects import DLQ_TOKEN, RUN_TOKEN, Names, is_valid_run_id, parse_event_subject
from flow_orchestrator.bus.types import PublishInput
from flow_orchestrator.runtime._status import POISON_ERROR

# In a poison report: the dead-lettered message was an upstream's, owing the join its arrival.
OWED_ARRIVAL = "owed_arrival"
log = logging.getLogger("flow_orchestrator.actors")
MSG_ID = "Nats-Msg-Id"
API_PATIENCE = 30.0  # seconds a worker waits for a JetStream API answer while it sets up
T = TypeVar("T")


CLOSED = ("failed", "cancelled")  # run statuses in which no new attempt starts


def epoch_of_record(record: dict[str, Any]) -> int:
    """How many times a run was retried, from its record."""
    resumed = record.get("resumed")
    return len(resumed) if isinstance(resumed, list) else 0


def end_event(run_id: str, record: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The body and message id of the terminal event of a run whose record says it ended. A retried
    run can end again: each of its ends is a message of its own."""
    status = record["status"]
    body: dict[str, Any] = {
        "created_at": record.get("created_at"),
        "finished_at": record.get("finished_at"),
        "attempts_lost": record.get("attempts_lost", 0),
    }
    if status == "completed":
        body["results"] = record.get("results")
    else:
        body["error"] = record.get("error")
    epoch = epoch_of_record(record)
    return body, f"{run_id}.run.{status}" + (f".{epoch}" if epoch else "")


class RunGate:
    """Which runs this worker knows to be closed (failed or cancelled), so no new attempt starts for
    them, and which attempt tasks to cancel when a run is cancelled. Bounded, best-effort cache fed by
    the run journal; the durable truth stays in the run record."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._closed: OrderedDict[str, str] = OrderedDict()
        self._epochs: OrderedDict[str, int] = OrderedDict()  # runs retried (``flowctl retry``): how often
        self._capacity = capacity
        # A run's attempt tasks on this worker: one task as itself (the usual case, and a set costs
        # ~200 bytes a run when 10,000 runs are held), several as a set.
        self._attempts: dict[str, asyncio.Task[Any] | set[asyncio.Task[Any]]] = {}

    def close(self, run_id: str, status: str) -> None:
        self._closed[run_id] = status
        self._closed.move_to_end(run_id)
        while len(self._closed) > self._capacity:
            self._closed.popitem(last=False)
        if status == "cancelled":
            held = self._attempts.pop(run_id, set())
            for task in held if isinstance(held, set) else (held,):
                task.cancel("run cancelled")

    def closed(self, run_id: str) -> str | None:
        return self._closed.get(run_id)

    def epoch(self, run_id: str) -> int:
        """How many times this worker knows ``run_id`` was retried (0: never, or not known here)."""
        return self._epochs.get(run_id, 0)

    def reopen(self, run_id: str, epoch: int) -> None:
        """The run is running again after its ``epoch``-th retry (a cancelled run never is: a
        retry's late announcement must not undo a cancel)."""
        if self._closed.get(run_id) != "cancelled":
            self._closed.pop(run_id, None)
        self.learn(run_id, epoch)

    def learn(self, run_id: str, epoch: int) -> None:
        """The run was retried ``epoch`` times (read from the past: whether it is closed now is
        left as the gate knows it)."""
        if epoch > self._epochs.get(run_id, 0):
            remember(self._epochs, run_id, epoch, self._capacity)

    def track(self, run_id: str, task: asyncio.Task[Any]) -> None:
        held = self._attempts.setdefault(run_id, task)
        if held is task:
            return
        if isinstance(held, set):
            held.add(task)
        else:
            self._attempts[run_id] = {held, task}

    def untrack(self, run_id: str, task: asyncio.Task[Any]) -> None:
        held = self._attempts.get(run_id)
        if held is task:
            del self._attempts[run_id]
        elif isinstance(held, set):
            held.discard(task)
            if len(held) == 1:
                self._attempts[run_id] = held.pop()


class ActorSystem:
    """Shared services for one worker's actors."""

    def __init__(
        self,
        *,
        bus: Bus,
        names: Names,
        store: StateStore,
        worker_id: str,
        executor: ThreadPoolExecutor,
        max_trigger_bytes: int,
        unknown_workflow_grace: float,
        max_in_flight: int = 1024,
    ) -> None:
        self.bus = bus
        self.names = names
        self.store = store
        self.worker_id = worker_id
        self.executor = executor
        self.max_trigger_bytes = max_trigger_bytes
        self.unknown_workflow_grace = unknown_workflow_grace
        self.gate = RunGate()
        self.capacity = Capacity(max_in_flight)
        self.consumer_nodes: dict[str, tuple[str, str]] = {}  # durable consumer -> (workflow, node)
        self._join_books: dict[tuple[str, str], JoinBook] = {}
        self.api_prefix = "$JS.API"
        self.announce_starts_after = 0.0  # seconds an attempt runs before its started event goes out
        self.chain: InterceptorChain  # set by the worker once interceptors are known
        self._gate_subs: list[Subscription] = []
        self._after_reconnecting: Callable[[], None] | None = None
        self._relearning: set[asyncio.Task[None]] = set()

    def join_book(self, workflow: str, node: str, upstreams: Iterable[str]) -> JoinBook:
        """This worker's arrivals at ``node``'s joins. The node's own actor records the arrivals its
        consumer delivers (a continue-on-error upstream's failure); the upstreams' actors record their
        completions themselves. One book per node, so all of a worker's arrivals at a join batch."""
        book = self._join_books.get((workflow, node))
        if book is None:
            book = self._join_books[(workflow, node)] = JoinBook(self.store, frozenset(upstreams))
        return book

    async def _api_call(self, call: Callable[[], Awaitable[T]], within: float = API_PATIENCE) -> T:
        """A JetStream API request, asked again while the server does not answer in time (busy,
        electing a leader, restarting) for up to ``within`` seconds: a worker starting next to a
        loaded or recovering server should wait for it, not die."""
        deadline = time.monotonic() + within
        delay = 0.1
        while True:
            try:
                return await call()
            except (
                nats.errors.TimeoutError,
                nats.errors.NoRespondersError,
                js_errors.ServiceUnavailableError,
                ReadFailed,  # a direct get unanswered or refused for the same reasons
            ):
                if time.monotonic() + delay > deadline:
                    raise
                log.info("JetStream API did not answer; asking again in %.1fs", delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def ensure_consumer(self, stream: str, config: ConsumerConfig) -> None:
        """Create or update a durable consumer (idempotent across racing workers).

        A consumer whose unchangeable settings differ (an older push consumer, a new deliver policy)
        is replaced, resuming after its acknowledged floor: nothing is delivered twice and nothing
        that was pending is skipped.
        """
        config.name = config.durable_name
        try:
            await self._api_call(lambda: self.bus.js.add_consumer(stream, config))
            return
        except js_errors.BadRequestError as exc:
            reason = exc.description
        name = str(config.durable_name)
        try:
            old = await self.bus.js.consumer_info(stream, name)
        except js_errors.NotFoundError:
            old = None
        if old is not None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = old.ack_floor.stream_seq + 1
            config.opt_start_time = None
            log.warning(
                "replacing consumer %s on %s from stream seq %d: %s",
                name,
                stream,
                config.opt_start_seq,
                reason,
            )
            with contextlib.suppress(js_errors.NotFoundError):
                await self.bus.js.delete_consumer(stream, name)
        await self.bus.js.add_consumer(stream, config)

    async def emit(
        self,
        subject: str,
        payload: Any,
        *,
        msg_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        durable: bool = True,
    ) -> PublishInput:
        """Publish an event through the interceptor chain. ``durable`` waits for JetStream's ack (and
        dedups by ``msg_id``); journal-only events are published without waiting. Returns what was
        published: its headers as the interceptors left them, and where the stream stored it."""
        all_headers = dict(headers or {})
        if msg_id is not None:
            all_headers[MSG_ID] = msg_id
        message = (
            PublishInput(subject, payload, all_headers)
            if durable
            else PublishInput(subject, payload, {**all_headers, "Flow-Journal": "1"})
        )
        await self.chain.publish(message)
        return message

    async def publish_terminal(self, message: PublishInput) -> None:
        """The innermost publish: encode and send."""
        headers = message.headers
        journal = headers.pop("Flow-Journal", None) is not None
        data = encode(message.payload)
        try:
            # nats-py checks the payload alone; the server counts the headers too, and would close the
            # connection over a message just past its limit (counted only near it: off the hot path).
            limit = self.bus.nc.max_payload
            if len(data) > limit - 4096 and len(data) + _header_bytes(headers) > limit:
                raise nats.errors.MaxPayloadError
            message.size = len(data)
            if journal:
                await self.bus.nc.publish(message.subject, data, headers=headers or None)
                return
            ack = await self.bus.js.publish(message.subject, data, headers=headers or None)
            message.duplicate = bool(ack.duplicate)
            message.seq = ack.seq
        except nats.errors.MaxPayloadError as exc:  # not transient: the same bytes never fit
            raise UnencodableValue(
                f"{message.subject}: {len(data)} bytes, more than the NATS server takes in one message "
                f"({exc}); keep large data elsewhere and pass a reference"
            ) from None
        except js_errors.APIError as exc:
            if is_subject_conflict(exc):
                raise StateConflict(f"{message.subject} already has a message") from exc
            raise

    async def dead_letter(self, msg: Msg | Letter, *, reason: str, error: BaseException | str) -> int:
        letter = msg if isinstance(msg, Letter) else Letter.of(msg)
        workflow, run_id = _workflow_and_run(letter.subject, self.names)
        if run_id is None:
            # A trigger's run id is its Nats-Msg-Id: name the run, so whoever waits on it hears why.
            given = letter.headers.get("Flow-Run-Id") or letter.headers.get(MSG_ID)
            run_id = given if given is not None and is_valid_run_id(given) else None
        event = await dead_letter(
            self.bus.js, self.names, letter, workflow=workflow, reason=reason, error=error
        )
        # A trigger that became no run is "rejected" (its waiters get the typed error); a message of a
        # running run is recorded in that run's journal as "dead_lettered".
        if ".trigger." in letter.subject:
            subject = rejected_subject(self.names, workflow, run_id)
        else:
            subject = self.names.event(workflow, run_id or "_none", DLQ_TOKEN, "dead_lettered")
        # One event per dead letter: the same message dead-lettered again (another consumer of it, or a
        # redelivery after a crash before its termination) repeats the record's id and this one's.
        seq = int(event["dlq_seq"])
        await self.emit(subject, event, headers=trace_headers(letter.headers), msg_id=f"dlq-{seq}.event")
        return seq

    async def run_state(self, run_id: str) -> tuple[str | None, int]:
        """Ask the run record: whether the run is closed (its status, else None) and how many times it
        was retried. The gate learns both. A run without a record counts as closed only if the gate
        already had it so."""
        found = await self.store.get(Names.run_key(run_id))
        if found is None:
            return self.gate.closed(run_id), self.gate.epoch(run_id)
        record = found.value
        status, epoch = record.get("status"), epoch_of_record(record)
        if status in CLOSED:
            self.gate.close(run_id, status)
            return status, epoch
        self.gate.reopen(run_id, epoch)
        return None, epoch

    async def claim(self, run_id: str, node: str, epoch: int, seq: int, *, gave_up: bool = False) -> bool:
        """Whether the message at stream sequence ``seq`` may start ``node`` after the run's
        ``epoch``-th retry: the first to claim it does (and its own redelivery again); any other
        message that could start it then starts nothing. A message given up claims to report the
        node failed (``gave_up``): it started nothing, which :meth:`join_went_ahead` must know."""
        key = Names.claim_key(run_id, node, epoch)
        try:
            await self.store.create(key, {"seq": seq, "gave_up": True} if gave_up else {"seq": seq})
        except KeyTaken as taken:
            return bool(taken.current.value.get("seq") == seq)
        except StateConflict:  # taken, and its value could not be read: go by a read
            found = await self.store.get(key)
            return found is not None and found.value.get("seq") == seq
        return True

    async def join_went_ahead(self, workflow: str, run_id: str, join: str, epoch: int) -> bool:
        """Whether ``join`` waits for no more arrivals in a run retried ``epoch`` times: its ready
        event or its completion is stored, or a message claimed it after one of the retries (the
        retry's own message, which takes every upstream's output from the journal, or a ready
        event). A message given up owing it an arrival then owes nothing."""
        js, stream = self.bus.js, self.names.events_stream
        for kind in ("ready", "completed"):
            if await last_message(js, stream, self.names.event(workflow, run_id, join, kind)) is not None:
                return True
        for retry in range(epoch, 0, -1):
            found = await self.store.get(Names.claim_key(run_id, join, retry))
            if found is not None and not found.value.get("gave_up"):
                return True
        return False

    async def open_gate(self) -> None:
        """Follow run-level terminal events so closed runs start no new attempts on this worker."""

        async def on_run_event(msg: Msg) -> None:
            with contextlib.suppress(ValueError):
                _, run_id, _, kind = parse_event_subject(msg.subject)
                if kind == "resumed":
                    self.gate.reopen(run_id, _epoch_in(msg.data, msg.subject))
                else:
                    self.gate.close(run_id, kind)

        run_events = f"{self.names.prefix}.evt.*.*.{RUN_TOKEN}"
        for kind in (*CLOSED, "resumed"):
            self._gate_subs.append(await self.bus.nc.subscribe(f"{run_events}.{kind}", cb=on_run_event))
        resumed = f"{run_events}.resumed"
        nc, js, stream = self.bus.nc, self.bus.js, self.names.events_stream

        async def learn_past_retries() -> None:
            for stored in await read_stored(nc, js, stream, resumed):
                with contextlib.suppress(ValueError):  # a malformed event says nothing
                    _, run_id, _, _ = parse_event_subject(stored.subject)
                    self.gate.learn(run_id, _epoch_in(stored.data, stored.subject))

        # Runs retried before this worker started (say, right after the fix was deployed), or while
        # its connection was down (core messages published meanwhile never reach it): messages from
        # before their retry may still wait for it, and must claim what they start.
        await self._api_call(learn_past_retries)

        def after_reconnecting() -> None:
            task = asyncio.get_running_loop().create_task(self._api_call(learn_past_retries))
            self._relearning.add(task)
            task.add_done_callback(self._relearned)

        self._after_reconnecting = after_reconnecting
        self.bus.reconnected.add(after_reconnecting)

    def _relearned(self, task: asyncio.Task[None]) -> None:
        self._relearning.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not read past run retries after reconnecting: %s", task.exception())

    async def give_up(
        self, msg: Msg, consumer: str, deliveries: int, waiting: Sequence[tuple[str, str]] | None = None
    ) -> None:
        """The last allowed delivery of a message whose every earlier delivery crashed or stalled its
        worker: dead-letter it instead of running it again. Report the attempt of each node waiting
        on it (``waiting``, (workflow, node) pairs; by default the consumer's node) failed, so the
        run fails visibly instead of hanging."""
        letter = Letter.of(msg)
        reason = f"consumer {consumer} gave up after {deliveries} deliveries (each crashed or timed out)"
        await self.dead_letter(letter, reason="max_deliveries", error=reason)
        owes = waiting is not None  # joins owed its arrival, or it would have started its own node
        if waiting is None:
            node = self.consumer_nodes.get(consumer)
            waiting = [node] if node is not None else []
        for workflow, name in waiting:
            await self._fail_waiting_node(workflow, name, letter=letter, reason=reason, owes_arrival=owes)

    async def _fail_waiting_node(
        self, workflow: str, node: str, *, letter: Letter, reason: str, owes_arrival: bool = False
    ) -> None:
        """Report ``node``'s attempt failed: the message it waited on was dead-lettered. The report
        carries the run's latest retry epoch where the run waits on the node now, so the supervisor
        does not take it for a stale report of an attempt the retry superseded: a join the message
        still owes its arrival (``owes_arrival``; a retry may have issued the join again, and it
        waits for that arrival), or the message's own node if the message holds the node's claim
        for that epoch (one from before the retry that won the node). Otherwise the message's own."""
        _, run_id, _, _ = parse_event_subject(letter.subject)
        headers = carried_headers(letter.headers)
        lineage = epoch_of(headers)
        _, epoch = await self.run_state(run_id)
        if epoch > lineage and (
            owes_arrival
            or (
                letter.stream_seq is not None
                and await self.claim(run_id, node, epoch, letter.stream_seq, gave_up=True)
            )
        ):
            headers[EPOCH_HEADER] = str(epoch)
            lineage = epoch
        payload = decode(letter.data) if letter.data else {}
        error = {"type": POISON_ERROR, "message": f"dead-lettered: {reason}", "retryable": False}
        body = {"attempt": 0, "error": error, "retry": False, "input": payload.get("input"), "outputs": {}}
        if owes_arrival:
            body[OWED_ARRIVAL] = True  # the supervisor drops it if the join was made ready after all
        await self.emit(
            self.names.event(workflow, run_id, node, "attempt_failed"),
            body,
            # One report per node and retry epoch, and one more for the joins owed an arrival (the
            # supervisor may drop that one: it must not stand for the join's own later give-up).
            msg_id=f"{run_id}.{node}.poison.{lineage}" + (".owed" if owes_arrival else ""),
            headers=headers,
        )

    async def close_gate(self) -> None:
        if self._after_reconnecting is not None:
            self.bus.reconnected.discard(self._after_reconnecting)
            self._after_reconnecting = None
        for task in self._relearning:
            task.cancel()
        for sub in self._gate_subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._gate_subs.clear()


def _epoch_in(data: bytes, subject: str) -> int:
    """The epoch a ``_run.resumed`` event announces (0 if it names none)."""
    epoch = decode_event(data, subject, empty_ok=True).get("epoch")
    return epoch if isinstance(epoch, int) else 0


def _workflow_and_run(subject: str, names: Names) -> tuple[str, str | None]:
    parts = subject.split(".")
    if len(parts) >= 3 and parts[1] == "trigger":
        return parts[2], None
    if len(parts) == 6 and parts[1] == "evt":
        return parts[2], parts[3]
    return "_unknown", None


def _header_bytes(headers: Mapping[str, str]) -> int:
    """The size of a NATS header block: the version line, then ``Name: value`` lines."""
    return 12 + sum(len(name) + len(value) + 4 for name, value in headers.items()) + 2
