"""Tracing overhead on W1 chain20: the same run with tracing off and on (every run sampled unless
``--ratio``; spans exported over OTLP/HTTP to a receiver process that decodes and counts them, as
Jaeger would receive them). ``python -m bench.tracing [--batches 150] [--runs 10] [--ratio 0.1]``.

Two sets of 2 workers, one with tracing off and one with it on, run side by side on one server (each
on its own prefix), and the client alternates short batches of runs between them: on this shared,
noisy 2-core VM, drift over a minute is larger than the effect measured, and alternating batches
cancels it. ``--span-export process`` measures the export process instead of the default, the
SDK's ``BatchSpanProcessor`` in the worker.

``--b-tree PATH`` adds a third set of 2 traced workers whose engine comes from another checkout
(``git worktree add PATH REV``), in the same alternation: two versions of the tracing code are then
compared with each other (``b_over_a``, paired batch by batch) and each with the same untraced
batches, which runs minutes apart cannot do on this VM.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench._harness import (
    ROOT,
    checkout_env,
    cpu_seconds,
    embedded_server,
    event_loop_name,
    load1,
    percentile,
    run,
)
from flow_orchestrator import Client
from flow_orchestrator.testing import eventually

STEPS = 20


class SpanSink(ThreadingHTTPServer):
    """An OTLP/HTTP receiver on loopback that decodes every export and counts spans and traces;
    ``GET /count`` answers ``{"spans": n, "traces": n}``."""

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

    def do_GET(self) -> None:
        with self.server.lock:
            body = json.dumps({"spans": self.server.spans, "traces": len(self.server.traces)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        return


@contextmanager
def sink_process() -> Iterator[tuple[str, int]]:
    """The receiver in its own process, as Jaeger would be: its decoding never takes the client's GIL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.tracing", "--sink"],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().decode().strip(), proc.pid
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)


