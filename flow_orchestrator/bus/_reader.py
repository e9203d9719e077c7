"""Reading a stream without a consumer: batched direct gets (ADR-31), woken by a core subscription.

A reader that creates consumers needs the right to, and NATS does not scope the subject-less
consumer-create request by name: whoever may create an ephemeral consumer on the events stream may
also change the workers' durable consumers there. Journals and live views are read here instead, by
direct gets only (``$JS.API.DIRECT.GET.<stream>``, which the stream's ``allow_direct`` answers), so an
observer needs no consumer rights on that stream at all.

:func:`read_stored` reads every message on a subject, in batches. :func:`follow_stored` goes on
reading as new ones are stored: a core subscription on the same subject tells it when to look (a
core message can arrive before the store has it, so an empty look is tried again a few times, and a
slow poll covers any wake-up lost while the connection was down). Only what the stream stored is
yielded, in stream order, with its sequence and timestamp, as a consumer would deliver it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors as js_errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from flow_orchestrator._errors import FlowError

log = logging.getLogger("flow_orchestrator.bus")
BATCH = 256  # messages per direct get
POLL = 1.0  # seconds between looks when no wake-up comes
_RECHECKS = (0.002, 0.01, 0.05)  # after a wake-up found nothing stored yet
# What a direct get adds to the stored message's own headers.
_META = frozenset(
    {
        "Nats-Stream",
        "Nats-Subject",
        "Nats-Sequence",
        "Nats-Time-Stamp",
        "Nats-Num-Pending",
        "Nats-Last-Sequence",
    }
)


class ReadFailed(FlowError):
    """The server answered a direct get with an error, or did not answer in time."""


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored message, as a direct get returns it."""

    subject: str
    seq: int
    at: float | None  # the server's timestamp, seconds since the epoch
    headers: dict[str, str]
    data: bytes


def _timestamp(value: str | None) -> float | None:
    """Seconds since the epoch from the server's RFC 3339 timestamp (nanoseconds cut to micro)."""
    if not value:
        return None
    try:
        base, _, rest = value.rstrip("Z").partition(".")
        when = dt.datetime.strptime(base, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=dt.UTC)
        return when.timestamp() + (int(rest[:6].ljust(6, "0")) / 1e6 if rest else 0.0)
    except ValueError:
        return None


def _stored(msg: Msg) -> Stored:
    headers = msg.headers or {}
    return Stored(
        subject=headers["Nats-Subject"],
        seq=int(headers["Nats-Sequence"]),
        at=_timestamp(headers.get("Nats-Time-Stamp")),
        headers={name: value for name, value in headers.items() if name not in _META},
        data=msg.data,
    )


def direct_api(js: Any, stream: str) -> str:
    return f"{getattr(js, '_prefix', '$JS.API')}.DIRECT.GET.{stream}"  # nats-py keeps the prefix private


async def read_batch(
    nc: NatsClient, api: str, subject: str, start: int, *, batch: int = BATCH, wait: float = 5.0
) -> tuple[list[Stored], int]:
    """Up to ``batch`` messages on ``subject`` from stream sequence ``start`` on, and how many more
    there were when the last of them was read."""
    found: list[Stored] = []
    pending = 0
    ended = asyncio.Event()
    failure: list[str] = []

    async def collect(msg: Msg) -> None:
        nonlocal pending
        headers = msg.headers or {}
        status = headers.get("Status")
        if status is None and "Nats-Sequence" in headers:
            found.append(_stored(msg))
            pending = int(headers.get("Nats-Num-Pending") or 0)
            return
        if status not in (None, "204", "404"):
            failure.append(f"{status} {headers.get('Description', '')}".strip())
        if status == "404":
            pending = 0
        ended.set()

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    try:
        request = {"seq": start, "next_by_subj": subject, "batch": batch}
        await nc.publish(api, json.dumps(request).encode(), reply=inbox)
        try:
            await asyncio.wait_for(ended.wait(), wait)
        except TimeoutError:
            raise ReadFailed(f"no answer to a direct get on {api} within {wait:.0f} s") from None
    finally:
        await sub.unsubscribe()
    if failure:
        raise ReadFailed(f"direct get on {api} for {subject!r} failed: {failure[0]}")
    return found, pending


