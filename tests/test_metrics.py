"""Run and attempt metrics through an injected MeterProvider read by an InMemoryMetricReader; the
Prometheus endpoint a worker serves with ``--metrics-port``."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from flow_orchestrator.bus.types import ExecuteNodeInput, PublishInput
from flow_orchestrator.runtime._metrics import MetricsInterceptor
from flow_orchestrator.runtime._telemetry import configure_telemetry, start_prometheus
from flow_orchestrator.testing import LocalEnvironment, eventually
from tests import tracing_workflows


@pytest.fixture
def meter() -> Iterator[tuple[MeterProvider, InMemoryMetricReader]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    yield provider, reader
    provider.shutdown()


def _points(reader: InMemoryMetricReader, name: str) -> dict[tuple[tuple[str, Any], ...], Any]:
    """The data points of metric ``name``, by their sorted attributes."""
    data = reader.get_metrics_data()
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    return {tuple(sorted((p.attributes or {}).items())): p for p in metric.data.data_points}
    return {}


def _count(reader: InMemoryMetricReader, name: str, **attributes: Any) -> float:
    point = _points(reader, name).get(tuple(sorted(attributes.items())))
    if point is None:
        return 0
    return float(point.count if hasattr(point, "count") else point.value)


async def _publish(interceptor: MetricsInterceptor, subject: str, payload: Any) -> None:
    async def sent(_: PublishInput) -> None:
        return None

    await interceptor.publish(PublishInput(subject, payload), sent)


async def test_a_run_with_a_retry_is_counted(env_factory: Any, meter: Any) -> None:
    provider, reader = meter
    env: LocalEnvironment = await env_factory(
        [tracing_workflows.wf, tracing_workflows.doomed], interceptors=[MetricsInterceptor(provider)]
    )
    handle = await env.client.start("traced", {})
    assert await handle.result() == {"stored": 2}
    failing = await env.client.start("doomed", {})
    with pytest.raises(Exception, match="explode cannot succeed"):
        await failing.result()

    def ended() -> bool:  # the terminal events are published just after the run record is written
        return bool(_count(reader, "flow.runs.completed", workflow="traced")) and bool(
            _count(reader, "flow.runs.failed", workflow="doomed")
        )

    await eventually(ended, message="both runs' ends counted")
    assert _count(reader, "flow.runs.started", workflow="traced") == 1
    assert _count(reader, "flow.runs.started", workflow="doomed") == 1
    assert _count(reader, "flow.runs.completed", workflow="doomed") == 0
    durations = "flow.node.attempt.duration"
    assert _count(reader, durations, workflow="traced", node="fetch", outcome="completed") == 1
    assert _count(reader, durations, workflow="traced", node="enrich", outcome="failed") == 1
    assert _count(reader, durations, workflow="traced", node="enrich", outcome="completed") == 1
    assert _count(reader, durations, workflow="traced", node="store", outcome="completed") == 1
    assert _count(reader, durations, workflow="doomed", node="explode", outcome="failed") == 1
    assert _count(reader, "flow.node.retries", workflow="traced", node="enrich") == 1
    assert _count(reader, "flow.node.retries", workflow="doomed", node="explode") == 0
    in_flight = _points(reader, "flow.node.attempts.in_flight")
    assert len(in_flight) == 4
    assert {point.value for point in in_flight.values()} == {0}
    assert _count(reader, "flow.run.duration", workflow="traced", status="completed") == 1
    (run,) = [p for k, p in _points(reader, "flow.run.duration").items() if ("workflow", "traced") in k]
    assert run.sum >= 0.05  # the retry waited at least its backoff


async def test_run_ends_dead_letters_and_lost_attempts_are_counted_once(meter: Any) -> None:
    provider, reader = meter
    metrics = MetricsInterceptor(provider)
    ended = {"created_at": 100.0, "finished_at": 101.5}
    for _ in range(2):  # a run's end may be announced twice: counted once
        await _publish(metrics, "p.evt.wf.r1._run.cancelled", ended)
    await _publish(metrics, "p.evt.wf.r2._run.failed", {**ended, "error": {"type": "X"}})
    await _publish(metrics, "p.evt.wf._none._trigger.rejected", {"reason": "malformed"})
    await _publish(metrics, "p.evt.wf.r4._dlq.dead_lettered", {"reason": "max_deliveries"})  # in a run
    await _publish(metrics, "p.evt.wf.r3.a.lost", {"attempt": 1})
    await _publish(metrics, "p.evt.wf.r3.a.completed", {"output": 1})  # a node's completion: no run metric
    assert _count(reader, "flow.runs.cancelled", workflow="wf") == 1
    assert _count(reader, "flow.runs.failed", workflow="wf") == 1
    assert _count(reader, "flow.runs.completed", workflow="wf") == 0
    assert _count(reader, "flow.dead_letters", workflow="wf", reason="malformed") == 1
    assert _count(reader, "flow.dead_letters", workflow="wf", reason="max_deliveries") == 1
    assert _count(reader, "flow.node.attempts.lost", workflow="wf", node="a") == 1
    (cancelled,) = [
        p for k, p in _points(reader, "flow.run.duration").items() if ("status", "cancelled") in k
    ]
    assert (cancelled.count, cancelled.sum) == (1, 1.5)


@dataclass(slots=True)
class _Delivered(ExecuteNodeInput):
    """What ``ExecuteNodeInput`` looks like once it carries its message's publication time."""

    published_at: float | None = None


