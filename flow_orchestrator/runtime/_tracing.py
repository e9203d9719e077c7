"""``TracingInterceptor``: every run is one OpenTelemetry trace, across every hop, worker and retry.

The root span is *promised* when the trigger arrives (its ids become the run's ``traceparent``, which
every later message carries, so each attempt on any worker is its child) and *emitted* by whichever
worker publishes the run's terminal event, with the promised ids and the run's real start time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import re
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, Tracer, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import (
    Decision,
    ParentBased,
    ParentBasedTraceIdRatio,
    Sampler,
    SamplingResult,
    StaticSampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    INVALID_SPAN_CONTEXT,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import (
    _TRACECONTEXT_MAXIMUM_TRACESTATE_KEYS as _TRACESTATE_KEYS,
)
from opentelemetry.trace.span import (
    _TRACECONTEXT_MAXIMUM_TRACESTATE_LENGTH as _TRACESTATE_LENGTH,
)
from opentelemetry.util.types import AttributeValue

from flow_orchestrator._bounded import remember
from flow_orchestrator.bus._interceptors import Interceptor
from flow_orchestrator.bus._subjects import RUN_TOKEN
from flow_orchestrator.bus.types import (
    ExecuteNodeInput,
    NodeCall,
    PublishCall,
    PublishInput,
    TriggerCall,
    TriggerInput,
)

log = logging.getLogger("flow_orchestrator.telemetry")

INSTRUMENTATION_NAME = "flow_orchestrator"
try:
    INSTRUMENTATION_VERSION: str | None = version("flow-orchestrator")
except PackageNotFoundError:  # running from a source tree
    INSTRUMENTATION_VERSION = None

# Our tracestate entry, "<root span id><publisher's span id or 0s>" in 32 hex digits, travels with the
# run's traceparent: the worker that ends the run learns the root's parent from it, and can tell a
# root this interceptor promised from a traceparent that reached the run some other way.
TRACESTATE_KEY = "flow-orchestrator"
_RUN_END = frozenset({"completed", "failed", "cancelled"})
PARENT_CACHE = 4096  # runs in flight whose parsed trace context is kept
_DECISIONS = frozenset({"retrying", "lost", "failed"})  # node events that become decision spans
_WATCHED = _RUN_END | _DECISIONS | {"started"}
_RUN_PART = f".{RUN_TOKEN}."
_MARKER_PREFIX = f"{TRACESTATE_KEY}="
_MESSAGING: dict[str, AttributeValue] = {
    "messaging.system": "nats",
    "messaging.operation.type": "process",
    "messaging.operation.name": "process",
}
_propagator = TraceContextTextMapPropagator()
_SAMPLED, _NOT_SAMPLED = TraceFlags(TraceFlags.SAMPLED), TraceFlags(TraceFlags.DEFAULT)
# The traceparent every run's messages carry, as this interceptor writes it (W3C version 00). Any other
# form goes through OpenTelemetry's propagator, which knows the spec's every case.
_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_NO_STATE = TraceState()  # (immutable) the trace state of every context whose message carries none


def _ns(seconds: Any) -> int:
    return int(float(seconds) * 1e9) if isinstance(seconds, int | float) else time.time_ns()


def _describe(error: Any) -> tuple[str, str, str | None] | None:
    """(type, message, node) of an exception, or of an error as the run journal records it."""
    if isinstance(error, BaseException):
        return type(error).__qualname__, str(error), None
    if not isinstance(error, Mapping) or not error:
        return None
    node = error.get("node")
    return str(error.get("type")), str(error.get("message")), str(node) if node else None


@dataclass(frozen=True, slots=True)
class _Seen:
    """An event this worker published: its subject's parts, headers and payload."""

    prefix: str
    workflow: str
    run_id: str
    node: str
    kind: str
    headers: Mapping[str, str]
    payload: Mapping[str, Any]


