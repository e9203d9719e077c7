"""The worker's OTLP/HTTP span exporter: its encoder against the SDK's, its transport against a real
HTTP receiver on loopback (scripted refusals, compression, headers from the environment)."""

from __future__ import annotations

import logging
import math
import socket
import time
from email.utils import formatdate
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from flow_orchestrator.runtime._otlp import OTLPSpanExporter, _Encoder, encode_spans, retry_after
from flow_orchestrator.runtime._telemetry import TelemetryConfigError, span_exporter
from flow_orchestrator.runtime._tracing import RunTrace, start_light_span
from tests._otlp import Receiver

# --- the encoder: the same request as the SDK's, for spans of every shape ------------------------

_scalars = st.one_of(
    st.text(max_size=8),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
)
_values = st.one_of(
    _scalars,
    st.lists(st.text(max_size=4), max_size=3),
    st.lists(st.integers(-5, 2**40), max_size=3),
    st.lists(st.booleans(), max_size=3),
    st.lists(st.floats(allow_nan=False), max_size=3),
)
_attributes = st.dictionaries(st.sampled_from(["a", "b", "workflow", "node", "n.x"]), _values, max_size=4)
_times = st.integers(1, 2**62)
_state = st.lists(
    st.tuples(
        st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True), st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True)
    ),
    max_size=2,
    unique_by=lambda pair: pair[0],
)
_spans = st.fixed_dictionaries(
    {
        "name": st.text(max_size=10),
        "kind": st.sampled_from(list(SpanKind)),
        "attributes": _attributes,
        "events": st.lists(st.tuples(st.text(max_size=5), _attributes, _times), max_size=2),
        "links": st.lists(st.tuples(st.booleans(), _attributes), max_size=2),
        "status": st.sampled_from(["unset", "ok", "error", "error with text"]),
        "parent": st.sampled_from(["none", "local", "remote"]),
        "state": _state,
        "provider": st.integers(0, 2),  # 0 and 2 have equal resources in distinct objects
        "scope": st.integers(0, 2),
        "start": _times,
        "length": st.integers(0, 10**9),
    }
)


def _providers() -> list[TracerProvider]:
    equal = {"service.name": "a", "process.pid": 7}
    return [
        TracerProvider(resource=Resource(equal)),
        TracerProvider(resource=Resource({"service.name": "b", "ratio": 0.5}, schema_url="https://x/1")),
        TracerProvider(resource=Resource(equal)),
    ]


_SCOPES: list[dict[str, Any]] = [
    {"instrumenting_module_name": "plain"},
    {
        "instrumenting_module_name": "versioned",
        "instrumenting_library_version": "1.2",
        "schema_url": "https://s",
    },
    {"instrumenting_module_name": "attributed", "attributes": {"lib": "x", "n": 3}},
]


def _build(providers: list[TracerProvider], shape: dict[str, Any]) -> ReadableSpan:
    tracer = providers[shape["provider"]].get_tracer(**_SCOPES[shape["scope"]])
    state = TraceState(shape["state"])
    context = trace_api.set_span_in_context(
        trace_api.NonRecordingSpan(
            SpanContext(
                0x1234,
                0x99,
                is_remote=shape["parent"] == "remote",
                trace_flags=TraceFlags(1),
                trace_state=state,
            )
        )
    )
    links = [
        Link(SpanContext(0xABC + i, 0xDEF + i, is_remote=remote), attributes)
        for i, (remote, attributes) in enumerate(shape["links"])
    ]
    span = tracer.start_span(
        shape["name"],
        context=context if shape["parent"] != "none" else None,
        kind=shape["kind"],
        attributes=shape["attributes"],
        links=links,
        start_time=shape["start"],
    )
    for name, attributes, timestamp in shape["events"]:
        span.add_event(name, attributes, timestamp)
    status = shape["status"]
    if status != "unset":
        code = StatusCode.OK if status == "ok" else StatusCode.ERROR
        span.set_status(Status(code, "it broke" if status == "error with text" else None))
    span.end(end_time=shape["start"] + shape["length"])
    assert isinstance(span, ReadableSpan)
    return span


def _decoded(body: bytes) -> ExportTraceServiceRequest:
    return ExportTraceServiceRequest.FromString(body)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_spans, min_size=1, max_size=6))
def test_the_encoder_writes_what_the_sdk_encoder_writes(shapes: list[dict[str, Any]]) -> None:
    providers = _providers()
    batch = [_build(providers, shape) for shape in shapes]
    assert _decoded(encode_spans(batch)) == sdk_encode_spans(batch)