def sink_counts(endpoint: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{endpoint}/count", timeout=10) as reply:
        return json.loads(reply.read())  # type: ignore[no-any-return]


@contextmanager
def workers(
    url: str, prefix: str, env: dict[str, str], count: int = 2, root: Path = ROOT
) -> Iterator[list[int]]:
    logs = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    tree, child_env = checkout_env(root, env)
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
            procs.append(
                subprocess.Popen(command, env=child_env, cwd=tree, stdout=log, stderr=subprocess.STDOUT)
            )
    try:
        yield [proc.pid for proc in procs]
    finally:
        for proc in procs:
            os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(30)


async def chain_batches(  # noqa: PLR0917 (one call site, each argument named there)
    url: str,
    prefixes: dict[str, str],
    pids: dict[str, list[int]],
    shared: dict[str, int],
    batches: int,
    runs: int,
    warmup: int,
) -> tuple[dict[str, list[list[float]]], dict[str, dict[str, float]]]:
    """Alternate batches of ``runs`` chain20 runs between the modes' workers; each batch's run times
    (ms) by mode, and the CPU seconds used in each mode's batches by its workers, their children
    (an export process) and each of the ``shared`` processes (the server, the span receiver...)."""
    clients = {mode: await Client.connect(url, prefix=prefix) for mode, prefix in prefixes.items()}
    try:
        for client in clients.values():
            await eventually(lambda c=client: c.describe("chain20"), within=60)  # type: ignore[misc]
            await eventually(lambda c=client: _consumers_ready(c), within=60)  # type: ignore[misc]
        samples: dict[str, list[list[float]]] = {mode: [] for mode in clients}
        cpu = {mode: {"worker": 0.0, "exporter": 0.0} | dict.fromkeys(shared, 0.0) for mode in clients}
        # Each order in turn (A B, B A with two modes): every mode is as often first, last or beside
        # each other mode, so none gains from its workers having just run (warm caches) or idled.
        orders = list(itertools.permutations(clients))
        for batch in range(batches):
            order = orders[batch % len(orders)]
            for mode in order:
                skip = warmup if batch == 0 else 0
                samples[mode].append([])
                used = _cpu_now(pids[mode], shared)
                for i in range(runs + skip):
                    start = time.perf_counter()
                    result = await clients[mode].run("chain20", {})
                    if result != {"k": STEPS - 1, "acc": STEPS}:
                        raise AssertionError(f"wrong chain20 result: {result}")
                    if i >= skip:
                        samples[mode][-1].append((time.perf_counter() - start) * 1000)
                if batch:  # the first batch pays for start-up (the export process's imports, warm-up)
                    for whose, spent in _cpu_now(pids[mode], shared).items():
                        cpu[mode][whose] += spent - used[whose]
        return samples, cpu
    finally:
        for client in clients.values():
            await client.close()


def _cpu_now(workers: list[int], shared: dict[str, int]) -> dict[str, float]:
    own, children = cpu_seconds(workers)
    return {"worker": own, "exporter": children} | {
        name: cpu_seconds([pid])[0] for name, pid in shared.items()
    }


async def _consumers_ready(client: Client) -> bool:
    infos = await client.bus.js.consumers_info(client.names.events_stream)
    return len(infos) >= STEPS + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    # 150 batches take about 80 s here; 20-30 (15-20 s) swung by 20 points between runs on this VM.
    parser.add_argument("--batches", type=int, default=150, help="batches per mode, alternating")
    parser.add_argument("--runs", type=int, default=10, help="runs per batch")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ratio", type=float, help="sample this fraction of runs (default: every run)")
    parser.add_argument("--span-export", choices=("process", "thread"), default="thread")
    parser.add_argument("--b-tree", type=Path, help="also run traced workers from this checkout (mode on_b)")
    parser.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink = SpanSink()
        print(sink.endpoint, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        sink.serve_forever()
        return
    with sink_process() as (endpoint, sink_pid), embedded_server() as server:
        traced = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_SERVICE_NAME": "bench-worker",
            "FLOW_SPAN_EXPORT": args.span_export,
        }
        if args.ratio is not None:
            traced |= {
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(args.ratio),
            }
        sampling = "every run sampled" if args.ratio is None else f"{args.ratio:.0%} of runs sampled"
        modes = ("off", "on", "on_b") if args.b_tree else ("off", "on")
        prefixes = {mode: f"tr{mode.replace('_', '')}{uuid.uuid4().hex[:6]}" for mode in modes}
        with (
            workers(server.url, prefixes["off"], {"OTEL_TRACES_EXPORTER": "none"}) as plain,
            workers(server.url, prefixes["on"], traced) as traced_pids,
            contextlib.ExitStack() as more,
        ):
            pids = {"off": plain, "on": traced_pids}
            if args.b_tree:
                pids["on_b"] = more.enter_context(
                    workers(server.url, prefixes["on_b"], traced, root=args.b_tree.resolve())
                )
            shared = {"server": server.pid or 0, "receiver": sink_pid, "client": os.getpid()}
            samples, cpu = run(
                chain_batches(server.url, prefixes, pids, shared, args.batches, args.runs, args.warmup)
            )
        counts = sink_counts(endpoint)  # workers flush their spans when they stop (SIGTERM)
    every = {mode: [ms for batch in batches for ms in batch] for mode, batches in samples.items()}
    off, on = statistics.median(every["off"]), statistics.median(every["on"])
    # Each batch of traced runs against the untraced batch beside it: drift cancels out in the pair.
    paired = _paired(samples["on"], samples["off"])
    runs_traced = (args.batches * args.runs + args.warmup) * (len(modes) - 1)
    line: dict[str, Any] = {
        "system": "flow-orchestrator",
        "workload": "W1 chain20 tracing overhead",
        "per_step_ms_tracing_off": round(off / STEPS, 3),
        "per_step_ms_tracing_on": round(on / STEPS, 3),
        "overhead_pct": round((on - off) / off * 100, 1),
        "paired_overhead_pct": round((statistics.median(paired) - 1) * 100, 1),
        "paired_overhead_quartiles_pct": [round((q - 1) * 100, 1) for q in statistics.quantiles(paired, n=4)],
        "p90_ms": {mode: round(percentile(values, 0.9), 2) for mode, values in every.items()},
        "runs_per_mode": len(every["on"]),
        # CPU per step (after the first batch) of the workers, their span-export children, the
        # server, the span receiver and this client: where the traced batches' extra work lands
        **{
            f"{whose}_cpu_ms_per_step": {
                mode: round(used[whose] * 1000 / (len(every[mode]) - args.runs) / STEPS, 3)
                for mode, used in cpu.items()
            }
            for whose in cpu["off"]
        },
        "spans_received": counts["spans"],
        "traces_received": counts["traces"],
        "runs_traced": runs_traced,
        **(_b_figures(samples, args.b_tree) if args.b_tree else {}),
        "notes": (
            f"1 server, replicas=1, file storage, 2 worker processes per mode (flowctl worker), "
            f"{event_loop_name()}; {sampling}, span export: {args.span_export}, OTLP/HTTP "
            f"({os.environ.get('FLOW_OTLP_EXPORTER') or 'flow'} exporter) to a receiver "
            f"process; {args.batches} alternating batches of {args.runs} runs; load1={load1():.2f}"
        ),
    }
    print(json.dumps(line))


def _paired(a: list[list[float]], b: list[list[float]]) -> list[float]:
    """Each batch of ``a`` against the batch of ``b`` beside it: drift cancels out in the pair."""
    return [statistics.median(x) / statistics.median(y) for x, y in zip(a, b, strict=True)]


def _b_figures(samples: dict[str, list[list[float]]], b_tree: Path) -> dict[str, Any]:
    """The B tree's traced workers against the untraced ones and against A's traced ones."""
    on_b = statistics.median(ms for batch in samples["on_b"] for ms in batch)
    off = statistics.median(ms for batch in samples["off"] for ms in batch)
    b_over_a = _paired(samples["on_b"], samples["on"])
    b_over_off = statistics.median(_paired(samples["on_b"], samples["off"]))
    return {
        "b_tree": b_tree.name,
        "per_step_ms_tracing_on_b": round(on_b / STEPS, 3),
        "overhead_pct_b": round((on_b - off) / off * 100, 1),
        "paired_overhead_pct_b": round((b_over_off - 1) * 100, 1),
        "b_over_a_paired": round(statistics.median(b_over_a), 4),
        "b_over_a_quartiles": [round(q, 4) for q in statistics.quantiles(b_over_a, n=4)],
    }


if __name__ == "__main__":
    main()
