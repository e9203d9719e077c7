"""Span export from a helper process (opt-in: ``FLOW_SPAN_EXPORT=process``), off the worker's GIL.

An OTLP exporter in the worker's own process turns each span into protobuf objects in Python code
(about 37 µs a span here) under the GIL the event loop needs. Here the worker only flattens each
finished span into a tuple of plain values (a few µs) and a sender thread writes batches of them,
msgpack-framed, into a pipe. A child process (``runtime/_span_export_child.py``) rebuilds the spans
and hands them to the exporters that ``OTEL_*`` variables name, as the worker would have.

It is the Python-sized version of the usual "local collector agent": the child inherits the worker's
environment (endpoints, headers, protocol), is told the worker's resource, and exits when the pipe
closes (the worker stopped or died), after exporting what it holds. If the child dies first, the
processor starts a new one for the next batch; spans it could not hand over are counted and logged,
as ``BatchSpanProcessor`` does when its queue is full. On our 2-core benchmark machine it cost more
than in-process export (the child competes for the same cores; docs/performance.md), so it is not
the default: it is for workers whose event loop is the bottleneck on machines with cores to spare.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgpack
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

log = logging.getLogger("flow_orchestrator.telemetry")

# Batching follows the SDK's BatchSpanProcessor variables, with its defaults.
_DEFAULTS = {
    "OTEL_BSP_SCHEDULE_DELAY": 5000,
    "OTEL_BSP_MAX_QUEUE_SIZE": 2048,
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": 512,
}
FLUSH = "flush"  # a frame asking the child to export what it holds and say so on the ack pipe
_CHILD = "flow_orchestrator.runtime._span_export_child"
_SHORT_LIFE, _QUICK_EXITS = 5.0, 3  # a child that dies this soon, this often in a row, keeps dying
_RESTART_PAUSE = 1.0  # seconds between attempts to start a child that keeps dying


def _setting(name: str) -> int:
    value = os.environ.get(name, "").strip()
    try:
        return max(1, int(value)) if value else _DEFAULTS[name]
    except ValueError:
        log.warning("%s=%r is not a whole number: using %d", name, value, _DEFAULTS[name])
        return _DEFAULTS[name]


def _context(context: SpanContext) -> tuple[bytes, int, int, str]:
    return (
        context.trace_id.to_bytes(16, "big"),
        context.span_id,
        int(context.trace_flags),
        context.trace_state.to_header(),
    )


def flatten(span: ReadableSpan) -> tuple[Any, ...]:
    """A finished span as plain values msgpack can carry (the resource travels once, at start)."""
    context = span.get_span_context()
    assert context is not None  # a finished SDK span always has one
    parent = span.parent
    scope = span.instrumentation_scope
    return (
        span.name,
        _context(context),
        (parent.span_id, parent.is_remote) if parent is not None else None,
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        [(event.name, event.timestamp, dict(event.attributes or {})) for event in span.events],
        [(_context(link.context), dict(link.attributes or {})) for link in span.links],
        (span.status.status_code.value, span.status.description),
        (scope.name, scope.version, scope.schema_url) if scope is not None else None,
    )


def _span_context(values: Sequence[Any], *, remote: bool = False) -> SpanContext:
    trace_id, span_id, flags, state = values
    return SpanContext(
        int.from_bytes(trace_id, "big"), span_id, remote, TraceFlags(flags), TraceState.from_header([state])
    )


def rebuild(values: Sequence[Any], resource: Resource) -> ReadableSpan:
    """The span :func:`flatten` flattened, as exporters consume it."""
    name, context, parent, kind, start, end, attributes, events, links, status, scope = values
    own = _span_context(context)
    return ReadableSpan(
        name=name,
        context=own,
        parent=SpanContext(own.trace_id, parent[0], parent[1], own.trace_flags) if parent else None,
        resource=resource,
        attributes=attributes,
        events=[Event(event, attrs, timestamp=at) for event, at, attrs in events],
        links=[Link(_span_context(linked, remote=True), attrs) for linked, attrs in links],
        kind=SpanKind(kind),
        status=Status(StatusCode(status[0]), status[1]),
        start_time=start,
        end_time=end,
        instrumentation_scope=InstrumentationScope(*scope) if scope else None,
    )


class ExportProcessSpanProcessor(SpanProcessor):
    """Hands finished spans to ``exporters`` (``"otlp"``, ``"console"``) running in a child process.

    ``on_end`` appends to a bounded queue; a sender thread writes a batch every
    ``OTEL_BSP_SCHEDULE_DELAY`` ms, or as soon as ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` spans wait.
    ``force_flush`` waits until the child has exported everything handed over so far.
    """

    def __init__(self, exporters: Sequence[str], resource: Resource) -> None:
        self._exporters = list(exporters)
        self._resource = resource
        self._delay = _setting("OTEL_BSP_SCHEDULE_DELAY") / 1000
        self._max_queue = _setting("OTEL_BSP_MAX_QUEUE_SIZE")
        self._batch = min(_setting("OTEL_BSP_MAX_EXPORT_BATCH_SIZE"), self._max_queue)
        self._queue: list[tuple[Any, ...]] = []
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._flushes: list[threading.Event] = []  # force_flush calls waiting for the next hand-over
        self._dropped = 0
        self._stopping = False
        self._child: subprocess.Popen[bytes] | None = None
        self._acks: int | None = None  # read end of the child's ack pipe
        self._last_start = 0.0
        self._quick_exits = 0
        self._thread = threading.Thread(target=self._send_loop, name="flow-span-export", daemon=True)
        self._thread.start()

    @property
    def child_pid(self) -> int | None:
        """The exporting child's PID (None before the first batch or after shutdown)."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        if self._stopping or not span.context.trace_flags.sampled:
            return
        values = flatten(span)
        with self._lock:
            if len(self._queue) >= self._max_queue:
                self._dropped += 1
                return
            self._queue.append(values)
            if len(self._queue) == self._batch:
                self._wake.notify()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        done = threading.Event()
        with self._lock:
            if self._stopping:
                return True
            self._flushes.append(done)
            self._wake.notify()
        return done.wait(timeout_millis / 1000)

    def shutdown(self) -> None:
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify()
        self._thread.join(30)
        child = self._child
        if child is not None:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                log.warning("span export process %d did not finish exporting in 30 s: stopping it", child.pid)
                child.kill()
                child.wait()
        if self._acks is not None:
            os.close(self._acks)
            self._acks = None

    # --- the sender thread ----------------------------------------------------------------------
    def _send_loop(self) -> None:
        with self._lock:
            if not self._stopping:
                self._running_child()  # start it now: its start-up (~0.5 s of imports) is not a run's cost
        while True:
            with self._lock:
                if not (self._stopping or self._flushes or len(self._queue) >= self._batch):
                    self._wake.wait(self._delay)
                batch, self._queue = self._queue, []
                flushes, self._flushes = self._flushes, []
                stopping, dropped, self._dropped = self._stopping, self._dropped, 0
            if dropped:
                log.warning("span export queue full: dropped %d spans (OTEL_BSP_MAX_QUEUE_SIZE)", dropped)
            frames = [batch[i : i + self._batch] for i in range(0, len(batch), self._batch)]
            self._hand_over(frames, flush=bool(flushes) or stopping)
            for flushed in flushes:
                flushed.set()
            if stopping:
                self._close_pipe()
                return

    def _hand_over(self, frames: list[list[tuple[Any, ...]]], *, flush: bool) -> None:
        if not frames and not flush:
            return  # nothing to send, and no child holding spans to flush
        child = self._running_child()
        if child is None or child.stdin is None:
            lost = sum(map(len, frames))
            if lost:
                log.warning("span export process is not running: dropped %d spans", lost)
            return
        try:
            for frame in frames:
                child.stdin.write(msgpack.packb(frame))
            if flush:
                child.stdin.write(msgpack.packb(FLUSH))
            child.stdin.flush()
            # The ack: the child has exported everything before the flush frame. No ack (the pipe
            # closed) means it died first, with what it held.
            if flush and self._acks is not None and not os.read(self._acks, 1):
                raise BrokenPipeError("it exited before the flush")
        except (BrokenPipeError, OSError, ValueError) as exc:
            log.warning(
                "span export process %d stopped (%s): dropped up to %d spans",
                child.pid,
                exc,
                sum(map(len, frames)),
            )

    def _running_child(self) -> subprocess.Popen[bytes] | None:
        child = self._child
        if child is not None and child.poll() is None:
            return child
        if child is not None:
            log.warning(
                "span export process %d exited with %s: starting another", child.pid, child.returncode
            )
            self._close_pipe()
            lived = time.monotonic() - self._last_start
            self._quick_exits = self._quick_exits + 1 if lived < _SHORT_LIFE else 0
            if self._quick_exits >= _QUICK_EXITS and lived < _RESTART_PAUSE:
                return None  # it keeps dying at start: try again a second later, not in a tight loop
        self._last_start = time.monotonic()
        return self._start_child()

    def _start_child(self) -> subprocess.Popen[bytes] | None:
        read_acks, write_acks = os.pipe()
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", _CHILD, "--ack-fd", str(write_acks), *self._exporters],
                stdin=subprocess.PIPE,
                pass_fds=(write_acks,),
                start_new_session=True,  # a terminal's Ctrl-C stops the worker, which then closes the pipe
            )
        except OSError as exc:
            os.close(read_acks)
            log.warning("could not start the span export process: %s", exc)
            return None
        finally:
            os.close(write_acks)
        assert child.stdin is not None
        resource = (dict(self._resource.attributes), self._resource.schema_url)
        child.stdin.write(msgpack.packb(resource))
        self._child, self._acks = child, read_acks
        return child

    def _close_pipe(self) -> None:
        child = self._child
        if child is not None and child.stdin is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()