async def read_stored(nc: NatsClient, js: Any, stream: str, subject: str) -> list[Stored]:
    """Every message on ``subject`` (wildcards allowed) in ``stream``, oldest first.

    On a cluster any replica may answer a direct get, and one may lag a moment behind. So the read
    ends by asking the stream's leader for its last message on ``subject``: what the replica did not
    have yet is read from the leader, one by one. Everything stored before that question is returned.
    """
    api, start = direct_api(js, stream), 1
    messages: list[Stored] = []
    while True:
        found, pending = await read_batch(nc, api, subject, start)
        messages.extend(found)
        if not found or not pending:
            break
        start = found[-1].seq + 1
    last = await _leader_get(js, stream, subject)
    while last is not None and (messages[-1].seq if messages else 0) < last.seq:
        following = await _leader_get(js, stream, subject, after=messages[-1].seq if messages else 0)
        if following is None:
            break
        messages.append(following)
    return messages


async def _leader_get(js: Any, stream: str, subject: str, *, after: int | None = None) -> Stored | None:
    """From the stream's leader: the last message on ``subject``, or the first one after ``after``."""
    try:
        if after is None:
            raw = await js.get_msg(stream, subject=subject)
        else:
            raw = await js.get_msg(stream, seq=after + 1, subject=subject, next=True)
    except js_errors.NotFoundError:
        return None
    headers = dict(raw.headers or {})
    return Stored(
        subject=raw.subject or subject,
        seq=int(raw.seq or 0),
        at=raw.time.timestamp() if raw.time else None,
        headers=headers,
        data=raw.data or b"",
    )


async def follow_stored(
    nc: NatsClient, js: Any, stream: str, subject: str, *, from_start: bool
) -> AsyncGenerator[Stored, None]:
    """The messages on ``subject`` as the stream stores them (with ``from_start``, those it already
    holds first). It ends only when its connection is closed; close it (``contextlib.aclosing``) to
    unsubscribe."""
    api = direct_api(js, stream)
    woken = asyncio.Event()

    async def wake(_: Msg) -> None:
        woken.set()

    try:
        sub = await nc.subscribe(subject, cb=wake)  # before the first look: nothing falls in between
    except nats.errors.Error:
        if nc.is_closed:
            return
        raise
    try:
        start = 1 if from_start else (await js.stream_info(stream)).state.last_seq + 1
        while True:
            woken.clear()
            try:
                found, pending = await read_batch(nc, api, subject, start)
            except (ReadFailed, nats.errors.Error) as exc:
                if nc.is_closed:
                    return  # closed for good (the client was closed): nothing more will come
                # The connection is down, or the stream has no leader yet: keep looking.
                log.debug("following %s: %s; looking again in %.0f s", subject, exc, POLL)
                await asyncio.sleep(POLL)
                continue
            for stored in found:
                yield stored
            if found:
                start = found[-1].seq + 1
                if pending:
                    continue
            elif await _stored_soon(nc, api, subject, start, woken):
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), POLL)
    finally:
        with contextlib.suppress(Exception):  # the connection may be closing: the server drops it anyway
            await sub.unsubscribe()


async def _stored_soon(nc: NatsClient, api: str, subject: str, start: int, woken: asyncio.Event) -> bool:
    """After a wake-up whose message the store did not have yet: whether it has it a moment later."""
    if not woken.is_set():
        return False
    for delay in _RECHECKS:
        await asyncio.sleep(delay)
        try:
            found, _ = await read_batch(nc, api, subject, start, batch=1)
        except (ReadFailed, nats.errors.Error):
            return False  # the next look says more
        if found:
            return True
    return False
