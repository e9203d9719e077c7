"""Telemetry set-up for a worker process from the standard ``OTEL_*`` variables, a Prometheus endpoint,
and log records that carry the trace id of the run they are about.

The library never configures telemetry on import: the CLI (or the user) calls :func:`configure_telemetry`.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import format_span_id, format_trace_id

from flow_orchestrator._errors import FlowError
from flow_orchestrator.bus._interceptors import Interceptor
from flow_orchestrator.runtime._metrics import MetricsInterceptor
from flow_orchestrator.runtime._span_export import ExportProcessSpanProcessor
from flow_orchestrator.runtime._tracing import TracingInterceptor

DEFAULT_SERVICE_NAME = "flow-orchestrator"
PROMETHEUS_PORT = 9464


class TelemetryConfigError(FlowError, ValueError):
    """An ``OTEL_*`` variable asks for something this worker cannot do (or lacks the package for)."""


@dataclass(slots=True)
class PrometheusEndpoint:
    """A ``/metrics`` HTTP endpoint (its own thread) serving what ``reader`` collects."""

    reader: MetricReader
    server: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_prometheus(port: int = PROMETHEUS_PORT, host: str | None = None) -> PrometheusEndpoint:
    """Serve Prometheus metrics on ``host:port`` (default ``$OTEL_EXPORTER_PROMETHEUS_HOST`` or all
    interfaces, so a scraper can reach a container). Pass ``endpoint.reader`` to a ``MeterProvider``.
    Uses its own registry, never prometheus-client's global one."""
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader  # noqa: PLC0415
        from prometheus_client import CollectorRegistry, start_http_server  # noqa: PLC0415
    except ImportError as exc:
        raise TelemetryConfigError(
            f"a metrics port needs the prometheus extra: pip install 'flow-orchestrator[prometheus]' ({exc})"
        ) from exc
    registry = CollectorRegistry()
    reader = PrometheusMetricReader(registry=registry)
    address = host or os.environ.get("OTEL_EXPORTER_PROMETHEUS_HOST") or "0.0.0.0"
    server, thread = start_http_server(port, addr=address, registry=registry)
    return PrometheusEndpoint(reader, server, thread)


@dataclass(slots=True)
class Telemetry:
    """What :func:`configure_telemetry` set up: add ``interceptors`` first in the worker's list, and
    call :meth:`shutdown` when the worker has stopped (it flushes spans and metrics)."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    interceptors: list[Interceptor]
    prometheus: PrometheusEndpoint | None = None
    _closed: bool = field(default=False, init=False, repr=False)

    def shutdown(self) -> None:
        """Flush and stop exporters (blocking: call it off the event loop). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.shutdown)
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()
        if self.prometheus is not None:
            self.prometheus.close()


def _choices(variable: str, allowed: Sequence[str]) -> list[str]:
    names = [n.strip().lower() for n in os.environ.get(variable, "none").split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise TelemetryConfigError(f"{variable}={unknown[0]!r} is not supported: use {', '.join(allowed)}")
    return [n for n in names if n != "none"]


def _otlp(signal: str) -> Callable[[], Any]:
    """The OTLP exporter class for ``signal`` ("traces" or "metrics") and the configured protocol."""
    protocol = os.environ.get(f"OTEL_EXPORTER_OTLP_{signal.upper()}_PROTOCOL") or os.environ.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    transport = {"http/protobuf": "http", "grpc": "grpc"}.get(protocol.strip().lower())
    if transport is None:
        raise TelemetryConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use http/protobuf or grpc"
        )
    kind = "trace" if signal == "traces" else "metric"
    try:
        exporters = importlib.import_module(f"opentelemetry.exporter.otlp.proto.{transport}.{kind}_exporter")
    except ImportError as exc:
        raise TelemetryConfigError(
            f"OTLP over {protocol} needs its exporter: pip install 'flow-orchestrator[otlp]' ({exc})"
        ) from exc
    return getattr(exporters, "OTLPSpanExporter" if signal == "traces" else "OTLPMetricExporter")  # type: ignore[no-any-return]


def span_exporter(name: str) -> SpanExporter:
    """A new span exporter for an ``OTEL_TRACES_EXPORTER`` name (``otlp`` or ``console``). OTLP over
    ``http/protobuf`` is ours (``runtime/_otlp.py``: the same bytes, a fifth of the SDK's encoding
    cost) unless ``FLOW_OTLP_EXPORTER=sdk``; ``grpc`` is the SDK's."""
    if name != "otlp":
        return ConsoleSpanExporter()
    exporter = _otlp("traces")
    choice = (os.environ.get("FLOW_OTLP_EXPORTER") or "flow").strip().lower()
    if choice not in ("flow", "sdk"):
        raise TelemetryConfigError(f"FLOW_OTLP_EXPORTER={choice!r} is not supported: use flow or sdk")
    if choice == "flow" and exporter.__module__.startswith("opentelemetry.exporter.otlp.proto.http"):
        from flow_orchestrator.runtime._otlp import OTLPSpanExporter  # noqa: PLC0415 (needs requests)

        return OTLPSpanExporter()
    return exporter()  # type: ignore[no-any-return]


