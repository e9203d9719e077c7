"""The run journal: the events stream read as a per-subject store.

A node's completion is published with ``Nats-Expected-Last-Subject-Sequence: 0``: JetStream accepts
it only if the subject has no message yet, so the publish is both a create-only compare-and-set (one
completion per node per run, ever) and the event the downstream nodes consume. One write per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Sequence
from typing import Any

import nats.js.errors as js_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, RawStreamMsg

from flow_orchestrator.bus._codec import decode
from flow_orchestrator.bus._reader import read_stored
from flow_orchestrator.bus._subjects import parse_event_subject

EXPECT_NEW_SUBJECT = {"Nats-Expected-Last-Subject-Sequence": "0"}
_CONFLICT_CODES = (10071, 10164)


def is_subject_conflict(exc: BaseException) -> bool:
    """Whether a publish failed because the subject already had a message (the CAS lost)."""
    return isinstance(exc, js_errors.APIError) and exc.err_code in _CONFLICT_CODES


async def last_event(
    js: JetStreamContext, stream: str, subject: str, *, leader: bool = True
) -> dict[str, Any] | None:
    """The decoded payload of the last message on ``subject``, or ``None``.

    Reads that decide something (is this node done? what did its upstream return?) go to the
    stream's leader: on a cluster a direct get may be answered by a replica that lags behind.
    ``leader=False`` allows the faster direct get for reads that only inform.
    """
    msg = await last_message(js, stream, subject, leader=leader)
    if msg is None:
        return None
    payload = decode(msg.data) if msg.data else {}
    return payload if isinstance(payload, dict) else {"value": payload}


async def last_message(
    js: JetStreamContext, stream: str, subject: str, *, leader: bool = True
) -> RawStreamMsg | None:
    """The last message on ``subject`` as stored (sequence, headers, data), or ``None``; ``leader``
    as for :func:`last_event`."""
    try:
        return await js.get_last_msg(stream, subject, direct=not leader)
    except js_errors.NotFoundError:
        return None


MULTI_LAST_LIMIT = 1024  # subjects per batched direct get (the server's limit)
_END_OF_BATCH = ("204", "404", "408", "413")  # end of batch, nothing found, timed out, too many


async def last_events(
    nc: NatsClient, js: JetStreamContext, stream: str, subjects: Sequence[str], *, wait: float = 5.0
) -> dict[str, dict[str, Any] | None]:
    """The last event on each of ``subjects`` (``None`` where there is none), in one batched direct
    get per :data:`MULTI_LAST_LIMIT` subjects instead of a request per subject; ``wait`` bounds each.

    A direct get may be answered by a replica; one that lags behind may not have a message the leader
    has. So every subject the batch did not return is read again from the leader: the answer is the
    leader's, whichever replica replied. Use it for subjects that are written once (completions).
    """
    found: dict[str, dict[str, Any] | None] = {}
    api = f"{getattr(js, '_prefix', '$JS.API')}.DIRECT.GET.{stream}"  # nats-py keeps the prefix private
    for start in range(0, len(subjects), MULTI_LAST_LIMIT):
        chunk = list(subjects[start : start + MULTI_LAST_LIMIT])
        found.update(await _multi_last(nc, api, chunk, wait))
    missing = [subject for subject in subjects if subject not in found]
    answers = await asyncio.gather(*(last_event(js, stream, subject) for subject in missing))
    found.update(zip(missing, answers, strict=True))
    return found


async def _multi_last(
    nc: NatsClient, api_subject: str, subjects: list[str], wait: float
) -> dict[str, dict[str, Any]]:
    """One ``multi_last`` direct get (ADR-31): the server streams a message per subject it has, then
    an end-of-batch status. An incomplete answer (timeout, error) yields what arrived."""
    found: dict[str, dict[str, Any]] = {}
    ended = asyncio.Event()

    async def collect(msg: Msg) -> None:
        headers = msg.headers or {}
        subject = headers.get("Nats-Subject")
        if subject is not None and "Status" not in headers:
            payload = decode(msg.data) if msg.data else {}
            found[subject] = payload if isinstance(payload, dict) else {"value": payload}
        elif headers.get("Status") in _END_OF_BATCH or not msg.data:
            ended.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        request = json.dumps({"multi_last": subjects, "batch": len(subjects)}).encode()
        await nc.publish(api_subject, request, reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), wait)
    finally:
        await sub.unsubscribe()
    return found


async def read_messages(js: JetStreamContext, stream: str, subject: str) -> list[Msg]:
    """Every message on ``subject`` (wildcards allowed) in ``stream``, oldest first, through an ordered
    consumer (ephemeral, in memory, acknowledging nothing). A reader needs the right to create such a
    consumer only: no right to pull from, or change, the workers' durable consumers."""
    sub = await js.subscribe(subject, stream=stream, ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
    messages: list[Msg] = []
    try:
        info = await sub.consumer_info()
        if (info.num_pending or 0) + (info.delivered.consumer_seq if info.delivered else 0) == 0:
            return messages  # nothing on the subject
        while True:
            msg = await sub.next_msg(timeout=5.0)
            messages.append(msg)
            if not msg.metadata.num_pending:  # the last one stored when it was delivered
                return messages
    finally:
        await sub.unsubscribe()


async def read_events(
    nc: NatsClient, js: JetStreamContext, stream: str, subject: str
) -> list[dict[str, Any]]:
    """Every event on ``subject`` (wildcards allowed), oldest first, as ``{node, kind, at, data,
    headers}``, read without a consumer (what an observer may do; see ``bus/_reader.py``)."""
    events: list[dict[str, Any]] = []
    for message in await read_stored(nc, js, stream, subject):
        _, _, node, kind = parse_event_subject(message.subject)
        data = decode(message.data) if message.data else {}
        events.append(
            {"node": node, "kind": kind, "at": message.at, "data": data, "headers": message.headers}
        )
    return events
