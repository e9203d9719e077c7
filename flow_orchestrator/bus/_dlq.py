"""Dead letters: a message that cannot be processed is recorded with its reason, original subject,
headers and payload in the dead-letter stream, and a ``rejected`` event makes it visible in the journal.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from flow_orchestrator.bus._codec import encode
from flow_orchestrator.bus._subjects import TRIGGER_TOKEN, Names

# A dead-letter record must itself fit in a message; keep this much of an oversized original.
MAX_KEPT_PAYLOAD = 64 * 1024


@dataclass(frozen=True, slots=True)
class Letter:
    """The message being dead-lettered: where it was, what it said."""

    subject: str
    headers: Mapping[str, str]
    data: bytes
    stream_seq: int | None = None

    @classmethod
    def of(cls, msg: Msg) -> Letter:
        try:
            seq: int | None = int(msg.metadata.sequence.stream)
        except Exception:  # not a JetStream delivery (no metadata in the reply subject)
            seq = None
        return cls(msg.subject, dict(msg.headers or {}), msg.data or b"", seq)


def dead_letter_record(
    letter: Letter, *, workflow: str, reason: str, error: BaseException | str
) -> dict[str, Any]:
    data = letter.data
    return {
        "reason": reason,
        "error_type": type(error).__name__ if isinstance(error, BaseException) else "Error",
        "error": str(error),
        "workflow": workflow,
        "subject": letter.subject,
        "headers": dict(letter.headers),
        "data": data[:MAX_KEPT_PAYLOAD],
        "size": len(data),
        "truncated": len(data) > MAX_KEPT_PAYLOAD,
        "stream_seq": letter.stream_seq,
        "at": time.time(),
    }


async def dead_letter(
    js: JetStreamContext,
    names: Names,
    letter: Letter,
    *,
    workflow: str,
    reason: str,
    error: BaseException | str,
) -> dict[str, Any]:
    """Record ``letter`` in the dead-letter stream; return the ``rejected`` event to publish for it
    (the caller publishes it through its interceptor chain, so metrics and traces see it)."""
    record = dead_letter_record(letter, workflow=workflow, reason=reason, error=error)
    # One record per original message: a repeated attempt (a redelivery after a crash) is dropped.
    headers = {"Nats-Msg-Id": f"dlq-{letter.stream_seq}-{reason}"} if letter.stream_seq is not None else None
    ack = await js.publish(names.dlq(workflow, reason), encode(record), headers=headers)
    event = {k: record[k] for k in ("reason", "error_type", "error", "subject", "size", "stream_seq")}
    event["dlq_seq"] = int(ack.seq)
    return event


def rejected_subject(names: Names, workflow: str, run_id: str | None) -> str:
    return names.event(workflow, run_id or "_none", TRIGGER_TOKEN, "rejected")