async def test_queue_lag_is_measured_when_the_input_says_when_its_message_was_published(meter: Any) -> None:
    provider, reader = meter
    metrics = MetricsInterceptor(provider)

    async def action(_: Any) -> int:
        return 1

    async def run(input: ExecuteNodeInput) -> Any:
        return await input.action(None)

    common: dict[str, Any] = {"workflow": "wf", "run_id": "r", "node": "a", "context": None, "action": action}
    await metrics.execute_node(ExecuteNodeInput(attempt=1, headers={}, **common), run)
    assert _count(reader, "flow.node.queue_lag", workflow="wf", node="a") == 0
    published = time.time() - 0.25
    await metrics.execute_node(_Delivered(attempt=2, headers={}, published_at=published, **common), run)
    assert _count(reader, "flow.node.queue_lag", workflow="wf", node="a") == 1
    (lag,) = _points(reader, "flow.node.queue_lag").values()
    assert 0.25 <= lag.sum < 5


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


async def test_the_prometheus_endpoint_serves_the_metrics() -> None:
    endpoint = start_prometheus(0, "127.0.0.1")
    provider = MeterProvider(metric_readers=[endpoint.reader], shutdown_on_exit=False)
    try:
        metrics = MetricsInterceptor(provider)
        await _publish(metrics, "p.evt.orders.r1._run.started", {"created_at": 1.0})
        await _publish(metrics, "p.evt.orders.r1._run.completed", {"created_at": 1.0, "finished_at": 2.0})
        text = await asyncio.to_thread(_scrape, endpoint.port)
    finally:
        provider.shutdown()
        endpoint.close()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert any(line.startswith("flow_runs_started_total{") and 'workflow="orders"' in line for line in lines)
    assert any(line.startswith("flow_runs_completed_total{") and line.endswith(" 1.0") for line in lines)
    assert any(line.startswith("flow_run_duration_seconds_bucket{") for line in lines)


async def test_configure_telemetry_serves_metrics_on_the_workers_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_PROMETHEUS_HOST", "127.0.0.1")
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    monkeypatch.delenv("OTEL_METRICS_EXPORTER", raising=False)
    telemetry = configure_telemetry(metrics_port=0, set_global=False)
    assert telemetry is not None
    try:
        assert telemetry.tracer_provider is None
        assert telemetry.prometheus is not None
        (metrics,) = telemetry.interceptors
        assert isinstance(metrics, MetricsInterceptor)
        await _publish(metrics, "p.evt.orders.r1._run.started", {})
        text = await asyncio.to_thread(_scrape, telemetry.prometheus.port)
        assert "flow_runs_started_total{" in text
        assert 'service_name="flow-orchestrator"' in text  # target_info carries the resource
    finally:
        await asyncio.to_thread(telemetry.shutdown)