def promise_root(tracer: Tracer, input: TriggerInput, decisions: Decisions | None = None) -> SpanContext:
    """Choose the root span's ids and sampling now, and make them the run's trace context."""
    parent_context, parent = extract(input.headers)
    trace_id = parent.trace_id if parent.is_valid else tracer.id_generator.generate_trace_id()
    span_id = _new_span_id(tracer.id_generator)
    name = f"run {input.workflow}"
    decision = decisions.decision(parent_context, parent, name) if decisions is not None else None
    if decision is None:
        attributes = {"workflow": input.workflow, "run_id": input.run_id}
        sampling = tracer.sampler.should_sample(parent_context, trace_id, name, SpanKind.INTERNAL, attributes)
        decision, state = sampling.decision, sampling.trace_state or _NO_STATE
    else:  # what the SDK's samplers answer with: the parent's trace state
        state = parent.trace_state
    marker = f"{span_id:016x}{parent.span_id if parent.is_valid else 0:016x}"
    if TRACESTATE_KEY in state:
        state = state.update(TRACESTATE_KEY, marker)
    else:
        if len(state) >= _TRACESTATE_KEYS:  # full: the right-most entry gives way (W3C)
            state = state.delete(list(state.keys())[-1])
        state = state.add(TRACESTATE_KEY, marker)
    flags = _SAMPLED if decision is Decision.RECORD_AND_SAMPLE else _NOT_SAMPLED
    root = SpanContext(trace_id, span_id, is_remote=False, trace_flags=flags, trace_state=state)
    # What the W3C propagator would inject
    input.headers["traceparent"] = f"00-{trace_id:032x}-{span_id:016x}-{flags:02x}"
    input.headers["tracestate"] = state.to_header()
    return root


