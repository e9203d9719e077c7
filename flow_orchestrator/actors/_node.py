"""``NodeActor``: runs one node of one workflow for every run, on whichever worker gets the event.

It consumes its upstream's ``completed`` events (the run's ``started`` event for a root, the
``failed`` events of continue-on-error upstreams, and its own scheduled ``retry`` events) through one
durable consumer shared by all workers, so JetStream hands each message to one worker at a time.

A join (a node with several upstreams) does not consume their completions. The worker that publishes
an upstream's completion records its arrival at the join itself, before acknowledging the message
that started the upstream, and the arrival that completes the set publishes the join's ``ready``
event (create-only, once per run), which the join consumes. A fan-in of 100 is then one delivery to
the join instead of 100. A worker that dies between the completion and the arrival leaves that
message unacknowledged: its redelivery finds the node completed and records the arrival then.

One write per step: the node's ``completed`` event is published as a create-only compare-and-set on
its subject (see ``bus/_journal.py``). It is the durable record of the output *and* the event its
downstream nodes consume, and it can be written once per (run, node), ever: a redelivered or
duplicated trigger can never complete a node twice, and a finished node never runs again.

Every message that starts an attempt is unique (one completion per upstream, one scheduled message
per retry, one winner per join), so the consumer's single delivery is the claim. When a message
comes back (its worker died and the ack wait expired) the journal says what happened: completed or
failed already (acknowledge), or nothing (the attempt was lost: run it again as the next attempt).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from flow_orchestrator._errors import DataKeyNotFound, NonRetryableError, StateConflict, UnencodableValue
from flow_orchestrator.actors import _records as rec
from flow_orchestrator.actors._actor import TRANSIENT, Actor, ConsumerSpec, log
from flow_orchestrator.actors._faults import crash_point
from flow_orchestrator.actors._join import INLINE_OUTPUT_BYTES, NOT_INLINE
from flow_orchestrator.actors._system import ActorSystem
from flow_orchestrator.bus._codec import decode_event
from flow_orchestrator.bus._journal import EXPECT_NEW_SUBJECT, last_event, last_events, last_message
from flow_orchestrator.bus._propagation import CLAIMED_HEADER, EPOCH_HEADER, carried_headers, epoch_of
from flow_orchestrator.bus._subjects import RUN_TOKEN, Names, parse_event_subject
from flow_orchestrator.bus.types import ExecuteNodeInput, PublishInput
from flow_orchestrator.runtime._context import NodeContext
from flow_orchestrator.runtime._data import WorkflowData
from flow_orchestrator.runtime._retry import NO_RETRY
from flow_orchestrator.runtime._workflow import NodeSpec, WorkflowDefinition

PUBLISH_TRIES = 40  # about a minute of backoff: longer than a leader election


def _claim_epoch(msg: Msg, kind: str, issued_by: int, epoch: int) -> int:
    """The retry epoch for which ``msg`` must claim its node before starting it (0: none), in a run
    this worker knows retried ``epoch`` times. After a retry, a message from before it (an upstream's
    completion, a scheduled retry, a redelivery) and the retry's own reissue (``issued_by``, its
    epoch) may both want to start the node: one claim decides."""
    claim = issued_by
    if (claim or epoch) and epoch_of(msg.headers) < epoch:
        claim = epoch  # a message from before the last retry (a reissue of an earlier one, too)
    claimed = epoch_of(msg.headers, CLAIMED_HEADER)
    if claimed and kind != "retry":
        # Its lineage won a claim against the retry, which may have issued this node as well. (A
        # scheduled retry continues the node its lineage already holds: no claim.)
        claim = max(claim, epoch, claimed)
    if kind in ("ready", "failed"):
        # A retry may have issued this join too, with its last upstreams: its message, finding them
        # all resolved, and the arrival completing the set (the ready event their completions
        # publish, or a continue-on-error upstream's failure, which the join records itself) both
        # want to start it. (0 in a run never retried: no claim.)
        claim = max(claim, epoch, epoch_of(msg.headers))
    return claim


@dataclass(slots=True)
class Attempt:
    run_id: str
    attempt: int
    raw_input: Any
    outputs: dict[str, Any]
    started_at: float = 0.0
    trace: dict[str, str] = field(default_factory=dict)
    issued_by: int = 0  # the epoch of the `flowctl retry` that issued its message (0: none)
    # Its started event: due (a timer, dropped once it fires: a held run keeps no spent handle),
    # then being published.
    timer: asyncio.TimerHandle | None = None
    announcing: asyncio.Task[None] | None = None


class NodeActor(Actor):
    """Hosts one node on one worker; see the module docstring for the protocol."""

    def __init__(
        self, system: ActorSystem, definition: WorkflowDefinition, spec: NodeSpec, **options: Any
    ) -> None:
        names = system.names
        wf = definition.name
        joins = len(spec.upstreams) > 1
        # A join hears of its completed upstreams from its ``ready`` event (see the module's doc).
        subjects = [names.event(wf, "*", spec.name, "ready")] if joins else []
        subjects += [names.event(wf, "*", up, "completed") for up in spec.upstreams if not joins]
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
            capacity=system.capacity,
            **options,
        )
        self.definition = definition
        self.node = spec
        system.consumer_nodes[self.spec.durable] = (definition.name, spec.name)
        self._needed = frozenset(spec.upstreams)
        self._joins = system.join_book(wf, spec.name, spec.upstreams)
        # The joins this node's completion arrives at: recorded by this actor, see the module's doc.
        self._joins_below = tuple(
            down for down in definition.downstreams[spec.name] if len(definition.nodes[down].upstreams) > 1
        )
        self._action = self._wrap(spec)

    def _wrap(self, spec: NodeSpec) -> Any:
        if spec.is_async:
            return spec.action
        executor = self.system.executor

        async def run_sync(ctx: NodeContext) -> Any:
            # Copy the context so the attempt's span and log fields follow the action into its thread.
            return await asyncio.get_running_loop().run_in_executor(
                executor, functools.partial(contextvars.copy_context().run, spec.action, ctx)
            )

        return run_sync

    # --- receiving ------------------------------------------------------------------------------
    async def receive(self, msg: Msg) -> None:
        # The attempt is worked out in its own frame, so the decoded message and the subject's parts
        # are not kept alive for as long as the action runs (memory per held run).
        attempt = await self._attempt_for(msg)
        if attempt is not None:
            await self._run_attempt(msg, attempt)

    async def _attempt_for(self, msg: Msg) -> Attempt | None:
        """The attempt ``msg`` starts, or None (acknowledged) when it starts none."""
        _, run_id, source, kind = parse_event_subject(msg.subject)
        gate = self.system.gate
        closing, epoch = gate.closed(run_id), gate.epoch(run_id)
        meta = msg.metadata
        redelivered = meta.num_delivered - 1
        if closing is not None or kind == "retry" or (redelivered and not epoch):
            # A run this worker saw close may have been retried since; a retry message (rare) always
            # asks the record, and a redelivery (rare) when the gate knows nothing of the run: they are
            # what `flowctl retry` can race with most.
            closing, epoch = await self.system.run_state(run_id)
        closed = closing is not None
        # A failed run may be retried: its joins' arrivals are still recorded (a cancelled one may not).
        # (An arrival this consumer delivers: a continue-on-error upstream's failure.)
        joins = kind == "failed" and len(self._needed) > 1 and closing != "cancelled"
        if closed and not joins and (not redelivered or closing == "cancelled"):
            await msg.ack()  # a closed run starts nothing; `flowctl retry` reissues what was ready
            return None
        payload = decode_event(msg.data, msg.subject)
        attempt: Attempt | None
        if kind in ("retry", "ready"):
            attempt = await self._issued(run_id, kind, payload)
        elif source == RUN_TOKEN:
            attempt = Attempt(run_id, 1, payload.get("input"), {})
        elif len(self._needed) == 1:
            attempt = Attempt(run_id, 1, payload.get("input"), {source: payload.get("output")})
        else:
            inline = self._joins.inlines_outputs and len(msg.data) <= INLINE_OUTPUT_BYTES
            output = payload.get("output") if inline else NOT_INLINE
            seq = int(meta.sequence.stream)
            joined = await self._join(run_id, source, payload, seq, output)
            # A closed run's arrival is still recorded, and nothing starts: if the run is retried, the
            # join counts this upstream (its completion is not delivered again), and a join decided
            # meanwhile is one the retry finds ready and reissues.
            attempt = None if closed and not redelivered else joined
        if attempt is None:
            await msg.ack()
            return None
        attempt.trace = carried_headers(msg.headers)
        attempt.issued_by = int(payload.get("resume") or 0) if kind == "retry" else 0
        claim = _claim_epoch(msg, kind, attempt.issued_by, epoch)
        if closing is None and not redelivered and not claim:
            return attempt  # the usual case: a first delivery in a run never retried
        if await self._admitted(msg, attempt, closing=closing, redelivered=redelivered, claim=claim):
            return attempt
        if redelivered and self._joins_below and closing != "cancelled":
            # This node completed (or the message lost its claim): its worker may have died before
            # recording the completion's arrivals at the joins below. Recording them is idempotent.
            await self._arrive_again(run_id)
        await msg.ack()
        return None

    async def give_up(self, msg: Msg, delivered: int) -> None:
        # If this node completed, the message would run nothing: what it may still owe is its
        # arrival at a join below, or that join's ready event. Redoing that here could crash or fail
        # again, and nothing would follow (this is the last delivery): the joins owed fail instead,
        # so the run fails visibly and `flowctl retry` can reissue them. A message that owes nothing
        # was a bystander of a worker's crash loop (say a join crashing the worker it started on,
        # just after this message's worker published the join's ready event): acknowledged.
        _, run_id, _, _ = parse_event_subject(msg.subject)
        owed = await self._owed(run_id)
        if owed is None:
            await super().give_up(msg, delivered)
        elif owed:
            waiting = [(self.definition.name, join) for join in owed]
            await self.system.give_up(msg, self.spec.durable, delivered, waiting=waiting)
            await msg.term()
        else:
            await msg.ack()

    async def _owed(self, run_id: str) -> list[str] | None:
        """The joins below still waiting for this node's arrival or its ready event (None: the node
        has not completed). A join that went ahead (see :meth:`ActorSystem.join_went_ahead`)
        waits for nothing."""
        js, names = self.system.bus.js, self.system.names
        stored = await last_message(js, names.events_stream, self._subject(run_id, "completed"))
        if stored is None:
            return None
        closing, epoch = await self.system.run_state(run_id)
        if closing == "cancelled":
            return []  # a cancelled run records no arrivals (see _arrive_below): nothing is owed
        owed = []
        for join in self._joins_below:
            if await self.system.join_went_ahead(self.definition.name, run_id, join, epoch):
                continue
            found = await self.system.store.get(Names.join_key(run_id, join))
            record = (found.value if found is not None else None) or {}
            if self.node.name not in record.get("arrived", ()) or record.get("holder") == stored.seq:
                owed.append(join)  # its arrival was not recorded, or it completed the set
        return owed

    async def _outputs_if_resolved(self, run_id: str) -> dict[str, Any] | None:
        """The upstreams' outputs if every upstream of this join is resolved, as a retry of it expects
        (the journal's: one may have completed after the retry read it). A join can be
        failed, and so retried, before that: its failure was reported by the give-up of a message
        whose arrival could not be recorded (see :meth:`give_up`). Then record the arrivals of the
        upstreams resolved so far (the journal has them), so that the last to resolve makes the join
        ready, and start nothing now (None)."""
        js, nc, names, wf = self.system.bus.js, self.system.bus.nc, self.system.names, self.definition.name
        upstreams = self.node.upstreams
        completions = {up: names.event(wf, run_id, up, "completed") for up in upstreams}
        # A continue-on-error upstream's final failure resolves it too.
        failures = {
            up: names.event(wf, run_id, up, "failed")
            for up in upstreams
            if self.definition.nodes[up].continue_on_error
        }
        found = await last_events(nc, js, names.events_stream, [*completions.values(), *failures.values()])
        completed = {up for up, subject in completions.items() if found.get(subject)}
        resolved = completed | {up for up, subject in failures.items() if found.get(subject)}
        if len(resolved) == len(upstreams):
            events = {up: found.get(completions[up]) or {} for up in upstreams}
            return {up: events[up].get("output") for up in upstreams}  # a failed one's is None
        for up in resolved:  # the stored events again, for their sequences (a rare path)
            subject = names.event(wf, run_id, up, "completed" if up in completed else "failed")
            stored = await last_message(js, names.events_stream, subject)
            if stored is not None and stored.seq is not None:
                data = stored.data or b""
                event, headers = decode_event(data, subject), carried_headers(stored.headers)
                await self._arrive_at(self.node.name, up, run_id, stored.seq, event, headers, len(data))
        return None

    async def _issued(self, run_id: str, kind: str, payload: dict[str, Any]) -> Attempt | None:
        """The attempt a message names: a scheduled or reissued ``retry``, or a join's ``ready``.
        None for a retry of a join not every upstream of which is resolved yet."""
        if kind == "retry" and len(self._needed) > 1:
            resolved = await self._outputs_if_resolved(run_id)
            if resolved is None:
                return None  # the last upstream to resolve starts it
            return Attempt(run_id, int(payload["attempt"]), payload.get("input"), resolved)
        if kind == "ready":  # every upstream of this join arrived: see _arrive_below
            outputs = await self._gather_outputs(run_id, payload.get("outputs") or {})
            return Attempt(run_id, 1, payload.get("input"), outputs)
        outputs = payload.get("outputs") or {}
        if payload.get("outputs_in_journal"):  # too large to ride in the retry message
            outputs = await self._gather_outputs(run_id, {})
        return Attempt(run_id, int(payload["attempt"]), payload.get("input"), outputs)

    async def _admitted(
        self, msg: Msg, attempt: Attempt, *, closing: str | None, redelivered: int, claim: int
    ) -> bool:
        """Whether ``attempt`` starts now. A redelivery starts one only if the journal has no outcome
        of it (the attempt was lost with its worker); after a retry, only the claim's winner starts,
        among the messages that would."""
        if closing is not None:
            # A redelivery in a closed run: say that its attempt was lost, so that a retry of the run
            # issues the node again; start nothing now.
            if closing != "failed" or not await self._unfinished(attempt):
                return False
            await self._report_lost(attempt, redelivered)
            # A retry that read the journal before the lost event did not issue the node: if the run
            # runs again by now, this message competes for the node like any from before the retry.
            closing, epoch = await self.system.run_state(attempt.run_id)
            return closing is None and await self._claim(msg, attempt, epoch)
        if redelivered and not await self._unfinished(attempt):
            return False
        if claim and not await self._claim(msg, attempt, claim):
            return False
        if redelivered:
            await self._report_lost(attempt, redelivered)
        return True

    async def _claim(self, msg: Msg, attempt: Attempt, epoch: int) -> bool:
        """Whether this message wins the node for the run's ``epoch``-th retry (see ``_resume.py``)."""
        if not await self.system.claim(
            attempt.run_id, self.node.name, epoch, int(msg.metadata.sequence.stream)
        ):
            return False
        attempt.trace[EPOCH_HEADER] = str(epoch)  # what follows from this attempt is of this epoch
        if attempt.issued_by == epoch:
            attempt.trace.pop(CLAIMED_HEADER, None)  # the retry's own issue: nothing below is issued
        else:
            # Won against the retry, which may read the journal after this node completes and find
            # its downstream nodes ready: they must claim too, and so on down.
            attempt.trace[CLAIMED_HEADER] = str(epoch)
        return True

    async def _arrive_below(
        self, run_id: str, seq: int, event: dict[str, Any], headers: dict[str, str], size: int
    ) -> bool:
        """Record this node's completion (``event``, stored at stream sequence ``seq``, ``size``
        bytes) at each join below it. Where it completes the set, publish the join's ``ready`` event,
        carrying the outputs the join record holds; say whether it did. Called before the message
        that started this node is acknowledged, and again on its redelivery: each step is idempotent."""
        if self.system.gate.closed(run_id) == "cancelled":
            return False
        published = False
        for join in self._joins_below:
            if await self._arrive_at(join, self.node.name, run_id, seq, event, headers, size):
                published = True
        return published

    async def _arrive_at(  # noqa: PLR0917 (the stored event's parts, as _arrive_below has them)
        self,
        join: str,
        source: str,
        run_id: str,
        seq: int,
        event: dict[str, Any],
        headers: dict[str, str],
        size: int,
    ) -> bool:
        """Record ``source``'s arrival at ``join``; publish the join's ready event if it completes
        the set (whether it did)."""
        wf = self.definition.name
        book = self.system.join_book(wf, join, self.definition.nodes[join].upstreams)
        inline = book.inlines_outputs and size <= INLINE_OUTPUT_BYTES
        output = event.get("output") if inline else NOT_INLINE
        record = await book.arrive(Names.join_key(run_id, join), source, seq, output)
        if record is None or record.get("holder") != seq:
            return False  # waiting for other upstreams, or another arrival completed the set
        crash_point("node.after_join", join)
        subject = self.system.names.event(wf, run_id, join, "ready")
        ready = {"input": event.get("input"), "outputs": record.get("outputs") or {}}
        # A conflict: it was published before this message's redelivery, and the join has it.
        with contextlib.suppress(StateConflict):
            try:
                await self.system.emit(subject, ready, headers={**headers, **EXPECT_NEW_SUBJECT})
            except UnencodableValue:
                # The run's input and the outputs together are too large for one message (each
                # fitted in its own): the join reads the outputs from the journal instead.
                ready["outputs"] = {}
                await self.system.emit(subject, ready, headers={**headers, **EXPECT_NEW_SUBJECT})
        return True

    async def _arrive_again(self, run_id: str) -> bool:
        """A redelivered message: record this node's completion at the joins below. Whether the
        node completed in the run."""
        subject = self._subject(run_id, "completed")
        stored = await last_message(self.system.bus.js, self.system.names.events_stream, subject)
        if stored is None or stored.seq is None:
            return False
        data = stored.data or b""
        event, headers = decode_event(data, subject), carried_headers(stored.headers)
        await self._arrive_below(run_id, stored.seq, event, headers, len(data))
        return True

    async def _join(
        self, run_id: str, source: str, payload: dict[str, Any], seq: int, output: Any
    ) -> Attempt | None:
        """Several upstreams: record the arrival (coalesced with others waiting in this worker; a
        small ``output`` rides along); the message that completes the set wins. A redelivered winner
        finds itself the holder and goes on to recover its attempt."""
        record = await self._joins.arrive(Names.join_key(run_id, self.node.name), source, seq, output)
        if record is None or record.get("holder") != seq:
            return None  # waiting for other upstreams, or another message won the join
        crash_point("node.after_join", self.node.name)
        known = {**(record.get("outputs") or {}), source: payload.get("output")}
        outputs = await self._gather_outputs(run_id, known)  # reads only what the record lacks
        return Attempt(run_id, 1, payload.get("input"), outputs)

    async def _gather_outputs(self, run_id: str, known: dict[str, Any]) -> dict[str, Any]:
        missing = [up for up in self.node.upstreams if up not in known]
        names, wf, bus = self.system.names, self.definition.name, self.system.bus
        subjects = {up: names.event(wf, run_id, up, "completed") for up in missing}
        found = await last_events(bus.nc, bus.js, names.events_stream, list(subjects.values()))
        outputs = dict(known)
        for up, subject in subjects.items():
            event = found.get(subject)
            outputs[up] = event.get("output") if event is not None else None
        return {up: outputs.get(up) for up in self.node.upstreams}

    async def _unfinished(self, attempt: Attempt) -> bool:
        """A redelivered message: whether the journal lacks its attempt's outcome (then the attempt
        was lost with the worker that held the message, and must run again)."""
        js, stream = self.system.bus.js, self.system.names.events_stream
        completed, failed = await asyncio.gather(
            last_event(js, stream, self._subject(attempt.run_id, "completed")),
            last_event(js, stream, self._subject(attempt.run_id, "attempt_failed")),
        )
        if completed is not None:
            return False
        # This message's attempt already failed and was reported: the supervisor has it.
        return failed is None or int(failed.get("attempt", 0)) < attempt.attempt

    async def _report_lost(self, attempt: Attempt, redelivered: int) -> None:
        """Record the lost attempt; ``attempt`` becomes the next one."""
        lost = attempt.attempt + redelivered - 1
        await self.system.emit(
            self._subject(attempt.run_id, "lost"),
            {"attempt": lost, "reason": "delivery timed out: the worker holding it stopped or stalled"},
            headers=attempt.trace,
            msg_id=f"{attempt.run_id}.{self.node.name}.{lost}.lost",
        )
        attempt.attempt += redelivered

    # --- running --------------------------------------------------------------------------------
    async def _run_attempt(self, msg: Msg, attempt: Attempt) -> None:
        ctx = NodeContext(
            workflow=self.definition.name,
            run_id=attempt.run_id,
            node=self.node.name,
            attempt=attempt.attempt,
            raw_input=attempt.raw_input,
            input_model=self.definition.input_model,
            outputs=attempt.outputs,
            data=functools.partial(self._data_of, attempt.run_id),
        )
        request = ExecuteNodeInput(
            workflow=self.definition.name,
            run_id=attempt.run_id,
            node=self.node.name,
            attempt=attempt.attempt,
            context=ctx,
            action=self._action,
            headers=msg.headers or {},
            timeout=self.node.timeout,
            retry=self.node.retry,
            output_model=self.node.output_model,
            subject=msg.subject,
            published_at=msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else None,
        )
        attempt.started_at = time.time()
        delay = self.system.announce_starts_after
        if delay > 0:
            attempt.timer = asyncio.get_running_loop().call_later(delay, self._announce_later, attempt)
        else:
            await self._announce_start(attempt)
        task = asyncio.current_task()
        assert task is not None
        self.system.gate.track(attempt.run_id, task)
        crash_point("node.before_action", self.node.name)
        try:
            output = await self.system.chain.execute_node(request)
        except asyncio.CancelledError:
            if self.system.gate.closed(attempt.run_id) == "cancelled":
                task.uncancel()
                await self._announced(attempt)
                await self._finish(msg, attempt, "cancelled", self._outcome(attempt))
                return
            raise
        except Exception as exc:
            await self._announced(attempt)
            await self._finish_failed(msg, attempt, request, exc)
            return
        finally:
            if attempt.timer is not None:
                attempt.timer.cancel()  # over, or abandoned (the worker stops): nothing to announce now
                attempt.timer = None
            self.system.gate.untrack(attempt.run_id, task)
        await self._announced(attempt)
        crash_point("node.after_action", self.node.name)
        try:
            await self._finish_completed(msg, attempt, output)
        except UnencodableValue as exc:  # raised before anything was published
            error = NonRetryableError(
                f"output of node {self.node.name!r} (run {attempt.run_id!r}) cannot be stored: {exc}"
            )
            await self._finish_failed(msg, attempt, request, error)

    # --- the started event ------------------------------------------------------------------------
    # An attempt is announced once it has run ``announce_starts_after`` seconds (at once when 0). A
    # quicker one is told by its outcome event alone, which carries the same start time and worker:
    # one stored message less per step, and on a fan-out one in three. Watchers see such a node go
    # from pending to its outcome; the journal, the timeline and the trace keep its start.
    async def _announce_start(self, attempt: Attempt) -> None:
        await self.system.emit(
            self._subject(attempt.run_id, "started"),
            {"attempt": attempt.attempt, "worker": self.system.worker_id, "started_at": attempt.started_at},
            headers=attempt.trace,
            durable=False,
        )

    def _announce_later(self, attempt: Attempt) -> None:
        attempt.timer = None
        announcing = asyncio.get_running_loop().create_task(self._announce_start(attempt))
        attempt.announcing = announcing

        def done(finished: asyncio.Task[None]) -> None:
            attempt.announcing = None  # a held run keeps no finished task alive
            if not finished.cancelled() and finished.exception() is not None:
                log.debug("%s: announcing an attempt failed: %s", self.name, finished.exception())

        announcing.add_done_callback(done)

    @staticmethod
    async def _announced(attempt: Attempt) -> None:
        """The attempt is over: an announcement under way goes out before the outcome, so the
        journal never has an attempt start after it ended."""
        announcing = attempt.announcing
        if announcing is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(announcing)

    def _outcome(self, attempt: Attempt) -> dict[str, Any]:
        """What every outcome event says of its attempt: for a quick one, the only record of it."""
        return {
            "attempt": attempt.attempt,
            "started_at": attempt.started_at,
            "finished_at": time.time(),
            "worker": self.system.worker_id,
        }

    async def _finish_completed(self, msg: Msg, attempt: Attempt, output: Any) -> None:
        body = {"output": output, "input": attempt.raw_input, **self._outcome(attempt)}
        subject = self._subject(attempt.run_id, "completed")
        headers = {**attempt.trace, **EXPECT_NEW_SUBJECT}
        published = await self._publish_outcome(lambda: self.system.emit(subject, body, headers=headers))
        crash_point("node.after_publish", self.node.name)
        if not self._joins_below:
            await msg.ack()
            return
        ready = False
        if published is None or published.seq is None:
            await self._arrive_again(attempt.run_id)  # an earlier try stored it, or a duplicate did
        else:
            headers = carried_headers(published.headers)
            ready = await self._arrive_below(attempt.run_id, published.seq, body, headers, published.size)
        await msg.ack()
        if ready:
            # The join may start at once, here: see that this acknowledgement is out first. Were this
            # worker to die before sending it, the message would come back (harmlessly, but a join
            # that crashes its workers would take this bystander down with it, to the dead letters).
            with contextlib.suppress(Exception):
                await self.system.bus.nc.flush(timeout=1)

    async def _finish_failed(
        self, msg: Msg, attempt: Attempt, request: ExecuteNodeInput, exc: BaseException
    ) -> None:
        policy = request.retry or NO_RETRY
        error = rec.error_info(exc, policy)
        retry = bool(error["retryable"]) and policy.allows_another(attempt.attempt)
        body = {
            "error": error,
            "retry": retry,
            "policy": rec.policy_dict(policy),
            "input": attempt.raw_input,
            "outputs": attempt.outputs,
            **self._outcome(attempt),
        }
        await self._finish(msg, attempt, "attempt_failed", body)

    async def _finish(self, msg: Msg, attempt: Attempt, kind: str, body: dict[str, Any]) -> None:
        subject = self._subject(attempt.run_id, kind)
        msg_id = f"{attempt.run_id}.{self.node.name}.{attempt.attempt}.{kind}"
        try:
            await self._publish_outcome(
                lambda: self.system.emit(subject, body, msg_id=msg_id, headers=attempt.trace)
            )
        except UnencodableValue as exc:
            # The report carries the attempt's input and upstream outputs, for a retry: too large to
            # store. Report the failure without them, as final (a retry would lack its inputs).
            error = {**body.get("error", {}), "retryable": False}
            error["message"] = f"{error.get('message', '')} (not retried: its report was too large: {exc})"
            small = {key: value for key, value in body.items() if key not in ("input", "outputs")}
            small.update(error=error, retry=False)
            await self._publish_outcome(
                lambda: self.system.emit(subject, small, msg_id=msg_id, headers=attempt.trace)
            )
        await msg.ack()

    async def _publish_outcome(self, publish: Callable[[], Awaitable[PublishInput]]) -> PublishInput | None:
        """Publish an attempt's outcome, retrying in place through a leader election or a reconnect:
        giving up would throw the finished work away and run the action again. A completion that
        conflicts landed on an earlier try (or a racing duplicate won): the first one stands (None).
        The message stays held meanwhile (heartbeats keep it), so no other worker takes the node."""
        delay = 0.05
        for _ in range(PUBLISH_TRIES):
            try:
                return await publish()
            except StateConflict:
                return None
            except TRANSIENT as exc:
                log.warning("%s: publishing an outcome failed (%s); retrying in %.2fs", self.name, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return await publish()  # a last try whose error reaches the actor's error policy

    def _data_of(self, run_id: str) -> WorkflowData:
        return WorkflowData(self.system.store, run_id, outputs=functools.partial(self._output_of, run_id))

    async def _output_of(self, run_id: str, node: str) -> Any:
        if node not in self.definition.nodes:
            raise DataKeyNotFound(f"workflow {self.definition.name!r} has no node {node!r}")
        names = self.system.names
        event = await last_event(
            self.system.bus.js,
            names.events_stream,
            names.event(self.definition.name, run_id, node, "completed"),
        )
        if event is None:
            raise DataKeyNotFound(f"node {node!r} of run {run_id!r} has not completed")
        return event.get("output")

    def _subject(self, run_id: str, kind: str) -> str:
        return self.system.names.event(self.definition.name, run_id, self.node.name, kind)
