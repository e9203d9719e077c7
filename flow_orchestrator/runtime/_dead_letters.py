"""Reading and replaying dead letters (``flowctl dlq list`` / ``flowctl dlq replay ID``).

A replayed trigger is published again on its original subject with its original headers and payload
(the full payload is fetched from the triggers stream when the record kept only its head). It keeps
its run id through the ``Flow-Run-Id`` header under a fresh ``Nats-Msg-Id``, since the stream would
drop a repeat of the old one as a duplicate; if that run exists by now, no second run starts. A
replay repeated within the stream's duplicate window is dropped by the server: it raises
:class:`NotReplayable` naming the run the first replay started.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nats.js.errors as js_errors

from flow_orchestrator._errors import FlowError
from flow_orchestrator.bus._codec import decode
from flow_orchestrator.bus._journal import read_messages
from flow_orchestrator.bus._subjects import Names

RUN_ID_HEADER = "Flow-Run-Id"


class NotReplayable(FlowError, ValueError):
    """This dead letter cannot be replayed (not a trigger, or its payload is gone)."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int  # its sequence in the dead-letter stream
    reason: str
    error_type: str
    error: str
    workflow: str
    subject: str
    headers: dict[str, str]
    data: bytes
    size: int
    truncated: bool
    stream_seq: int | None
    at: float

    @classmethod
    def from_record(cls, seq: int, record: dict[str, Any]) -> DeadLetter:
        return cls(
            id=seq,
            reason=str(record.get("reason")),
            error_type=str(record.get("error_type")),
            error=str(record.get("error")),
            workflow=str(record.get("workflow")),
            subject=str(record.get("subject")),
            headers=dict(record.get("headers") or {}),
            data=bytes(record.get("data") or b""),
            size=int(record.get("size") or 0),
            truncated=bool(record.get("truncated")),
            stream_seq=record.get("stream_seq"),
            at=float(record.get("at") or 0.0),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason,
            "error_type": self.error_type,
            "error": self.error,
            "workflow": self.workflow,
            "subject": self.subject,
            "headers": self.headers,
            "size": self.size,
            "truncated": self.truncated,
            "stream_seq": self.stream_seq,
            "at": self.at,
        }


async def list_dead_letters(js: Any, names: Names, workflow: str | None = None) -> list[DeadLetter]:
    subject = f"{names.prefix}.dlq.{workflow}.>" if workflow else f"{names.prefix}.dlq.>"
    messages = await read_messages(js, names.dlq_stream, subject)
    return [DeadLetter.from_record(int(m.metadata.sequence.stream), decode(m.data)) for m in messages]


async def replay_dead_letter(js: Any, names: Names, letter_id: int) -> str:
    """Publish a dead-lettered trigger again; returns the run id it will run under."""
    try:
        raw = await js.get_msg(names.dlq_stream, letter_id)
    except js_errors.NotFoundError as exc:
        raise NotReplayable(f"no dead letter {letter_id} (it may have expired)") from exc
    letter = DeadLetter.from_record(letter_id, decode(raw.data))
    if not letter.subject.startswith(f"{names.prefix}.trigger."):
        raise NotReplayable(
            f"dead letter {letter_id} is a {letter.subject!r} event, kept for inspection; only triggers "
            "can be replayed (start the run again, or `flowctl retry` a failed run)"
        )
    data = letter.data
    if letter.truncated:
        if letter.stream_seq is None:
            raise NotReplayable(f"dead letter {letter_id} kept only the head of its payload")
        try:
            data = (await js.get_msg(names.triggers_stream, letter.stream_seq)).data or b""
        except js_errors.NotFoundError as exc:
            raise NotReplayable(
                f"the original of dead letter {letter_id} has expired from the stream"
            ) from exc
    headers = dict(letter.headers)
    run_id = headers.pop(RUN_ID_HEADER, None) or headers.pop("Nats-Msg-Id", None)
    headers.pop("Nats-Msg-Id", None)
    headers["Nats-Msg-Id"] = f"replay-{letter_id}"
    if run_id:
        headers[RUN_ID_HEADER] = run_id
    ack = await js.publish(letter.subject, data, headers=headers)
    run = run_id or f"(a new id, from replay-{letter_id})"
    if ack.duplicate:
        raise NotReplayable(
            f"dead letter {letter_id} was replayed a moment ago (within the triggers stream's duplicate "
            f"window), so the server dropped this repeat; that replay stands: run {run}"
        )
    return run