class TracingInterceptor(Interceptor):
    """One trace per run (see the module docstring); list it first so its spans cover the others.

    Spans: ``run <workflow>`` (the root, from trigger to finish; its parent is the trigger publisher's
    span when the trigger carried a ``traceparent``), ``run <workflow> started``, one ``<workflow>.<node>``
    per attempt (retries are siblings with their ``attempt``), and short spans for supervisor decisions
    seen on the bus: ``... retry scheduled`` (lasting the backoff), ``... attempt lost``, ``... failed``.
    Decisions are child spans rather than events of the root because the root is emitted by the worker
    that ends the run, which need not be the one that saw them.

    ``tracer_provider`` must be an SDK ``TracerProvider`` (None: the global one, once it is set); with
    any other provider every hook only calls the next one.
    """

    def __init__(self, tracer_provider: trace_api.TracerProvider | None = None, *, capacity: int = 10_000):
        self._provider = tracer_provider
        self._tracer: Tracer | None = None
        self._settled = False
        self._capacity = capacity
        self._ended: OrderedDict[str, None] = OrderedDict()  # runs whose root this worker emitted
        self._scope = InstrumentationScope(INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION)
        self._parents: OrderedDict[Any, RunTrace] = OrderedDict()
        self._stripped: OrderedDict[str, str] = OrderedDict()  # tracestate -> without our entry
        self._decisions: Decisions | None = None  # once the tracer is known

    def _parent_of(self, headers: Mapping[str, str]) -> RunTrace:
        """The run's trace context from a message's headers. Every step of a run carries the same
        traceparent, so the parsed context is cached (bounded) instead of parsed at each step."""
        key = (headers.get("traceparent"), headers.get("tracestate"))
        found = self._parents.get(key)
        if found is None:
            context, parent = extract(headers)
            found = RunTrace(context, parent, self._sampling_by_parent(context, parent))
            remember(self._parents, key, found, PARENT_CACHE)
        return found

    def _sampling_by_parent(self, context: Context, parent: SpanContext) -> SamplingResult | None:
        """The sampler's answer for the spans of a run whose context is ``parent``, when it depends on
        the kind of parent alone (see :class:`Decisions`): then asked once per worker and kind of
        parent, instead of once per run and worker."""
        if self._decisions is None or not parent.is_valid:
            return None
        decision = self._decisions.decision(context, parent, "")
        if decision is None:
            return None
        if parent.trace_state is _NO_STATE:  # a step's: one answer serves them all
            return self._decisions.shared(decision)
        # The first step consumes the run's own event, which carries our entry: keep it off its
        # span (and off what the action propagates from it).
        state = parent.trace_state
        if TRACESTATE_KEY in state:
            state = state.delete(TRACESTATE_KEY)
        return SamplingResult(decision, None, state)

    def _sdk_tracer(self) -> Tracer | None:
        if self._settled:
            return self._tracer
        provider = self._provider or trace_api.get_tracer_provider()
        if isinstance(provider, TracerProvider):
            tracer = provider.get_tracer(INSTRUMENTATION_NAME, INSTRUMENTATION_VERSION)
            self._tracer = tracer if isinstance(tracer, Tracer) else None  # None when the SDK is disabled
            self._decisions = Decisions(self._tracer.sampler) if self._tracer is not None else None
            self._settled = True
        elif self._provider is not None:
            self._settled = True  # an injected non-SDK provider: tracing stays off
        return self._tracer  # the global provider may be set later: look again next time

    async def receive_trigger(self, input: TriggerInput, call_next: TriggerCall) -> Any:
        tracer = self._sdk_tracer()
        if tracer is None:
            return await call_next(input)
        received = time.time_ns()
        root = promise_root(tracer, input, self._decisions)
        # Inner interceptors (and their log records) already see the run's trace.
        token = context_api.attach(trace_api.set_span_in_context(NonRecordingSpan(root)))
        try:
            return await call_next(input)
        except Exception as exc:  # the trigger is rejected: its run's trace is this root alone
            if root.trace_flags.sampled:
                rejected = _Seen("", input.workflow, input.run_id, RUN_TOKEN, "rejected", input.headers, {})
                self._emit_root(tracer, root, rejected, start=received, end=time.time_ns(), error=exc)
            raise
        finally:
            context_api.detach(token)

    async def execute_node(self, input: ExecuteNodeInput, call_next: NodeCall) -> Any:
        tracer = self._tracer if self._settled else self._sdk_tracer()
        if tracer is None:
            return await call_next(input)
        run = self._parent_of(input.headers)
        attributes: dict[str, AttributeValue] = {
            **_MESSAGING,
            "workflow": input.workflow,
            "run_id": input.run_id,
            "node": input.node,
            "attempt": input.attempt,
        }
        if input.subject:  # the message this attempt processes (semantic conventions: if known)
            attributes["messaging.destination.name"] = input.subject
        span = start_light_span(tracer, self._scope, f"{input.workflow}.{input.node}", run, attributes)
        token = context_api.attach(trace_api.set_span_in_context(span, run.context))
        try:
            output = await call_next(input)
        except Exception as exc:
            span.record_exception(exc)
            span.set_attributes({"outcome": "failed", "error.type": type(exc).__qualname__})
            span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
            span.end()
            raise
        except BaseException:
            span.set_attribute("outcome", "cancelled")  # the run was cancelled or the worker stopped
            span.end()
            raise
        finally:
            context_api.detach(token)
        if isinstance(span, AttemptSpan):
            span.end_completed()
        else:
            span.end()
        return output

    async def publish(self, input: PublishInput, call_next: PublishCall) -> None:
        state = input.headers.get("tracestate")
        if state is not None and _RUN_PART not in input.subject:
            self._drop_marker(input.headers, state)
        await call_next(input)
        subject = input.subject
        kind = subject[subject.rfind(".") + 1 :]
        if input.duplicate or kind not in _WATCHED:
            return  # a repeat JetStream already had (a redelivery's re-announcement) counts once
        if kind not in _DECISIONS and _RUN_PART not in subject:
            return  # a node's own started/completed: its attempt span already tells it
        tracer = self._sdk_tracer()
        parts = subject.split(".")
        if tracer is None or len(parts) != 6 or parts[1] != "evt":
            return
        payload = input.payload if isinstance(input.payload, Mapping) else {}
        seen = _Seen(parts[0], parts[2], parts[3], parts[4], parts[5], dict(input.headers), payload)
        after_task(functools.partial(self._record, tracer, seen, time.time_ns()))

    def _record(self, tracer: Tracer, seen: _Seen, now: int) -> None:
        """The spans an event this worker published stands for (``now``: when it was published)."""
        try:
            if seen.node == RUN_TOKEN:
                self._run_event(tracer, seen, now)
            elif seen.kind in _DECISIONS:
                _decision_span(tracer, seen, now)
        except Exception:  # telemetry must never change what the engine does
            log.warning("tracing: could not record %s of %s", seen.kind, seen.run_id, exc_info=True)

    def _drop_marker(self, headers: dict[str, str], state: str) -> None:
        """Our tracestate entry is read only from the run's own events (and kept in its run record):
        a step's messages carry the run's ``traceparent`` and the publisher's own entries, one header
        less to encode and parse at every hop."""
        stripped = self._stripped.get(state)
        if stripped is None:
            entries = [entry for entry in state.split(",") if not entry.strip().startswith(_MARKER_PREFIX)]
            stripped = ",".join(entries)
            remember(self._stripped, state, stripped, PARENT_CACHE)
        if stripped:
            headers["tracestate"] = stripped
        else:
            del headers["tracestate"]

    def _run_event(self, tracer: Tracer, seen: _Seen, now: int) -> None:
        run = self._parent_of(seen.headers)
        root = run.parent
        marker = root.trace_state.get(TRACESTATE_KEY) or ""
        if not root.is_valid or not marker.startswith(f"{root.span_id:016x}"):
            return  # no trace, or a traceparent this interceptor did not promise
        if seen.kind == "started":
            attributes: dict[str, AttributeValue] = {
                **_MESSAGING,
                "messaging.destination.name": f"{seen.prefix}.trigger.{seen.workflow}",
                "workflow": seen.workflow,
                "run_id": seen.run_id,
            }
            name = f"run {seen.workflow} started"
            # It starts when the root does (the run's creation), so it stays inside the root.
            start = _ns(seen.payload.get("created_at"))
            start_light_span(tracer, self._scope, name, run, attributes, start_time=start).end(now)
        elif seen.kind in _RUN_END and root.trace_flags.sampled and seen.run_id not in self._ended:
            remember(self._ended, seen.run_id, None, self._capacity)
            start, end = _ns(seen.payload.get("created_at")), _ns(seen.payload.get("finished_at"))
            self._emit_root(tracer, root, seen, start=start, end=end, error=seen.payload.get("error"))

    def _emit_root(
        self, tracer: Tracer, root: SpanContext, seen: _Seen, *, start: int, end: int, error: Any
    ) -> None:
        """Hand the finished root span, with the promised ids, to the provider's span processors.

        The SDK's tracer always draws new ids, so the span is built as the ``ReadableSpan`` that
        processors and exporters consume, instead of being started: no id generator or global is
        swapped. Processors' ``on_start`` is skipped (the root never was a live span).
        """
        marker = root.trace_state.get(TRACESTATE_KEY) or ""
        parent_id = int(marker[16:], 16) if len(marker) == 32 else 0
        parent = (
            SpanContext(root.trace_id, parent_id, True, trace_flags=root.trace_flags) if parent_id else None
        )
        attributes: dict[str, AttributeValue] = {
            "workflow": seen.workflow,
            "run_id": seen.run_id,
            "status": seen.kind,
        }
        events: list[Event] = []
        status = Status(StatusCode.OK) if seen.kind == "completed" else Status(StatusCode.UNSET)
        described = _describe(error)
        if described is not None:
            kind, message, node = described
            attributes.update({"error": f"{kind}: {message}", "error.type": kind})
            if node:
                attributes["node"] = node
            events.append(
                Event("exception", {"exception.type": kind, "exception.message": message}, timestamp=end)
            )
            if seen.kind != "cancelled":  # a cancellation is asked for, not an error
                status = Status(StatusCode.ERROR, f"{kind}: {message}")
        context = SpanContext(root.trace_id, root.span_id, False, root.trace_flags, root.trace_state)
        span = ReadableSpan(
            name=f"run {seen.workflow}",
            context=context,
            parent=parent,
            resource=tracer.resource,
            attributes=attributes,
            events=events,
            kind=SpanKind.INTERNAL,
            status=status,
            start_time=start,
            end_time=max(end, start),
            instrumentation_scope=self._scope,
        )
        tracer.span_processor.on_end(span)


