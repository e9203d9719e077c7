"""One trace per run (DESIGN.md invariant 7): a root span from trigger to finish, one child span per node
attempt (retries as siblings), linked across processes through NATS headers, and the trigger
publisher's span as the root's parent when it sent one. In-process with an in-memory exporter, and on
the wire: two worker processes exporting OTLP/HTTP to a receiver run by the test."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    NoOpTracerProvider,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    get_current_span,
    set_span_in_context,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from flow_orchestrator import NodeContext, Workflow
from flow_orchestrator.bus import encode
from flow_orchestrator.bus.types import TriggerInput
from flow_orchestrator.runtime import _cli, _commands
from flow_orchestrator.runtime._telemetry import (
    RunFieldsFormatter,
    TelemetryConfigError,
    TraceContextFilter,
    configure_telemetry,
)
from flow_orchestrator.runtime._tracing import (
    TRACESTATE_KEY,
    Decisions,
    TracingInterceptor,
    extract,
    promise_root,
)
from flow_orchestrator.testing import LocalEnvironment, eventually
from tests import tracing_workflows, workflows
from tests._otlp import Receiver

NODES = ("fetch", "enrich", "store")


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _publisher_context() -> tuple[str, str, str]:
    """A trigger publisher's (trace id, span id, traceparent header)."""
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


async def _publish_trigger(
    env: LocalEnvironment, workflow: str, payload: Any, traceparent: str, tracestate: str | None = None
) -> str:
    run_id = f"r{uuid.uuid4().hex[:12]}"
    headers = {"Nats-Msg-Id": run_id, "traceparent": traceparent}
    if tracestate is not None:
        headers["tracestate"] = tracestate
    await env.client.bus.js.publish(env.names.trigger(workflow), encode(payload), headers=headers)
    return run_id


def _trace_of(exporter: InMemorySpanExporter, run_id: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if (s.attributes or {}).get("run_id") == run_id]


async def _finished_trace(exporter: InMemorySpanExporter, run_id: str, workflow: str) -> list[ReadableSpan]:
    """The run's spans, once its root (emitted last, by the worker that ends the run) is exported."""

    def root_exported() -> list[ReadableSpan] | None:
        found = _trace_of(exporter, run_id)
        return found if any(s.name == f"run {workflow}" for s in found) else None

    return await eventually(root_exported, message=f"root span of run {run_id}")


