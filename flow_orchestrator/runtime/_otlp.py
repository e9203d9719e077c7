"""OTLP/HTTP span export with a direct protobuf encoder: the worker's ``http/protobuf`` trace exporter.

The SDK's OTLP exporters build a protobuf object for every span, attribute and value in Python code:
36-48 µs for one node-attempt span on our benchmark machine, and a third of everything tracing
cost a worker (docs/performance.md). :func:`encode_spans` writes the same OTLP bytes directly, in
8-12 µs (``python -m bench.otlp``), keeping the encoded form of attribute pairs that repeat from
span to span (workflow, node, run id, outcome). Its output decodes to exactly what the SDK's encoder
produces (tests/test_otlp.py checks that on generated spans of every shape).

:class:`OTLPSpanExporter` sends it as OTLP/HTTP does, configured by the same variables as the SDK's
exporter (``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``_HEADERS``, ``_TIMEOUT`` in seconds as the
Python SDK reads it, ``_COMPRESSION``, ``_CERTIFICATE``, ``_CLIENT_CERTIFICATE``, ``_CLIENT_KEY``).
A failed export is retried with exponential backoff and jitter on 429, 502, 503, 504 and connection
errors, honouring ``Retry-After``, until the export's timeout; any other answer drops the batch with
a logged error, as the specification asks.
"""

from __future__ import annotations

import gzip
import logging
import math
import os
import random
import struct
import threading
import time
import zlib
from collections.abc import Mapping, Sequence
from datetime import UTC
from email.utils import parsedate_to_datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import requests
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext
from opentelemetry.util.re import parse_env_headers

log = logging.getLogger("flow_orchestrator.telemetry")

_pack_fixed64 = struct.Struct("<Q").pack
_pack_fixed32 = struct.Struct("<I").pack
_pack_double = struct.Struct("<d").pack
_ONE_BYTE = tuple(bytes((n,)) for n in range(128))
_INT64 = range(-(2**63), 2**63)
_REMOTE_KNOWN, _REMOTE = 0x100, 0x200  # SpanFlags: "is the parent remote" is known / is true
_CACHED = 8192  # encoded attribute pairs kept for reuse (cleared when full)
_CACHED_TEXT = 64  # longer strings (messages, stack traces) are encoded each time, never kept


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _ONE_BYTE[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(tag: bytes, body: bytes) -> bytes:
    """A length-delimited field: ``tag`` (field number and wire type 2), the length, the body."""
    return tag + _varint(len(body)) + body


def _text(tag: bytes, value: str) -> bytes:
    return _field(tag, value.encode())


def _int_value(value: int) -> bytes:
    if value not in _INT64:
        raise ValueError(f"{value} does not fit in an int64")
    return b"\x18" + _varint(value & 0xFFFF_FFFF_FFFF_FFFF)


# The body of an AnyValue for each scalar type (bool before int: a bool is an int).
_SCALARS: tuple[tuple[type, Any], ...] = (
    (bool, lambda v: b"\x10\x01" if v else b"\x10\x00"),
    (str, lambda v: _text(b"\x0a", v)),
    (int, _int_value),
    (float, lambda v: b"\x21" + _pack_double(v)),
    (bytes, lambda v: _field(b"\x3a", v)),
)


def _any_value(value: Any) -> bytes:
    """The body of an ``AnyValue``; raises ValueError for what the SDK cannot encode either."""
    for kind, encode in _SCALARS:
        if isinstance(value, kind):
            return encode(value)  # type: ignore[no-any-return]
    if value is None:
        return b""
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _any_value(item)) for item in value))
    if isinstance(value, Mapping):
        pairs = b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items())
        return _field(b"\x32", pairs)
    raise ValueError(f"invalid type {type(value).__name__} of value {value!r}")


def _key_value(key: Any, value: Any) -> bytes:
    if isinstance(key, bytes):
        key = key.decode()  # as protobuf takes a bytes key (UTF-8 only)
    elif key is None:
        key = ""  # as protobuf leaves an unset key
    return _text(b"\x0a", key) + _field(b"\x12", _any_value(value))