def after_task(callback: Callable[[], None]) -> None:
    """Call ``callback`` once the current task is done (in a worker: its message handled, the outcome
    published and the message acknowledged), so that what tracing does with a step is not on the
    step's path; at once outside a task."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop in this thread
        task = None
    if task is None:
        callback()
    else:
        task.add_done_callback(lambda _: callback())


def _valid_attribute(value: Any) -> bool:
    if isinstance(value, str | bool | int | float):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, str | bool | int | float) for v in value)


class AttemptSpan(trace_api.Span, ReadableSpan):
    """A span this interceptor starts (a node attempt, a run's "started"): the current span while
    the action runs (instrumented libraries nest under it, and ``trace.get_current_span()`` in an
    action records on it), and, once ended, the ``ReadableSpan`` the provider's processors get.

    It does what the SDK's ``Span`` does for this one use at a fraction of its cost per attempt (no
    lock, no bounded containers, no ``on_start`` calls); attribute values of a type OTLP cannot
    carry are dropped, as the SDK drops them.
    """

    def __init__(
        self,
        tracer: Tracer,
        scope: InstrumentationScope,
        name: str,
        *,
        ids: tuple[int, int, TraceFlags, TraceState | None],
        parent: SpanContext | None,
        attributes: dict[str, AttributeValue],
        start_time: int | None = None,
    ) -> None:
        ReadableSpan.__init__(
            self,
            name=name,
            context=None,
            parent=parent,
            resource=tracer.resource,
            attributes=attributes,
            events=[],
            links=[],
            kind=SpanKind.CONSUMER,
            start_time=start_time or time.time_ns(),
            instrumentation_scope=scope,
        )
        self._processor = tracer.span_processor
        self._ids = ids  # (trace id, span id, flags, state): the context is made when first asked for
        self._attributes: dict[str, AttributeValue] = attributes
        self._events: list[Event] = []
        self._links: list[trace_api.Link] = []

    def get_span_context(self) -> SpanContext:
        """The span's context, made when first asked for: by an action that starts a child span or
        reads its ids, or when the span is handed to the processors. Most attempts do neither before
        their outcome is on its way, so no step waits for it. Its ids were drawn with the span, so
        two threads that make it at once (a sync action's, the loop's) make equal ones."""
        context = self._context
        if context is None:
            trace_id, span_id, flags, state = self._ids
            context = self._context = SpanContext(trace_id, span_id, False, flags, state)
        return context

    @property
    def context(self) -> SpanContext:
        return self.get_span_context()

    def is_recording(self) -> bool:
        return self._end_time is None

    def set_attribute(self, key: str, value: Any) -> None:
        if self._end_time is None and _valid_attribute(value):
            self._attributes[key] = tuple(value) if isinstance(value, list) else value

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def add_event(self, name: str, attributes: Any = None, timestamp: int | None = None) -> None:
        if self._end_time is None:
            self._events.append(Event(name, attributes, timestamp or time.time_ns()))

    def add_link(self, context: SpanContext, attributes: Any = None) -> None:
        if self._end_time is None and context.is_valid:
            self._links.append(trace_api.Link(context, attributes))

    def update_name(self, name: str) -> None:
        if self._end_time is None:
            self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None or self._status.status_code is StatusCode.OK:
            return  # OK is final, as in the SDK
        self._status = status if isinstance(status, Status) else Status(status, description)

    def record_exception(
        self,
        exception: BaseException,
        attributes: Any = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        kind = type(exception)
        module = kind.__module__
        details: dict[str, AttributeValue] = {
            "exception.type": f"{module}.{kind.__qualname__}" if module != "builtins" else kind.__qualname__,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        self.add_event("exception", {**details, **(attributes or {})}, timestamp)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is None:
            self._end_time = end_time or time.time_ns()
            self._hand_over()

    def end_completed(self) -> None:
        """The attempt succeeded: ``set_attribute("outcome", "completed")`` and ``end()``, except that
        the span reaches the processors once the task running the attempt is done (its outcome
        published and its message acknowledged), so the next step does not wait for them."""
        if self._end_time is not None:
            return
        self._attributes["outcome"] = "completed"
        self._end_time = time.time_ns()
        after_task(self._hand_over)

    def _hand_over(self) -> None:
        try:
            self.get_span_context()
            self._processor.on_end(self)
        except Exception:  # (in a task's done-callback: asyncio would log it without saying whose)
            log.warning("tracing: a span processor failed on %s", self._name, exc_info=True)


@dataclass(slots=True)
class RunTrace:
    """A run's trace context as its messages carry it, parsed once per run (per worker)."""

    context: Context  # what the headers hold, as an OpenTelemetry context
    parent: SpanContext  # the run's span context: the parent of the spans the run's steps start
    sampling: SamplingResult | None = None  # the sampler's answer for those spans, when reusable