def _check_retry_trace(found: Sequence[ReadableSpan], run_id: str) -> ReadableSpan:
    """The shape of a ``traced`` run: returns its root after checking every child against it."""
    by_name = collections.defaultdict(list)
    for span in found:
        by_name[span.name].append(span)
    (root,) = by_name.pop("run traced")
    assert root.context is not None
    assert root.attributes is not None
    assert root.attributes["status"] == "completed"
    assert root.status.status_code is StatusCode.OK
    (started,) = by_name.pop("run traced started")
    assert started.kind is SpanKind.CONSUMER
    assert started.attributes is not None
    assert started.attributes["messaging.system"] == "nats"
    assert str(started.attributes["messaging.destination.name"]).endswith(".trigger.traced")
    (scheduled,) = by_name.pop("traced.enrich retry scheduled")
    assert scheduled.attributes is not None
    assert (scheduled.attributes["attempt"], scheduled.attributes["next_attempt"]) == (1, 2)
    attempts = {name: sorted(by_name.pop(f"traced.{name}"), key=_attempt) for name in NODES}
    assert not by_name, f"unexpected spans: {list(by_name)}"
    assert [_attempt(s) for s in attempts["enrich"]] == [1, 2]
    assert [len(attempts["fetch"]), len(attempts["store"])] == [1, 1]
    failed, retried = attempts["enrich"]
    assert failed.status.status_code is StatusCode.ERROR
    assert [e.name for e in failed.events] == ["exception"]
    assert "flaky on its first attempt" in str(failed.events[0].attributes)
    assert retried.status.status_code is StatusCode.UNSET
    for attempt in (s for spans in attempts.values() for s in spans):  # semantic conventions: messaging
        assert attempt.kind is SpanKind.CONSUMER
        assert attempt.attributes is not None
        assert attempt.attributes["messaging.system"] == "nats"
        assert attempt.attributes["messaging.operation.type"] == "process"
        assert attempt.attributes["messaging.operation.name"] == "process"
    # the message each attempt processed: the run's trigger, an upstream's completion, a retry
    assert str(attempts["fetch"][0].attributes["messaging.destination.name"]).endswith("._run.started")  # type: ignore[index]
    assert str(attempts["store"][0].attributes["messaging.destination.name"]).endswith(".enrich.completed")  # type: ignore[index]
    assert str(retried.attributes["messaging.destination.name"]).endswith(".enrich.retry")  # type: ignore[index]
    assert started.start_time is not None
    assert root.start_time is not None
    assert root.end_time is not None
    for span in [started, scheduled, *(s for spans in attempts.values() for s in spans)]:
        assert span.context is not None
        assert span.parent is not None
        assert span.context.trace_id == root.context.trace_id, span.name
        assert span.parent.span_id == root.context.span_id, span.name  # siblings under the root
        assert span.attributes is not None
        assert span.attributes["run_id"] == run_id
    assert root.start_time <= attempts["fetch"][0].start_time  # type: ignore[operator]
    assert root.end_time >= attempts["store"][0].end_time  # type: ignore[operator]
    return root


def _attempt(span: ReadableSpan) -> int:
    return int((span.attributes or {})["attempt"])  # type: ignore[arg-type]


async def test_a_run_is_one_trace_with_a_span_per_attempt(env_factory: Any, spans: Any) -> None:
    provider, exporter = spans
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf], interceptors=[TracingInterceptor(provider)]
    )
    handle = await env.client.start("traced", {})
    assert await handle.result() == {"stored": 2}
    root = _check_retry_trace(await _finished_trace(exporter, handle.run_id, "traced"), handle.run_id)
    assert root.parent is None  # no publisher context: the run's root starts the trace


async def test_the_trigger_publishers_span_is_the_roots_parent(env_factory: Any, spans: Any) -> None:
    provider, exporter = spans
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf], interceptors=[TracingInterceptor(provider)]
    )
    trace_id, span_id, traceparent = _publisher_context()
    run_id = await _publish_trigger(env, "traced", {}, traceparent)
    await env.client.get_handle(run_id, "traced").result()
    root = _check_retry_trace(await _finished_trace(exporter, run_id, "traced"), run_id)
    assert root.context is not None
    assert root.parent is not None
    assert f"{root.context.trace_id:032x}" == trace_id
    assert f"{root.parent.span_id:016x}" == span_id
    assert root.parent.span_id != root.context.span_id


async def test_a_run_started_inside_a_span_joins_its_trace(env_factory: Any, spans: Any) -> None:
    provider, exporter = spans
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf], interceptors=[TracingInterceptor(provider)]
    )
    with provider.get_tracer("tests.checkout").start_as_current_span("checkout") as caller:
        handle = await env.client.start("traced", {})
    assert await handle.result() == {"stored": 2}
    root = _check_retry_trace(await _finished_trace(exporter, handle.run_id, "traced"), handle.run_id)
    assert root.context is not None
    assert root.parent is not None
    assert root.context.trace_id == caller.get_span_context().trace_id
    assert root.parent.span_id == caller.get_span_context().span_id