def _attempt_span(
    provider: TracerProvider, attributes: dict[Any, Any], events: dict[str, dict[str, Any]] | None = None
) -> ReadableSpan:
    tracer = provider.get_tracer("flow_orchestrator")
    parent = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    )
    run = RunTrace(parent, trace_api.get_current_span(parent).get_span_context())
    scope = InstrumentationScope("flow_orchestrator", "1.0")
    span = start_light_span(tracer, scope, "order.charge", run, attributes)  # type: ignore[arg-type]
    span.set_attribute("outcome", "completed")
    for name, event_attributes in (events or {}).items():
        span.add_event(name, event_attributes)
    span.end()
    assert isinstance(span, ReadableSpan)
    return span


def test_attempt_spans_and_repeated_attributes_encode_as_the_sdk_does() -> None:
    """The encoder keeps encoded attribute pairs for reuse: True, 1 and 1.0 must stay three values."""
    provider = TracerProvider()
    batch = [_attempt_span(provider, {"workflow": "order", "v": value}) for value in (True, 1, 1.0, 1, True)]
    exporter = OTLPSpanExporter("http://127.0.0.1:9")
    for _ in range(2):  # the second pass reads the kept pairs
        assert _decoded(exporter._encoder.request(batch)) == sdk_encode_spans(batch)
    types = [
        span.attributes[1].value.WhichOneof("value")
        for span in _decoded(encode_spans(batch)).resource_spans[0].scope_spans[0].spans
    ]
    assert types == ["bool_value", "int_value", "double_value", "int_value", "bool_value"]


def test_a_value_no_encoder_can_take_is_left_out_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    provider = TracerProvider()
    span = _attempt_span(provider, {"workflow": "order", "huge": 2**70, 7: "a key that is no string"})
    with caplog.at_level(logging.ERROR, logger="flow_orchestrator.telemetry"):
        decoded = _decoded(encode_spans([span]))
    assert decoded == sdk_encode_spans([span])  # the SDK leaves it out too
    keys = [kv.key for kv in decoded.resource_spans[0].scope_spans[0].spans[0].attributes]
    assert "huge" not in keys
    assert "workflow" in keys
    assert "'huge' left out" in caplog.text
    assert "7 left out" in caplog.text


def test_any_failure_to_encode_a_value_loses_that_pair_only() -> None:
    """A user's attribute may be anything: a list that holds itself fails by recursion, in the SDK too."""
    provider = TracerProvider()
    loop: list[Any] = []
    loop.append(loop)
    events = {"checked": {"loop": loop, "ok": "yes"}}
    span = _attempt_span(provider, {"workflow": "order", b"raw": 1, None: 2}, events)
    decoded = _decoded(encode_spans([span]))
    assert decoded == sdk_encode_spans([span])
    [event] = decoded.resource_spans[0].scope_spans[0].spans[0].events
    assert [kv.key for kv in event.attributes] == ["ok"]


def test_kept_encodings_keep_the_sign_of_zero_and_not_long_text() -> None:
    provider = TracerProvider()
    long_text = "x" * 8_000
    batch = [_attempt_span(provider, {"v": zero, "message": long_text}) for zero in (0.0, -0.0)]
    encoder = _Encoder()
    decoded = _decoded(encoder.request(batch))
    spans = decoded.resource_spans[0].scope_spans[0].spans
    assert [math.copysign(1.0, span.attributes[0].value.double_value) for span in spans] == [1.0, -1.0]
    assert not any(value == long_text for _, _, value in encoder._pairs)


# --- the transport ---------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_otlp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "ENDPOINT",
        "HEADERS",
        "TIMEOUT",
        "COMPRESSION",
        "CERTIFICATE",
        "CLIENT_CERTIFICATE",
        "CLIENT_KEY",
    ):
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_{name}", raising=False)
        monkeypatch.delenv(f"OTEL_EXPORTER_OTLP_TRACES_{name}", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_PROTOCOL", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
    monkeypatch.delenv("FLOW_OTLP_EXPORTER", raising=False)


def _one_span() -> list[ReadableSpan]:
    return [_attempt_span(TracerProvider(), {"workflow": "order", "run_id": "r1"})]


@pytest.mark.parametrize("compression", ["gzip", "deflate", "none"])
def test_the_environment_configures_the_endpoint_headers_and_compression(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch, compression: str
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"{receiver.endpoint}/")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "api-key=s%20cret,tenant=t1")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", compression)
    exporter = span_exporter("otlp")
    assert isinstance(exporter, OTLPSpanExporter)
    spans = _one_span()
    assert exporter.export(spans) is SpanExportResult.SUCCESS
    [(path, headers, request)] = receiver.requests
    assert path == "/v1/traces"
    assert headers["api-key"] == "s cret"
    assert headers["tenant"] == "t1"
    assert headers["content-type"] == "application/x-protobuf"
    assert headers["user-agent"].startswith("OTel-OTLP-Exporter-Python-FlowOrchestrator/")
    assert headers.get("content-encoding") == (None if compression == "none" else compression)
    assert request == sdk_encode_spans(spans)
    assert [span["name"] for span in receiver.spans] == ["order.charge"]


