"""Observing runs: a run's journal as an ordered stream of typed events, replayed then followed live.

``flowctl watch`` and ``run`` draw their live view from it; dashboards and tests can use it the same way.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flow_orchestrator._errors import MalformedMessage
from flow_orchestrator.bus._codec import decode
from flow_orchestrator.bus._reader import Stored, follow_stored, read_stored
from flow_orchestrator.bus._subjects import (
    RUN_TOKEN,
    TRIGGER_TOKEN,
    Names,
    check_name,
    check_run_id,
    parse_event_subject,
)

if TYPE_CHECKING:
    from flow_orchestrator.runtime._client import Client

RUN_END_KINDS = frozenset({"completed", "failed", "cancelled"})
REJECTED = "rejected"
"""The kind of the run-level event that says a worker dead-lettered the run's trigger: it never runs."""


@dataclass(frozen=True, slots=True)
class RunEvent:
    """One event of a run's journal, as the stream holds it.

    ``node`` is ``None`` for run-level events: ``started``, ``cancel`` (a request), the terminal
    ``completed``/``failed``/``cancelled``, and ``rejected`` when a worker dead-lettered the trigger.
    ``at`` is the server's timestamp (seconds since the epoch); ``seq`` the stream sequence, which
    orders a run's events.
    """

    workflow: str
    run_id: str
    node: str | None
    kind: str
    at: float
    data: dict[str, Any] = field(default_factory=dict)
    seq: int = 0

    @property
    def ends_run(self) -> bool:
        """Whether this is the run's last word: its terminal event, or its trigger's rejection."""
        return self.node is None and (self.kind in RUN_END_KINDS or self.kind == REJECTED)

    def journal_entry(self) -> dict[str, Any]:
        """The ``{node, kind, at, data}`` form of ``Client.journal`` (what ``fold_events`` reads)."""
        token = self.node or (TRIGGER_TOKEN if self.kind == REJECTED else RUN_TOKEN)
        return {"node": token, "kind": self.kind, "at": self.at, "data": self.data}


async def follow_run(
    client: Client,
    run_id: str,
    *,
    workflow: str | None = None,
    from_start: bool = True,
    rejection_is_ours: Callable[[dict[str, Any]], bool] | None = None,
) -> AsyncGenerator[RunEvent, None]:
    """Yield a run's events in order, live, and stop once its terminal event has been yielded.

    From the start (the default), the journal so far is replayed first, so a finished run's events
    are all yielded and the iteration ends by itself. Without ``workflow`` it is looked up in the run
    record (:class:`RunNotFound` if there is none yet); pass it to follow a run a worker has not
    accepted yet. An iteration abandoned early should be closed (``contextlib.aclosing``) so it
    unsubscribes at once. ``rejection_is_ours`` (from the handle that published the trigger) skips
    the rejection of an earlier trigger with the same run id.
    """
    run_id = check_run_id(run_id)
    found = await client.store.get(Names.run_key(run_id))
    record = found.value if found else None
    if workflow is None:
        if record is None:
            raise await client._no_run(run_id)
        workflow = str(record["workflow"])
    # A run that ended before we looked may have outlived its journal (the events stream expires,
    # run records do not): stop once the replay has caught up, even without a terminal event.
    ended_before = from_start and record is not None and record.get("status") in RUN_END_KINDS
    subject = client.names.events_of_run(workflow, run_id)
    nc, js, stream = client.bus.nc, client.bus.js, client.names.events_stream
    if ended_before:
        stored: AsyncGenerator[Stored, None] = _iterate(await read_stored(nc, js, stream, subject))
    else:
        stored = follow_stored(nc, js, stream, subject, from_start=from_start)
    async with contextlib.aclosing(stored):
        async for message in stored:
            event = _event_of(message)
            if event is not None and event.kind == REJECTED and rejection_is_ours is not None:
                event = event if rejection_is_ours(event.data) else None
            if event is not None:
                yield event
                if event.ends_run:
                    return


async def follow_workflow(
    client: Client, workflow: str, *, from_start: bool = False
) -> AsyncGenerator[RunEvent, None]:
    """Yield the events of every run of ``workflow`` as they happen (with ``from_start``, the whole
    retained journal first). It ends only when the client is closed: break out of the loop, or
    bound it with ``asyncio.timeout``, and close it (``contextlib.aclosing``) so it unsubscribes at
    once."""
    subject = client.names.event(check_name("workflow", workflow), "*", "*", "*")
    stored = follow_stored(
        client.bus.nc, client.bus.js, client.names.events_stream, subject, from_start=from_start
    )
    async with contextlib.aclosing(stored):
        async for message in stored:
            event = _event_of(message)
            if event is not None:
                yield event


async def _iterate(messages: list[Stored]) -> AsyncGenerator[Stored, None]:
    for message in messages:
        yield message


def _event_of(message: Stored) -> RunEvent | None:
    try:
        workflow, run_id, node, kind = parse_event_subject(message.subject)
    except ValueError:
        return None
    try:
        payload = decode(message.data) if message.data else {}
    except MalformedMessage:
        payload = {}  # the subject still says what happened; observers must not crash on a bad body
    return RunEvent(
        workflow=workflow,
        run_id=run_id,
        node=None if node in (RUN_TOKEN, TRIGGER_TOKEN) else node,
        kind=kind,
        at=message.at if message.at is not None else time.time(),
        data=payload if isinstance(payload, dict) else {"value": payload},
        seq=message.seq,
    )