async def test_steps_carry_the_traceparent_and_only_run_events_our_tracestate(
    env_factory: Any, spans: Any
) -> None:
    provider, exporter = spans
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf], interceptors=[TracingInterceptor(provider)]
    )
    _, _, traceparent = _publisher_context()
    run_id = await _publish_trigger(env, "traced", {}, traceparent)
    await env.client.get_handle(run_id, "traced").result()
    await _finished_trace(exporter, run_id, "traced")
    events = await env.client.journal(run_id, "traced")
    parents = {event["headers"].get("traceparent") for event in events}
    assert len(parents) == 1  # every event of the run carries the run's one traceparent
    assert None not in parents
    for event in events:
        state = event["headers"].get("tracestate", "")
        assert ("flow-orchestrator=" in state) == (event["node"] == "_run"), event


async def test_a_failed_run_records_its_error_on_the_root(env_factory: Any, spans: Any) -> None:
    provider, exporter = spans
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.doomed], interceptors=[TracingInterceptor(provider)]
    )
    handle = await env.client.start("doomed", {})
    with pytest.raises(Exception, match="explode cannot succeed"):
        await handle.result()
    found = {s.name: s for s in await _finished_trace(exporter, handle.run_id, "doomed")}
    root, attempt = found["run doomed"], found["doomed.explode"]
    assert root.attributes is not None
    assert root.attributes["status"] == "failed"
    assert root.attributes["node"] == "explode"
    assert "explode cannot succeed" in str(root.attributes["error"])
    assert root.status.status_code is StatusCode.ERROR
    assert [e.name for e in root.events] == ["exception"]
    assert attempt.status.status_code is StatusCode.ERROR
    assert attempt.parent is not None
    assert root.context is not None
    assert attempt.parent.span_id == root.context.span_id


async def test_a_rejected_trigger_is_a_failed_root_under_its_publisher(env_factory: Any, spans: Any) -> None:
    provider, exporter = spans
    env: LocalEnvironment = await env_factory(
        [workflows.diamond], interceptors=[TracingInterceptor(provider)]
    )
    trace_id, span_id, traceparent = _publisher_context()
    run_id = await _publish_trigger(env, "diamond", {"order_id": "o-1", "amount": -1}, traceparent)
    (root,) = await _finished_trace(exporter, run_id, "diamond")
    assert root.attributes is not None
    assert root.attributes["status"] == "rejected"
    assert root.attributes["error.type"] == "InvalidPayload"
    assert root.status.status_code is StatusCode.ERROR
    assert root.context is not None
    assert root.parent is not None
    assert (f"{root.context.trace_id:032x}", f"{root.parent.span_id:016x}") == (trace_id, span_id)


@pytest.mark.parametrize("provider", [None, NoOpTracerProvider()], ids=["global-unset", "no-op"])
async def test_without_a_tracer_provider_runs_carry_no_trace(env_factory: Any, provider: Any) -> None:
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf], interceptors=[TracingInterceptor(provider)]
    )
    handle = await env.client.start("traced", {})
    assert await handle.result() == {"stored": 2}
    record = await env.client._run_record(handle.run_id)
    assert record is not None
    assert "trace" not in record


async def test_log_records_about_a_run_carry_its_trace_id(env_factory: Any, spans: Any) -> None:
    provider, exporter = spans
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(TraceContextFilter())
    node_log = logging.getLogger("flow_orchestrator.node")
    node_log.addHandler(handler)
    node_log.setLevel(logging.INFO)
    wf = tracing_workflows.logged
    try:
        env: LocalEnvironment = await env_factory([wf], interceptors=[TracingInterceptor(provider)])
        handle = await env.client.start("logged", {})
        await handle.result()
        found = await _finished_trace(exporter, handle.run_id, "logged")
    finally:
        node_log.removeHandler(handler)
        node_log.setLevel(logging.NOTSET)
    (record,) = [r for r in records if getattr(r, "run_id", None) == handle.run_id]
    (attempt,) = [s for s in found if s.name == "logged.say"]
    assert attempt.context is not None
    assert record.trace_id == f"{attempt.context.trace_id:032x}"  # type: ignore[attr-defined]
    assert record.span_id == f"{attempt.context.span_id:016x}"  # type: ignore[attr-defined]
    text = RunFieldsFormatter("%(message)s").format(record)
    assert text.startswith("hello [workflow=logged run_id=")
    assert f"node=say attempt=1 trace_id={record.trace_id}]" in text  # type: ignore[attr-defined]


