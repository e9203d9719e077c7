"""Span export from a helper process (runtime/_span_export.py): what the worker flattens is what the
exporter sends, a flush waits for the export, a child that dies is replaced, and stopping exports
what is left. Against a real child process and an OTLP/HTTP receiver that decodes every request."""

from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from flow_orchestrator.runtime._span_export import ExportProcessSpanProcessor, flatten, rebuild
from tests._otlp import Receiver

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C


def _finished_span() -> ReadableSpan:
    """A span with every part an exporter sends: attributes of each type, an event, a link, an error."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    parent = SpanContext(TRACE_ID, 0xB7AD6B7169203331, True, TraceFlags(1), TraceState([("vendor", "x1")]))
    linked = SpanContext(0x1234, 0x5678, True, TraceFlags(1))
    tracer = provider.get_tracer("tests.scope", "1.2.3")
    span = tracer.start_span(
        "charge card",
        context=trace.set_span_in_context(trace.NonRecordingSpan(parent)),
        kind=SpanKind.CLIENT,
        attributes={"s": "x", "i": 7, "f": 0.5, "b": True, "list": ("a", "b")},
        links=[Link(linked, {"why": "batch"})],
    )
    span.add_event("retrying", {"attempt": 2})
    span.set_status(Status(StatusCode.ERROR, "card declined"))
    span.end()
    (finished,) = exporter.get_finished_spans()
    provider.shutdown()
    return finished


def test_a_flattened_span_rebuilds_to_the_same_span() -> None:
    span = _finished_span()
    resource = Resource({"service.name": "w"})
    again = rebuild(msgpack.unpackb(msgpack.packb(flatten(span))), resource)  # as it crosses the pipe

    def parts(s: ReadableSpan) -> tuple[object, ...]:
        return (
            s.name,
            s.context,
            (s.parent.trace_id, s.parent.span_id, s.parent.is_remote) if s.parent else None,
            s.kind,
            s.start_time,
            s.end_time,
            {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in (s.attributes or {}).items()},
            [(e.name, e.timestamp, dict(e.attributes or {})) for e in s.events],
            [(link.context, dict(link.attributes or {})) for link in s.links],
            (s.status.status_code, s.status.description),
            s.instrumentation_scope,
        )

    assert parts(again) == parts(span)
    assert again.resource is resource
    assert again.context is not None
    assert again.context.trace_state.get("vendor") == "x1"


def _exporting_provider(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> tuple[TracerProvider, ExportProcessSpanProcessor]:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")  # nothing leaves unless flushed or stopped
    resource = Resource({"service.name": "export-test", "process.pid": os.getpid()})
    processor = ExportProcessSpanProcessor(["otlp"], resource)
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(processor)
    return provider, processor


def test_spans_reach_the_receiver_through_the_child(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, processor = _exporting_provider(receiver, monkeypatch)
    try:
        tracer = provider.get_tracer("tests.export")
        for i in range(3):
            with tracer.start_as_current_span(f"step {i}", attributes={"i": i}):
                pass
        assert provider.force_flush(30_000)
        with receiver.lock:
            spans = sorted(receiver.spans, key=lambda s: s["name"])
        assert [s["name"] for s in spans] == ["step 0", "step 1", "step 2"]
        assert [s["attributes"]["i"] for s in spans] == [0, 1, 2]
        assert {s["resource"]["service.name"] for s in spans} == {"export-test"}
        assert {s["resource"]["process.pid"] for s in spans} == {os.getpid()}  # the worker's, not the child's
        assert {s["scope"] for s in spans} == {"tests.export"}
        assert processor.child_pid not in (None, os.getpid())
    finally:
        provider.shutdown()
    assert processor.child_pid is None


def test_a_child_that_dies_is_replaced(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    provider, processor = _exporting_provider(receiver, monkeypatch)
    try:
        tracer = provider.get_tracer("tests.export")
        assert provider.force_flush(30_000)
        pid = processor.child_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # the child we started, by its PID
        deadline = time.monotonic() + 10
        while processor.child_pid == pid and time.monotonic() < deadline:
            time.sleep(0.01)  # until it is gone: spans handed to a dying child die with it
        with tracer.start_as_current_span("after the crash"):
            pass
        assert provider.force_flush(30_000)
        with receiver.lock:
            names = [s["name"] for s in receiver.spans]
        assert names == ["after the crash"]
        assert processor.child_pid not in (None, pid)
    finally:
        provider.shutdown()


def test_stopping_exports_what_is_left(receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    provider, _ = _exporting_provider(receiver, monkeypatch)
    tracer = provider.get_tracer("tests.export")
    for i in range(700):  # more than one batch (512)
        tracer.start_span(f"s{i}").end()
    provider.shutdown()
    with receiver.lock:
        assert len(receiver.spans) == 700
