"""Trace-context propagation: the W3C headers a run carries from its trigger through every event.

The engine copies them from each incoming message to the events it publishes in response, so a run's
context survives every hop, process and worker, including scheduled retries (the server keeps a
scheduled message's headers). Tracing interceptors read and set them; the engine only carries them.
"""

from __future__ import annotations

from collections.abc import Mapping

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")
# Which ``flowctl retry`` of its run a message descends from (absent: none). The engine sets it on the
# messages a retry issues and carries it like the trace context; a trigger's own value is never taken.
EPOCH_HEADER = "Flow-Epoch"
# The retry epoch in which a message's lineage started a node by winning a claim against the retry
# (absent: its lineage was issued by the retry, or no claim was needed). The retry may have issued
# that node's downstream nodes too (it read the journal after the claim), so these claim as well.
CLAIMED_HEADER = "Flow-Claimed"
_CARRIED = (*TRACE_HEADERS, EPOCH_HEADER, CLAIMED_HEADER)


def trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The trace-context subset of ``headers`` (empty when there is none)."""
    if not headers:
        return {}
    return {name: headers[name] for name in TRACE_HEADERS if name in headers}


def carried_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """What the engine carries from a run's message to the events it publishes in response: the
    trace context and the retry epoch."""
    if not headers:
        return {}
    return {name: headers[name] for name in _CARRIED if name in headers}


def epoch_of(headers: Mapping[str, str] | None, header: str = EPOCH_HEADER) -> int:
    """The retry epoch a message descends from (0: from before any retry, or not a number); with
    ``header=CLAIMED_HEADER``, the epoch in which its lineage won a claim."""
    value = headers.get(header) if headers else None
    return int(value) if value is not None and value.isascii() and value.isdigit() else 0