async def test_an_action_annotates_its_attempt_span_and_nests_its_own_spans(
    env_factory: Any, spans: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider, exporter = spans
    monkeypatch.setattr(tracing_workflows, "TRACER", provider.get_tracer("tests.inventory"))
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.instrumented], interceptors=[TracingInterceptor(provider)]
    )
    handle = await env.client.start("instrumented", {"order": "o-7"})
    assert await handle.result() == {"ok": True}
    await _finished_trace(exporter, handle.run_id, "instrumented")
    (attempt,) = [s for s in _trace_of(exporter, handle.run_id) if s.name == "instrumented.lookup"]
    (query,) = [s for s in exporter.get_finished_spans() if s.name == "inventory query"]
    assert attempt.context is not None
    assert query.parent is not None
    assert (query.parent.trace_id, query.parent.span_id) == (
        attempt.context.trace_id,
        attempt.context.span_id,
    )
    assert attempt.attributes is not None
    assert attempt.attributes["order.id"] == "o-7"
    assert "order.bad" not in attempt.attributes
    assert attempt.attributes["outcome"] == "completed"
    assert [(e.name, dict(e.attributes or {})) for e in attempt.events] == [("cache miss", {"key": "o-7"})]


async def test_a_sampler_that_reads_the_span_is_asked_for_every_span(env_factory: Any) -> None:
    """Only the SDK's samplers (which decide from the parent and trace id) are asked once per run."""
    asked: list[str] = []

    class ByNode(Sampler):
        def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any, **kw: Any) -> Any:
            asked.append(name)
            decision = Decision.DROP if name == "traced.enrich" else Decision.RECORD_AND_SAMPLE
            return SamplingResult(decision, {"sampled.by": "node"})

        def get_description(self) -> str:
            return "ByNode"

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ByNode(), shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf], interceptors=[TracingInterceptor(provider)]
    )
    handle = await env.client.start("traced", {})
    assert await handle.result() == {"stored": 2}
    await _finished_trace(exporter, handle.run_id, "traced")
    attempts = [
        s
        for s in _trace_of(exporter, handle.run_id)
        if s.name.startswith("traced.") and "retry" not in s.name
    ]
    assert sorted(s.name for s in attempts) == ["traced.fetch", "traced.store"]
    assert all((s.attributes or {}).get("sampled.by") == "node" for s in attempts)
    assert asked.count("traced.enrich") == 2  # both attempts were asked, and dropped
    provider.shutdown()


async def test_a_trigger_from_an_unsampled_trace_makes_no_spans(env_factory: Any, spans: Any) -> None:
    """The SDK's default sampler follows the parent: a publisher's trace that is not sampled stays
    so for the whole run (asked once per worker and kind of parent, then remembered)."""
    provider, exporter = spans
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf], interceptors=[TracingInterceptor(provider)]
    )
    trace_id, span_id, _ = _publisher_context()
    unsampled = await _publish_trigger(env, "traced", {}, f"00-{trace_id}-{span_id}-00")
    sampled_trace, _, sampled_parent = _publisher_context()
    sampled = await _publish_trigger(env, "traced", {}, sampled_parent)
    for run_id in (unsampled, sampled):
        assert await env.client.get_handle(run_id, "traced").result() == {"stored": 2}
    found = await _finished_trace(exporter, sampled, "traced")
    assert {f"{s.context.trace_id:032x}" for s in found if s.context} == {sampled_trace}
    assert not _trace_of(exporter, unsampled)
    assert not [
        s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == int(trace_id, 16)
    ]


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "a=1,b=2"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "x" * 600},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", "tracestate": "not valid"},
        {"traceparent": "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01"},
        {"traceparent": " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra"},
        {"traceparent": "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01"},
        {"tracestate": "a=1"},
        {},
    ],
)
def test_the_run_context_is_read_as_the_w3c_propagator_reads_it(headers: dict[str, str]) -> None:
    """Our fast path for the traceparent we write, and the propagator for everything else."""
    expected = get_current_span(TraceContextTextMapPropagator().extract(headers)).get_span_context()
    context, found = extract(headers)
    assert get_current_span(context).get_span_context() == found
    assert (found.trace_id, found.span_id, found.trace_flags, found.is_remote, found.is_valid) == (
        expected.trace_id,
        expected.span_id,
        expected.trace_flags,
        expected.is_remote,
        expected.is_valid,
    )
    assert list(found.trace_state.items()) == list(expected.trace_state.items())