def test_a_traces_endpoint_is_used_as_given(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")  # unused: the next one wins
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"{receiver.endpoint}/custom/path")
    assert OTLPSpanExporter().export(_one_span()) is SpanExportResult.FAILURE  # the receiver says 404
    assert [path for path, _, _ in receiver.requests] == ["/custom/path"]


@pytest.mark.parametrize(
    ("variable", "value", "module"),
    [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
        ("FLOW_OTLP_EXPORTER", "sdk", "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
    ],
)
def test_grpc_and_a_fallback_use_the_sdk_exporter(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, module: str
) -> None:
    monkeypatch.setenv(variable, value)
    exporter = span_exporter("otlp")
    assert type(exporter).__module__ == module
    exporter.shutdown()
    monkeypatch.setenv("FLOW_OTLP_EXPORTER", "fast")
    with pytest.raises(TelemetryConfigError, match="FLOW_OTLP_EXPORTER"):
        span_exporter("otlp")


def test_a_busy_receiver_is_retried_after_the_time_it_asks_for(receiver: Receiver) -> None:
    receiver.refusals = [(503, {"Retry-After": "0"}), (429, {"Retry-After": formatdate(usegmt=True)})]
    assert OTLPSpanExporter(f"{receiver.endpoint}/v1/traces").export(_one_span()) is SpanExportResult.SUCCESS
    assert [request is not None for _, _, request in receiver.requests] == [False, False, True]
    assert len(receiver.spans) == 1


def test_a_refusal_that_retrying_cannot_mend_drops_the_batch_at_once(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.refusals = [(400, {})]
    with caplog.at_level(logging.ERROR, logger="flow_orchestrator.telemetry"):
        result = OTLPSpanExporter(f"{receiver.endpoint}/v1/traces").export(_one_span())
    assert result is SpanExportResult.FAILURE
    assert len(receiver.requests) == 1
    assert "refused (HTTP 400" in caplog.text


def test_a_redirect_is_not_followed(receiver: Receiver) -> None:
    """Following it would hand the configured headers (API keys) to wherever it points."""
    receiver.refusals = [(307, {"Location": f"{receiver.endpoint}/v1/traces"})]
    exporter = OTLPSpanExporter(f"{receiver.endpoint}/v1/traces", headers={"api-key": "secret"})
    assert exporter.export(_one_span()) is SpanExportResult.FAILURE
    assert len(receiver.requests) == 1


def test_a_header_value_http_cannot_carry_fails_the_export_instead_of_raising(
    receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = OTLPSpanExporter(f"{receiver.endpoint}/v1/traces", headers={"x-tenant": "\u20ac"})
    with caplog.at_level(logging.ERROR, logger="flow_orchestrator.telemetry"):
        assert exporter.export(_one_span()) is SpanExportResult.FAILURE
    assert "UnicodeEncodeError" in caplog.text


def test_a_timeout_that_looks_like_milliseconds_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "10000")
    with caplog.at_level(logging.WARNING, logger="flow_orchestrator.telemetry"):
        assert OTLPSpanExporter("http://127.0.0.1:9").timeout == 10_000
    assert "read in seconds" in caplog.text


def test_retries_stop_at_the_export_timeout(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    receiver.refusals = [(503, {"Retry-After": "0.2"})] * 50
    exporter = OTLPSpanExporter(f"{receiver.endpoint}/v1/traces", timeout=0.5)
    with caplog.at_level(logging.ERROR, logger="flow_orchestrator.telemetry"):
        assert exporter.export(_one_span()) is SpanExportResult.FAILURE
    assert 2 <= len(receiver.requests) <= 4
    assert "gave up: HTTP 503" in caplog.text


def test_an_unreachable_receiver_fails_the_export_without_hanging() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exporter = OTLPSpanExporter(f"http://127.0.0.1:{port}/v1/traces", timeout=0.3)
    assert exporter.export(_one_span()) is SpanExportResult.FAILURE


def test_nothing_is_sent_after_shutdown(receiver: Receiver) -> None:
    exporter = OTLPSpanExporter(f"{receiver.endpoint}/v1/traces")
    exporter.shutdown()
    assert exporter.export(_one_span()) is SpanExportResult.FAILURE
    assert receiver.requests == []


def test_retry_after_reads_seconds_and_dates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "America/New_York")  # a date without a zone is UTC, never local time
    time.tzset()
    try:
        assert 25 <= (retry_after(formatdate(time.time() + 30)) or 0) <= 31
    finally:
        monkeypatch.undo()
        time.tzset()
    assert retry_after("2") == 2.0
    assert retry_after("-3") == 0.0
    assert retry_after(formatdate(0, usegmt=True)) == 0.0  # a date in the past: now
    assert retry_after("soon") is None
    assert retry_after(None) is None