def extract(headers: Mapping[str, str]) -> tuple[Context, SpanContext]:
    """A message's trace context (as OpenTelemetry's W3C propagator reads it) and its span context.

    Each worker reads a run's context once, then keeps it: the traceparent this interceptor writes
    is parsed here directly, for a fraction of the propagator's cost (measured on a worker whose
    caches the other processes keep cold); any other form is left to the propagator."""
    traceparent, tracestate = headers.get("traceparent"), headers.get("tracestate")
    match = _TRACEPARENT.fullmatch(traceparent) if isinstance(traceparent, str) else None
    if match is None or not (tracestate is None or _fits(tracestate)):
        context = _propagator.extract(headers)
        return context, trace_api.get_current_span(context).get_span_context()
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return Context(), INVALID_SPAN_CONTEXT
    state = _NO_STATE if tracestate is None else TraceState.from_header([tracestate])
    parent = SpanContext(trace_id, span_id, True, TraceFlags(int(match[3], 16)), state)
    return trace_api.set_span_in_context(NonRecordingSpan(parent)), parent


def _fits(tracestate: Any) -> bool:
    return isinstance(tracestate, str) and len(tracestate) <= _TRACESTATE_LENGTH


class Decisions:
    """A sampler's answers that depend on the kind of parent alone (valid or not, remote or not,
    sampled or not), learnt once per kind: a ``StaticSampler`` (``always_on``/``always_off``), or a
    ``ParentBased`` one whose delegates for that kind are static (the SDK's default is)."""

    def __init__(self, sampler: Sampler) -> None:
        self._sampler = sampler
        self._known: dict[tuple[bool, bool, bool], Decision] = {}
        self._results: dict[Decision, SamplingResult] = {}
        # The SDK's own classes only: a subclass may read the span's name or attributes.
        delegates = vars(sampler) if type(sampler) in (ParentBased, ParentBasedTraceIdRatio) else {}
        children = [s for name, s in delegates.items() if isinstance(s, Sampler) and name != "_root"]
        static = type(sampler) is StaticSampler
        static_children = len(children) == 4 and all(type(s) is StaticSampler for s in children)
        self._for_children = static or static_children
        self._for_roots = static or type(delegates.get("_root")) is StaticSampler

    def decision(self, context: Context, parent: SpanContext, name: str) -> Decision | None:
        """The answer for a span under ``parent`` (in ``context``), or None: ask the sampler."""
        if not (self._for_children if parent.is_valid else self._for_roots):
            return None
        kind = (parent.is_valid, parent.is_remote, parent.trace_flags.sampled)
        found = self._known.get(kind)
        if found is None:
            trace_id = parent.trace_id if parent.is_valid else 1  # a static answer reads no id
            found = self._sampler.should_sample(context, trace_id, name, SpanKind.INTERNAL).decision
            self._known[kind] = found
        return found

    def shared(self, decision: Decision) -> SamplingResult:
        """One result for every span whose parent carries no trace state."""
        found = self._results.get(decision)
        if found is None:
            found = self._results[decision] = SamplingResult(decision, None, _NO_STATE)
        return found