def _resource(service_name: str | None) -> Resource:
    """``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME`` win; we add what they leave unset: the
    service name, a unique ``service.instance.id`` and ``process.pid`` (tells workers apart)."""
    configured = {
        part.partition("=")[0].strip() for part in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    }
    if os.environ.get("OTEL_SERVICE_NAME"):
        configured.add("service.name")
    ours: dict[str, str | int] = {
        "service.name": service_name or DEFAULT_SERVICE_NAME,
        "service.instance.id": str(uuid.uuid4()),
        "process.pid": os.getpid(),
    }
    return Resource.create({key: value for key, value in ours.items() if key not in configured})


def _span_export_in_process(choice: str | None) -> bool:
    choice = (choice or os.environ.get("FLOW_SPAN_EXPORT") or "thread").strip().lower()
    if choice not in ("process", "thread"):
        raise TelemetryConfigError(f"FLOW_SPAN_EXPORT={choice!r} is not supported: use process or thread")
    return choice == "thread" or os.name != "posix"  # the export process needs POSIX pipes


def configure_telemetry(
    service_name: str | None = None,
    *,
    metrics_port: int | None = None,
    set_global: bool = True,
    span_export: str | None = None,
) -> Telemetry | None:
    """Providers, exporters and interceptors as the standard ``OTEL_*`` variables ask, or None (no
    cost at all) when they ask for nothing and ``metrics_port`` is None.

    - ``OTEL_TRACES_EXPORTER``: ``otlp``, ``console`` or ``none`` (default), comma-separated.
    - ``OTEL_METRICS_EXPORTER``: ``otlp``, ``console``, ``prometheus`` or ``none`` (default);
      ``metrics_port`` (the worker's ``--metrics-port``) adds a Prometheus endpoint on that port.
    - ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf`` (default) or ``grpc``. Endpoints, headers,
      timeouts (``OTEL_EXPORTER_OTLP_*``) are read by the exporters (for spans over HTTP, ours:
      :func:`span_exporter`); batching (``OTEL_BSP_*``), the export interval
      (``OTEL_METRIC_EXPORT_INTERVAL``) and the sampler (``OTEL_TRACES_SAMPLER``) by the SDK.
    - ``OTEL_SERVICE_NAME`` / ``OTEL_RESOURCE_ATTRIBUTES``: override ``service_name`` and our defaults.

    ``span_export`` (default ``$FLOW_SPAN_EXPORT``, else ``thread``): ``thread`` uses the SDK's
    ``BatchSpanProcessor`` in this process; ``process`` encodes and sends spans from a helper process
    (``runtime/_span_export.py``), off this process's GIL. On our 2-core benchmark machine ``thread``
    cost less (docs/performance.md).

    ``set_global`` also makes the providers OpenTelemetry's global ones, so instrumented libraries an
    action uses join the run's trace.
    """
    traces = _choices("OTEL_TRACES_EXPORTER", ("otlp", "console", "none"))
    metric_kinds = _choices("OTEL_METRICS_EXPORTER", ("otlp", "console", "prometheus", "none"))
    if "prometheus" in metric_kinds and metrics_port is None:
        metrics_port = int(os.environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", PROMETHEUS_PORT))
    if not traces and not metric_kinds and metrics_port is None:
        return None
    resource = _resource(service_name)
    tracer_provider = meter_provider = prometheus = None
    interceptors: list[Interceptor] = []
    if traces:
        tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        if _span_export_in_process(span_export):
            for name in traces:
                tracer_provider.add_span_processor(BatchSpanProcessor(span_exporter(name)))
        else:
            if "otlp" in traces:
                _otlp("traces")  # a missing exporter package is this process's typed error, not the child's
            tracer_provider.add_span_processor(ExportProcessSpanProcessor(traces, resource))
        interceptors.append(TracingInterceptor(tracer_provider))
    readers: list[MetricReader] = [
        PeriodicExportingMetricReader(_otlp("metrics")() if n == "otlp" else ConsoleMetricExporter())
        for n in metric_kinds
        if n != "prometheus"
    ]
    if metrics_port is not None:
        prometheus = start_prometheus(metrics_port)
        readers.append(prometheus.reader)
    if readers:
        meter_provider = MeterProvider(resource=resource, metric_readers=readers, shutdown_on_exit=False)
        interceptors.append(MetricsInterceptor(meter_provider))
    if set_global:
        if tracer_provider is not None:
            trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics.set_meter_provider(meter_provider)
    telemetry = Telemetry(tracer_provider, meter_provider, interceptors, prometheus)
    atexit.register(telemetry.shutdown)  # in case the caller does not; shutdown() unregisters it
    return telemetry


class TraceContextFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex) of the current span to records about a run (those with a
    ``run_id`` extra, as ``NodeContext.log`` and ``LoggingInterceptor`` write). Attach it to a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "run_id", None) is not None and not hasattr(record, "trace_id"):
            context = trace.get_current_span().get_span_context()
            if context.is_valid:
                record.trace_id = format_trace_id(context.trace_id)
                record.span_id = format_span_id(context.span_id)
        return True


class RunFieldsFormatter(logging.Formatter):
    """Appends the run fields a record carries to its message:
    ``... charge failed [workflow=order run_id=r1 node=charge attempt=2 trace_id=4bf9...]``."""

    FIELDS = ("workflow", "run_id", "node", "attempt", "trace_id")

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        fields = [
            f"{name}={getattr(record, name)}"
            for name in self.FIELDS
            if getattr(record, name, None) is not None
        ]
        return f"{text} [{' '.join(fields)}]" if fields else text