def test_only_answers_that_depend_on_the_kind_of_parent_are_remembered() -> None:
    sampled = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(TraceFlags.SAMPLED))
    unsampled = SpanContext(1, 2, is_remote=True, trace_flags=TraceFlags(TraceFlags.DEFAULT))

    def answers(sampler: Sampler) -> list[Decision | None]:
        decisions = Decisions(sampler)
        return [
            decisions.decision(set_span_in_context(NonRecordingSpan(parent)), parent, "x")
            for parent in (sampled, unsampled, INVALID_SPAN_CONTEXT)
        ]

    keep, drop = Decision.RECORD_AND_SAMPLE, Decision.DROP
    assert answers(ParentBased(ALWAYS_ON)) == [keep, drop, keep]
    assert answers(ParentBased(ALWAYS_OFF, remote_parent_not_sampled=ALWAYS_ON)) == [keep, keep, drop]
    assert answers(ALWAYS_OFF) == [drop, drop, drop]
    # A root's answer from a ratio depends on its trace id: asked for every run.
    assert answers(ParentBased(TraceIdRatioBased(0.5))) == [keep, drop, None]
    assert answers(TraceIdRatioBased(0.5)) == [None, None, None]


class _SlowIds(RandomIdGenerator):
    """An id generator that releases the GIL (os.urandom, a remote id service...)."""

    def generate_span_id(self) -> int:
        time.sleep(0.05)
        return super().generate_span_id()


_late = Workflow("lateids")
_SEEN: dict[str, int] = {}


@_late.node(timeout=0.1)
def reads_its_id_as_it_times_out(ctx: NodeContext) -> None:
    time.sleep(0.09)
    _SEEN[ctx.run_id] = get_current_span().get_span_context().span_id


async def test_a_sync_action_sees_the_span_id_that_is_exported(env_factory: Any) -> None:
    """The action's thread reads its span's id just as the loop ends the span (the action timed
    out): both once made the span's context, each with an id of its own, and the action's logs and
    child spans then named a span that was never exported."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(shutdown_on_exit=False, id_generator=_SlowIds())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    env: LocalEnvironment = await env_factory([_late], interceptors=[TracingInterceptor(provider)])
    handle = await env.client.start("lateids", {})
    with contextlib.suppress(Exception):
        await handle.result()
    await eventually(lambda: handle.run_id in _SEEN)

    def exported() -> list[ReadableSpan]:
        return [s for s in _trace_of(exporter, handle.run_id) if s.name.startswith("lateids.reads")]

    (span, *_) = await eventually(exported)
    assert span.context is not None
    assert _SEEN[handle.run_id] == span.context.span_id
    provider.shutdown()


def test_a_subclass_of_the_sdks_samplers_is_asked_for_every_span() -> None:
    """It may decide by the span's name or attributes, as this one does."""

    class DropHealth(ParentBased):
        def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any, **kw: Any) -> Any:
            if "health" in name:
                return SamplingResult(Decision.DROP)
            return super().should_sample(parent_context, trace_id, name, *args, **kw)

    decisions = Decisions(DropHealth(ALWAYS_ON))
    assert decisions.decision(Context(), INVALID_SPAN_CONTEXT, "run orders") is None
    assert (
        Decisions(type("MyStatic", (StaticSampler,), {})(Decision.RECORD_AND_SAMPLE)).decision(
            Context(), INVALID_SPAN_CONTEXT, "run health"
        )
        is None
    )