def _decides_by_parent(sampler: Sampler) -> bool:
    """Whether ``sampler`` answers alike for every child of one parent (the SDK's samplers look at
    the parent and the trace id only): then its answer for a run's first span holds for the rest."""
    if type(sampler) in (ParentBased, ParentBasedTraceIdRatio):
        return all(_decides_by_parent(s) for s in vars(sampler).values() if isinstance(s, Sampler))
    return type(sampler) in (StaticSampler, TraceIdRatioBased)


def start_light_span(
    tracer: Tracer,
    scope: InstrumentationScope,
    name: str,
    run: RunTrace,
    attributes: dict[str, AttributeValue],
    *,
    start_time: int | None = None,
) -> trace_api.Span:
    """An :class:`AttemptSpan` that is a child of the run's span, or a non-recording span when the
    sampler says so (asked once per run when its answer cannot change)."""
    parent = run.parent
    valid = parent.is_valid
    trace_id = parent.trace_id if valid else tracer.id_generator.generate_trace_id()
    sampling = run.sampling
    if sampling is None:
        sampling = tracer.sampler.should_sample(run.context, trace_id, name, SpanKind.CONSUMER, attributes)
        if sampling.attributes:  # a sampler answers with the span's attributes (the SDK uses them)
            attributes = {**attributes, **sampling.attributes}
        if valid and _decides_by_parent(tracer.sampler):
            # Keep the decision and trace state only: the attributes were this span's.
            run.sampling = SamplingResult(sampling.decision, None, sampling.trace_state)
    flags = _SAMPLED if sampling.decision is Decision.RECORD_AND_SAMPLE else _NOT_SAMPLED
    span_id = _new_span_id(tracer.id_generator)
    if sampling.decision is Decision.DROP:
        return NonRecordingSpan(SpanContext(trace_id, span_id, False, flags, sampling.trace_state))
    return AttemptSpan(
        tracer,
        scope,
        name,
        ids=(trace_id, span_id, flags, sampling.trace_state),
        parent=parent if valid else None,
        attributes=attributes,
        start_time=start_time,
    )


