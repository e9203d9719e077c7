"""OTLP span encoding: the SDK's encoder against ours (``runtime/_otlp.py``), µs per node-attempt span.

``python -m bench.otlp [--spans 512] [--rounds 20]``: batches of attempt spans as a worker makes them
(one run's trace context, the attempt attributes), encoded by each encoder in alternating rounds; the
median round, per span. Both outputs are checked to decode to the same request first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from opentelemetry import trace as trace_api
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from bench._harness import load1
from flow_orchestrator.runtime._otlp import _Encoder
from flow_orchestrator.runtime._tracing import RunTrace, start_light_span


def attempt_spans(count: int) -> list[ReadableSpan]:
    tracer = TracerProvider().get_tracer("flow_orchestrator")
    scope = InstrumentationScope("flow_orchestrator", "0.1.0")
    spans: list[ReadableSpan] = []
    for i in range(count):
        if i % 20 == 0:  # a new run every 20 steps, as in chain20
            parent = TraceContextTextMapPropagator().extract(
                {"traceparent": f"00-{i + 1:032x}-00f067aa0ba902b7-01"}
            )
            run = RunTrace(parent, trace_api.get_current_span(parent).get_span_context())
            run_id = f"01JRUN{i:020d}"
        attributes: dict[str, Any] = {
            "messaging.system": "nats",
            "workflow": "chain20",
            "run_id": run_id,
            "node": f"s{i % 20}",
            "attempt": 1,
        }
        span = start_light_span(tracer, scope, f"chain20.s{i % 20}", run, attributes)  # type: ignore[arg-type]
        span.set_attribute("outcome", "completed")
        span.end()
        assert isinstance(span, ReadableSpan)
        spans.append(span)
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spans", type=int, default=512, help="spans per batch (the SDK's batch size)")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    spans = attempt_spans(args.spans)
    ours = _Encoder()  # one encoder for every batch, as the exporter keeps one
    if ExportTraceServiceRequest.FromString(ours.request(spans)) != sdk_encode_spans(spans):
        raise AssertionError("the encoders disagree")
    timings: dict[str, list[float]] = {"sdk": [], "flow": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        sdk_encode_spans(spans).SerializeToString()
        middle = time.perf_counter()
        ours.request(spans)
        timings["sdk"].append(middle - start)
        timings["flow"].append(time.perf_counter() - middle)
    per_span = {name: round(statistics.median(t) * 1e6 / args.spans, 1) for name, t in timings.items()}
    print(
        json.dumps(
            {
                "workload": "OTLP encoding of node-attempt spans",
                "us_per_span": per_span,
                "speedup": round(per_span["sdk"] / per_span["flow"], 1),
                "notes": f"{args.spans} spans per batch, median of {args.rounds} rounds; load1={load1():.2f}",
            }
        )
    )


if __name__ == "__main__":
    main()