def test_a_full_tracestate_makes_room_for_the_runs_entry() -> None:
    """32 entries is the W3C limit: the right-most gives way, as the spec says, and the run keeps
    the entry its root span is emitted from (without it the root never was)."""
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("t")
    assert isinstance(tracer, Tracer)
    _, _, traceparent = _publisher_context()
    full = ",".join(f"k{i}=v{i}" for i in range(32))
    headers = {"traceparent": traceparent, "tracestate": full}
    root = promise_root(tracer, TriggerInput("wf", "r1", {}, headers))
    entries = list(root.trace_state.keys())
    assert entries[0] == TRACESTATE_KEY
    assert len(entries) == 32
    assert "k31" not in entries
    assert "k0" in entries
    assert headers["tracestate"].startswith(f"{TRACESTATE_KEY}=")


async def test_the_first_steps_span_does_not_carry_the_runs_own_entry(env_factory: Any, spans: Any) -> None:
    """The first step consumes the run's own event, whose tracestate has our entry; steps' spans
    (and what their actions propagate) carry only the publisher's entries."""
    provider, exporter = spans
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf], interceptors=[TracingInterceptor(provider)]
    )
    _, _, traceparent = _publisher_context()
    run_id = await _publish_trigger(env, "traced", {}, traceparent, tracestate="vendor=abc")
    assert await env.client.get_handle(run_id, "traced").result() == {"stored": 2}
    found = await _finished_trace(exporter, run_id, "traced")
    attempts = [s for s in found if s.name in ("traced.fetch", "traced.enrich", "traced.store")]
    assert attempts
    for span in attempts:
        assert span.context is not None
        assert list(span.context.trace_state.items()) == [("vendor", "abc")], span.name


# --- configure_telemetry ------------------------------------------------------------------------
def test_telemetry_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    assert configure_telemetry(set_global=False) is None
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert configure_telemetry(set_global=False) is None