def _new_span_id(generator: IdGenerator) -> int:
    # The SDK's default generator, without its two calls per id (RandomIdGenerator.generate_span_id)
    span_id = random.getrandbits(64) if type(generator) is RandomIdGenerator else generator.generate_span_id()
    while not span_id:
        span_id = generator.generate_span_id()
    return span_id


def _decision_span(tracer: Tracer, seen: _Seen, now: int) -> None:
    """A short child of the root: a retry scheduled (lasting the backoff), a lost attempt, or a node's
    final failure that its downstream nodes continue past (``continue_on_error``)."""
    payload = seen.payload
    attributes: dict[str, AttributeValue] = {
        "workflow": seen.workflow,
        "run_id": seen.run_id,
        "node": seen.node,
    }
    attributes["attempt"] = int(payload.get("attempt") or 0)
    end, name, status = now, f"{seen.workflow}.{seen.node} failed", Status(StatusCode.ERROR)
    if seen.kind == "retrying":
        delay = float(payload.get("delay") or 0.0)
        attributes.update(next_attempt=int(payload.get("next_attempt") or 0), delay=delay)
        end, name, status = now + int(delay * 1e9), f"{seen.workflow}.{seen.node} retry scheduled", Status()
    elif seen.kind == "lost":
        name = f"{seen.workflow}.{seen.node} attempt lost"
        status = Status(StatusCode.ERROR, str(payload.get("reason") or "attempt lost"))
    described = _describe(payload.get("error"))
    if described is not None:
        attributes["error"] = f"{described[0]}: {described[1]}"
    span = tracer.start_span(
        name, context=_propagator.extract(seen.headers), attributes=attributes, start_time=now
    )
    span.set_status(status)
    span.end(end_time=end)
