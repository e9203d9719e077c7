"""The run journal: the events stream read as a per-subject store.

A node's completion is published with ``Nats-Expected-Last-Subject-Sequence: 0``: JetStream accepts
it only if the subject has no message yet, so the publish is both a create-only compare-and-set (one
completion per node per run, ever) and the event the downstream nodes consume. One write per step.
"""

from __future__ import annotations

from typing import Any

import nats.js.errors as js_errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from flow_orchestrator.bus._codec import decode
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
    try:
        msg = await js.get_last_msg(stream, subject, direct=not leader)
    except js_errors.NotFoundError:
        return None
    payload = decode(msg.data) if msg.data else {}
    return payload if isinstance(payload, dict) else {"value": payload}


async def read_messages(js: JetStreamContext, stream: str, subject: str, batch: int = 512) -> list[Msg]:
    """Every message on ``subject`` (wildcards allowed) in ``stream``, oldest first, through a
    short-lived consumer that acknowledges nothing."""
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
        ),
    )
    messages: list[Msg] = []
    try:
        pending = (await sub.consumer_info()).num_pending or 0
        while pending > 0:
            for msg in await sub.fetch(min(batch, pending), timeout=5.0):
                messages.append(msg)
                pending = msg.metadata.num_pending or 0
    finally:
        await sub.unsubscribe()
    return messages


async def read_events(
    js: JetStreamContext, stream: str, subject: str, batch: int = 512
) -> list[dict[str, Any]]:
    """Every event on ``subject`` (wildcards allowed), oldest first, as ``{node, kind, at, data}``."""
    events: list[dict[str, Any]] = []
    for msg in await read_messages(js, stream, subject, batch):
        _, _, node, kind = parse_event_subject(msg.subject)
        events.append(
            {
                "node": node,
                "kind": kind,
                "at": msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else None,
                "data": decode(msg.data) if msg.data else {},
                "headers": dict(msg.headers or {}),
            }
        )
    return events
