"""Trace-context propagation: the W3C headers a run carries from its trigger through every event.

The engine copies them from each incoming message to the events it publishes in response, so a run's
context survives every hop, process and worker, including scheduled retries (the server keeps a
scheduled message's headers). Tracing interceptors read and set them; the engine only carries them.
"""

from __future__ import annotations

from collections.abc import Mapping

TRACE_HEADERS = ("traceparent", "tracestate", "baggage")


def trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The trace-context subset of ``headers`` (empty when there is none)."""
    if not headers:
        return {}
    return {name: headers[name] for name in TRACE_HEADERS if name in headers}
