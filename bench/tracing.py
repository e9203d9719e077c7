"""Tracing overhead on W1 chain20: the same run with tracing off and on (every run sampled unless
``--ratio``; spans exported over OTLP/HTTP to a local receiver that decodes and counts them, as
Jaeger would receive them). ``python -m bench.tracing [--runs 20] [--rounds 2] [--ratio 0.1]``.
Rounds alternate off/on to spread drift.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench._harness import ROOT, embedded_server, event_loop_name, load1, run
from flow_orchestrator import Client
from flow_orchestrator.testing import eventually

STEPS = 20


class SpanSink(ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback that decodes every export and counts spans and traces."""

    def __init__(self) -> None:
        self.spans = 0
        self.traces: set[bytes] = set()
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: SpanSink

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource in request.resource_spans:
                for scope in resource.scope_spans:
                    self.server.spans += len(scope.spans)
                    self.server.traces.update(span.trace_id for span in scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return


@contextmanager
def workers(url: str, prefix: str, env: dict[str, str], count: int = 2) -> Iterator[None]:
    logs = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    child_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    command = [
        sys.executable,
        "-m",
        "flow_orchestrator.runtime._cli",
        "worker",
        "bench.workloads:chain20",
        "--nats",
        url,
        "--prefix",
        prefix,
        "--log-level",
        "WARNING",
    ]
    procs = []
    for i in range(count):
        with (logs / f"worker-{i}.log").open("wb") as log:
            procs.append(subprocess.Popen(command, env=child_env, stdout=log, stderr=subprocess.STDOUT))
    try:
        yield
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


async def chain_samples(url: str, prefix: str, warmup: int, runs: int) -> list[float]:
    client = await Client.connect(url, prefix=prefix)
    try:
        await eventually(lambda: client.describe("chain20"), within=60)
        await eventually(lambda: _consumers_ready(client), within=60)
        samples = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            result = await client.run("chain20", {})
            if result != {"k": STEPS - 1, "acc": STEPS}:
                raise AssertionError(f"wrong chain20 result: {result}")
            if i >= warmup:
                samples.append((time.perf_counter() - start) * 1000)
        return samples
    finally:
        await client.close()


async def _consumers_ready(client: Client) -> bool:
    infos = await client.bus.js.consumers_info(client.names.events_stream)
    return len(infos) >= STEPS + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ratio", type=float, help="sample this fraction of runs (default: every run)")
    args = parser.parse_args()
    sink = SpanSink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    traced = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint,
        "OTEL_SERVICE_NAME": "bench-worker",
    }
    if args.ratio is not None:
        traced |= {
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": str(args.ratio),
        }
    sampling = "every run sampled" if args.ratio is None else f"{args.ratio:.0%} of runs sampled"
    medians: dict[str, list[float]] = {"off": [], "on": []}
    with embedded_server() as server:
        for _ in range(args.rounds):
            for mode, env in (("off", {"OTEL_TRACES_EXPORTER": "none"}), ("on", traced)):
                prefix = f"tr{uuid.uuid4().hex[:6]}"
                with workers(server.url, prefix, env):
                    samples = run(chain_samples(server.url, prefix, args.warmup, args.runs))
                medians[mode].append(statistics.median(samples))
    time.sleep(1.0)  # workers flush their spans when they stop (SIGTERM): the last ones are in
    sink.shutdown()
    off, on = statistics.median(medians["off"]), statistics.median(medians["on"])
    runs_traced = args.rounds * (args.warmup + args.runs)
    line = {
        "system": "flow-orchestrator",
        "workload": "W1 chain20 tracing overhead",
        "per_step_ms_tracing_off": round(off / STEPS, 3),
        "per_step_ms_tracing_on": round(on / STEPS, 3),
        "overhead_pct": round((on - off) / off * 100, 1),
        "round_medians_ms": medians,
        "spans_received": sink.spans,
        "traces_received": len(sink.traces),
        "runs_traced": runs_traced,
        "notes": (
            f"1 server, replicas=1, file storage, 2 worker processes (flowctl worker), {event_loop_name()}; "
            f"{sampling}, OTLP/HTTP batch export to a local receiver; load1={load1():.2f}"
        ),
    }
    print(json.dumps(line))


if __name__ == "__main__":
    main()