class _Encoder:
    """Encodes batches of finished spans into an ``ExportTraceServiceRequest``.

    Keeps the encoded form of attribute pairs whose value is a bool, an int or a short string (keyed
    by key, type and value, so ``True`` and ``1`` stay apart; floats are not kept: ``0.0 == -0.0``).
    Used from one export thread at a time.
    """

    def __init__(self) -> None:
        self._pairs: dict[tuple[str, type, Any], bytes] = {}

    def attributes(self, tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
        """Each pair as a ``KeyValue`` field numbered by ``tag``; a value the SDK cannot encode either
        is left out and logged, as the SDK does."""
        if not attributes:
            return b""
        pairs = self._pairs
        out = []
        for key, value in attributes.items():
            kind = type(value)
            kept = kind is int or kind is bool or (kind is str and len(value) <= _CACHED_TEXT)
            cached = pairs.get((key, kind, value)) if kept else None
            if cached is None:
                try:
                    cached = _field(b"", _key_value(key, value))  # the length and the pair
                except Exception as exc:  # any value a user set: only this pair is lost, as in the SDK
                    log.error("OTLP export: attribute %r left out: %r", key, exc)
                    continue
                if kept:
                    if len(pairs) >= _CACHED:
                        pairs.clear()
                    pairs[key, kind, value] = cached
            out.append(tag + cached)
        return b"".join(out)

    def span(self, span: ReadableSpan) -> bytes:
        """The body of one OTLP ``Span`` message."""
        context: SpanContext = span.get_span_context()  # type: ignore[assignment]  # set once ended
        parent = span.parent
        parts = [
            b"\x0a\x10",
            context.trace_id.to_bytes(16, "big"),
            b"\x12\x08",
            context.span_id.to_bytes(8, "big"),
        ]
        if context.trace_state:
            parts.append(_text(b"\x1a", ",".join(f"{k}={v}" for k, v in context.trace_state.items())))
        if parent is not None:
            parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
        if span.name:
            parts.append(_text(b"\x2a", span.name))
        parts += (b"\x30", _ONE_BYTE[span.kind.value + 1])  # the SDK's kinds start at 0, OTLP's at 1
        if span.start_time:
            parts += (b"\x39", _pack_fixed64(span.start_time))
        if span.end_time:
            parts += (b"\x41", _pack_fixed64(span.end_time))
        parts.append(self.attributes(b"\x4a", span.attributes))
        if span.dropped_attributes:
            parts += (b"\x50", _varint(span.dropped_attributes))
        for event in span.events:
            parts.append(
                _field(
                    b"\x5a",
                    self._event(event.name, event.timestamp, event.attributes, event.dropped_attributes),
                )
            )
        if span.dropped_events:
            parts += (b"\x60", _varint(span.dropped_events))
        for link in span.links:
            body = (
                b"\x0a\x10"
                + link.context.trace_id.to_bytes(16, "big")
                + b"\x12\x08"
                + link.context.span_id.to_bytes(8, "big")
                + self.attributes(b"\x22", link.attributes)
                + (b"\x28" + _varint(link.dropped_attributes) if link.dropped_attributes else b"")
                + b"\x35"
                + _pack_fixed32(_flags(link.context))
            )
            parts.append(_field(b"\x6a", body))
        if span.dropped_links:
            parts += (b"\x70", _varint(span.dropped_links))
        status = span.status
        code = status.status_code.value
        body = (_text(b"\x12", status.description) if status.description else b"") + (
            b"\x18" + _ONE_BYTE[code] if code else b""
        )
        parts += (_field(b"\x7a", body), b"\x85\x01", _pack_fixed32(_flags(parent)))
        return b"".join(parts)

    def _event(self, name: str, timestamp: int, attributes: Mapping[str, Any] | None, dropped: int) -> bytes:
        return (
            (b"\x09" + _pack_fixed64(timestamp) if timestamp else b"")
            + (_text(b"\x12", name) if name else b"")
            + self.attributes(b"\x1a", attributes)
            + (b"\x20" + _varint(dropped) if dropped else b"")
        )

    def request(self, spans: Sequence[ReadableSpan]) -> bytes:
        """An ``ExportTraceServiceRequest``: spans grouped by resource, then by instrumentation scope."""
        by_id: dict[int, tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = {}
        merged: list[tuple[Resource, dict[InstrumentationScope | None, list[bytes]]]] = []
        for span in spans:
            resource = span.resource
            group = by_id.get(id(resource))
            if group is None:  # equal resources in distinct objects share one entry, as in the SDK
                group = next((g for g in merged if g[0] == resource), None)
                if group is None:
                    group = (resource, {})
                    merged.append(group)
                by_id[id(resource)] = group
            group[1].setdefault(span.instrumentation_scope or None, []).append(
                _field(b"\x12", self.span(span))
            )
        out = []
        for resource, scopes in merged:
            body = [_field(b"\x0a", self.attributes(b"\x0a", resource.attributes))]
            for scope, encoded in scopes.items():
                scope_spans = [_field(b"\x0a", self._scope(scope)), *encoded]
                if scope is not None and scope.schema_url:
                    scope_spans.append(_text(b"\x1a", scope.schema_url))
                body.append(_field(b"\x12", b"".join(scope_spans)))
            if resource.schema_url:
                body.append(_text(b"\x1a", resource.schema_url))
            out.append(_field(b"\x0a", b"".join(body)))
        return b"".join(out)

    def _scope(self, scope: InstrumentationScope | None) -> bytes:
        if scope is None:
            return b""
        return (
            (_text(b"\x0a", scope.name) if scope.name else b"")
            + (_text(b"\x12", scope.version) if scope.version else b"")
            + self.attributes(b"\x1a", scope.attributes)
        )


def _flags(parent: SpanContext | None) -> int:
    """As the SDK sets a span's (or link's) ``flags``: whether its parent is remote, known to be known."""
    return _REMOTE_KNOWN | (_REMOTE if parent is not None and parent.is_remote else 0)


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """``spans`` as a serialized OTLP ``ExportTraceServiceRequest`` (a fresh encoder: no shared cache)."""
    return _Encoder().request(spans)


# --- transport ------------------------------------------------------------------------------------
DEFAULT_ENDPOINT = "http://localhost:4318"
try:
    _VERSION = version("flow-orchestrator")
except PackageNotFoundError:  # running from a source tree
    _VERSION = "dev"
USER_AGENT = f"OTel-OTLP-Exporter-Python-FlowOrchestrator/{_VERSION}"
DEFAULT_TIMEOUT = 10.0  # seconds
_RETRYABLE = frozenset({429, 502, 503, 504})
_MAX_RETRIES = 6
_JITTER = 0.2


def _setting(name: str) -> str | None:
    """``OTEL_EXPORTER_OTLP_TRACES_<name>``, else ``OTEL_EXPORTER_OTLP_<name>`` (None when neither)."""
    return os.environ.get(f"OTEL_EXPORTER_OTLP_TRACES_{name}") or os.environ.get(f"OTEL_EXPORTER_OTLP_{name}")


def _endpoint() -> str:
    if traces := os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return traces  # used as given, as the specification says
    base = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or DEFAULT_ENDPOINT
    return f"{base.removesuffix('/')}/v1/traces"


def _timeout() -> float:
    raw = _setting("TIMEOUT")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        log.warning("OTLP timeout %r is not a positive number of seconds: using %s", raw, DEFAULT_TIMEOUT)
        return DEFAULT_TIMEOUT
    if value >= 1000:
        log.warning(
            "OTLP timeout %r is read in seconds, as the Python SDK reads it (the specification says "
            "milliseconds): an export may wait %.0f minutes",
            raw,
            value / 60,
        )
    return value


def _compression() -> str:
    value = (_setting("COMPRESSION") or "none").strip().lower()
    if value not in ("none", "gzip", "deflate"):
        log.warning(
            "OTLP compression %r is not supported (gzip, deflate or none): sending uncompressed", value
        )
        return "none"
    return value


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), None when unusable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, with no zone said
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - time.time()
    return max(seconds, 0.0) if math.isfinite(seconds) else None


class OTLPSpanExporter(SpanExporter):
    """Spans over OTLP/HTTP with protobuf bodies (see the module docstring); arguments left None come
    from the ``OTEL_EXPORTER_OTLP_*`` variables."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        compression: str | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.endpoint = endpoint or _endpoint()
        self.timeout = timeout if timeout is not None else _timeout()
        self.compression = compression or _compression()
        configured = (
            headers if headers is not None else parse_env_headers(_setting("HEADERS") or "", liberal=True)
        )
        self._headers = {**configured, "Content-Type": "application/x-protobuf", "User-Agent": USER_AGENT}
        if self.compression != "none":
            self._headers["Content-Encoding"] = self.compression
        self._session = session or requests.Session()
        # Given with each request, not set on the session: requests lets REQUESTS_CA_BUNDLE override a
        # session's verify, and the collector's CA must win.
        self._verify: str | bool = _setting("CERTIFICATE") or True
        client_certificate, client_key = _setting("CLIENT_CERTIFICATE"), _setting("CLIENT_KEY")
        self._cert: str | tuple[str, str] | None = client_certificate
        if client_certificate and client_key:
            self._cert = (client_certificate, client_key)
        self._encoder = _Encoder()
        self._stopped = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if self._stopped.is_set():
            log.warning("OTLP export after shutdown: %d spans dropped", len(spans))
            return SpanExportResult.FAILURE
        try:
            body = self._encoder.request(spans)
        except Exception:  # a span no encoder could take: the batch is lost, never the worker
            log.exception("OTLP export: could not encode %d spans", len(spans))
            return SpanExportResult.FAILURE
        if self.compression == "gzip":
            body = gzip.compress(body, compresslevel=6)
        elif self.compression == "deflate":
            body = zlib.compress(body)
        return self._send(body, len(spans))

    def _post(self, body: bytes, deadline: float) -> requests.Response:
        return self._session.post(
            self.endpoint,
            data=body,
            headers=self._headers,
            timeout=max(deadline - time.monotonic(), 0.001),
            verify=self._verify,
            cert=self._cert,
            allow_redirects=False,  # a redirect must not carry the headers (API keys) to another host
        )

    def _send(self, body: bytes, count: int) -> SpanExportResult:
        deadline = time.monotonic() + self.timeout
        for retry in range(_MAX_RETRIES):
            wait: float | None = None
            try:
                try:
                    reply = self._post(body, deadline)
                except requests.ConnectionError:
                    if retry:
                        raise
                    reply = self._post(body, deadline)  # at once: a pooled connection may have gone stale
            except requests.ConnectionError as exc:
                problem = f"connection failed: {exc}"
            except Exception as exc:  # a timeout, a header value HTTP cannot carry...: not for retrying
                log.error("OTLP export of %d spans to %s failed: %r", count, self.endpoint, exc)
                return SpanExportResult.FAILURE
            else:
                if 200 <= reply.status_code < 300:
                    return SpanExportResult.SUCCESS
                problem = f"HTTP {reply.status_code} {reply.reason}"
                if reply.status_code not in _RETRYABLE:
                    log.error(
                        "OTLP export of %d spans to %s refused (%s): %s",
                        count,
                        self.endpoint,
                        problem,
                        reply.content[:200].decode(errors="replace"),
                    )
                    return SpanExportResult.FAILURE
                wait = retry_after(reply.headers.get("Retry-After"))
            if wait is None:
                wait = 2**retry * random.uniform(1 - _JITTER, 1 + _JITTER)
            if wait > deadline - time.monotonic() or retry + 1 == _MAX_RETRIES:
                log.error("OTLP export of %d spans to %s gave up: %s", count, self.endpoint, problem)
                return SpanExportResult.FAILURE
            log.warning("OTLP export to %s: %s; retrying in %.1f s", self.endpoint, problem, wait)
            if self._stopped.wait(wait):
                break
        return SpanExportResult.FAILURE

    def shutdown(self) -> None:
        self._stopped.set()
        self._session.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # nothing is held here: the span processor batches
