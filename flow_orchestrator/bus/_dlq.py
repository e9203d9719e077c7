"""Dead letters: a message that cannot be processed is recorded with its reason, original subject,
headers and payload in the dead-letter stream, and a ``rejected`` event makes it visible in the journal.
"""

from __future__ import annotations

import time
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from flow_orchestrator.bus._codec import encode
from flow_orchestrator.bus._subjects import TRIGGER_TOKEN, Names

# A dead-letter record must itself fit in a message; keep this much of an oversized original.
MAX_KEPT_PAYLOAD = 64 * 1024


def _stream_sequence(msg: Msg) -> int | None:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:  # not a JetStream delivery (no metadata in the reply subject)
        return None


def dead_letter_record(msg: Msg, *, workflow: str, reason: str, error: BaseException | str) -> dict[str, Any]:
    data = msg.data or b""
    return {
        "reason": reason,
        "error_type": type(error).__name__ if isinstance(error, BaseException) else "Error",
        "error": str(error),
        "workflow": workflow,
        "subject": msg.subject,
        "headers": dict(msg.headers or {}),
        "data": data[:MAX_KEPT_PAYLOAD],
        "size": len(data),
        "truncated": len(data) > MAX_KEPT_PAYLOAD,
        "stream_seq": _stream_sequence(msg),
        "at": time.time(),
    }


async def dead_letter(
    js: JetStreamContext, names: Names, msg: Msg, *, workflow: str, reason: str, error: BaseException | str
) -> dict[str, Any]:
    """Record ``msg`` in the dead-letter stream; return the ``rejected`` event to publish for it
    (the caller publishes it through its interceptor chain, so metrics and traces see it)."""
    record = dead_letter_record(msg, workflow=workflow, reason=reason, error=error)
    ack = await js.publish(names.dlq(workflow, reason), encode(record))
    event = {k: record[k] for k in ("reason", "error_type", "error", "subject", "size", "stream_seq")}
    event["dlq_seq"] = int(ack.seq)
    return event


def rejected_subject(names: Names, workflow: str, run_id: str | None) -> str:
    return names.event(workflow, run_id or "_none", TRIGGER_TOKEN, "rejected")