def test_telemetry_reads_the_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test,service.instance.id=w-1")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    telemetry = configure_telemetry("orders", set_global=False)
    assert telemetry is not None
    try:
        assert telemetry.meter_provider is None
        assert [type(i).__name__ for i in telemetry.interceptors] == ["TracingInterceptor"]
        assert telemetry.tracer_provider is not None
        attributes = telemetry.tracer_provider.resource.attributes
        assert attributes["service.name"] == "orders"
        assert attributes["service.instance.id"] == "w-1"  # the operator's value wins
        assert attributes["deployment.environment"] == "test"
        assert attributes["process.pid"] == os.getpid()
    finally:
        telemetry.shutdown()
        telemetry.shutdown()  # twice is harmless
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-env")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    telemetry = configure_telemetry("orders", set_global=False)
    assert telemetry is not None
    assert telemetry.tracer_provider is not None
    assert telemetry.tracer_provider.resource.attributes["service.name"] == "from-env"
    telemetry.shutdown()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_EXPORTER", "zipkin"),
        ("OTEL_METRICS_EXPORTER", "statsd"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
    ],
)
def test_unsupported_otel_settings_are_typed_errors(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv(variable, value)
    with pytest.raises(TelemetryConfigError, match=variable):
        configure_telemetry(set_global=False)


# --- on the wire: two worker processes, one OTLP/HTTP receiver -----------------------------------
def _cli_configures_telemetry() -> bool:
    return any("configure_telemetry" in Path(str(m.__file__)).read_text() for m in (_cli, _commands))


@pytest.mark.slow
@pytest.mark.skipif(
    not _cli_configures_telemetry(),
    reason="`flowctl worker` does not call configure_telemetry() yet (runtime/_commands.py worker command)",
)
@pytest.mark.parametrize("span_export", ["thread", "process"])
async def test_two_worker_processes_export_one_trace_per_run(
    env_factory: Any, subprocess_env: dict[str, str], span_export: str
) -> None:
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    prefix = f"o{uuid.uuid4().hex[:8]}"
    child_env = {
        **subprocess_env,
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_SERVICE_NAME": "flow-test-worker",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRICS_EXPORTER": "none",
        "FLOW_SPAN_EXPORT": span_export,
    }
    workers = [await _start_worker(child_env, prefix) for _ in range(2)]
    try:
        env: LocalEnvironment = await env_factory([], prefix=prefix)
        runs: dict[str, tuple[str, str]] = {}
        for _ in range(6):
            trace_id, span_id, traceparent = _publisher_context()
            runs[await _publish_trigger(env, "traced", {}, traceparent)] = (trace_id, span_id)
        for run_id in runs:
            assert await env.client.get_handle(run_id, "traced").result() == {"stored": 2}

        def exported() -> dict[str, list[dict[str, Any]]] | None:
            with receiver.lock:
                by_run = collections.defaultdict(list)
                for span in receiver.spans:
                    by_run[span["attributes"].get("run_id")].append(span)
            done = all(
                any(s["name"] == "run traced" for s in by_run[r]) and len(by_run[r]) == 7 for r in runs
            )
            return by_run if done else None

        by_run = await eventually(exported, within=30, message="every run's 7 spans exported")
    finally:
        outputs = [await _stop_worker(proc, lines) for proc, lines in workers]
        receiver.shutdown()
        receiver.server_close()
    for code, output in outputs:
        assert code == 0, output
    mixed = 0
    for run_id, (trace_id, publisher_span) in runs.items():
        found = by_run[run_id]
        (root,) = [s for s in found if s["name"] == "run traced"]
        assert {s["trace_id"] for s in found} == {trace_id}
        assert root["parent"] == publisher_span
        assert all(s["parent"] == root["span_id"] for s in found if s is not root)
        enrich = sorted(
            (s for s in found if s["name"] == "traced.enrich"), key=lambda s: s["attributes"]["attempt"]
        )
        assert [s["attributes"]["attempt"] for s in enrich] == [1, 2]
        assert enrich[0]["status"] == 2
        assert enrich[0]["events"] == ["exception"]
        assert enrich[1]["status"] != 2
        assert enrich[1]["attributes"]["messaging.operation.type"] == "process"
        assert enrich[1]["attributes"]["messaging.destination.name"].endswith(f".{run_id}.enrich.retry")
        assert {s["resource"]["service.name"] for s in found} == {"flow-test-worker"}
        mixed += len({s["resource"]["service.instance.id"] for s in found}) > 1
    pids = {s["resource"]["process.pid"] for spans in by_run.values() for s in spans}
    assert pids == {proc.pid for proc, _ in workers}
    assert mixed, "no run's trace spans both worker processes"


async def _start_worker(env: dict[str, str], prefix: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "flow_orchestrator.runtime._cli",
        "worker",
        "tests.tracing_workflows:wf",
        "--prefix",
        prefix,
        "--log-level",
        "INFO",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    async with asyncio.timeout(30):
        while not any(" hosting " in line for line in lines):  # the worker's "ready" log line
            line = await proc.stdout.readline()
            if not line:
                raise AssertionError("worker exited before it was ready:\n" + "".join(lines))
            lines.append(line.decode(errors="replace"))
    return proc, lines


async def _stop_worker(proc: asyncio.subprocess.Process, lines: list[str]) -> tuple[int, str]:
    if proc.returncode is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    except TimeoutError:
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, "".join(lines) + out.decode(errors="replace")
