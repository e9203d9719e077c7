"""Benchmark plumbing: an embedded server, worker subprocesses stopped by PID, the raw-hop floor,
statistics and the JSON line format of BENCH-SPEC."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from flow_orchestrator.bus import EmbeddedServer

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def event_loop_name() -> str:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(coro: Any) -> Any:
    """Run the benchmark's coroutine on uvloop when installed, as workers do."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@contextmanager
def embedded_server() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def worker_processes(
    url: str, target: str, prefix: str, count: int
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` worker subprocesses hosting ``target``; stopped with SIGTERM by PID afterwards."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bench._worker", url, target, prefix],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(count)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().decode()
            if "ready" not in line:
                raise RuntimeError(f"worker failed to start: {line}{proc.stdout.read().decode()}")
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


async def raw_hop_ms(url: str, hops: int = 20, rounds: int = 40) -> float:
    """The floor: the median cost of one JetStream hop (publish with ack, push delivery to another
    connection, ack, publish the next), the least any durable step on this bus can cost."""
    pub = await nats.connect(url)
    sub_conn = await nats.connect(url)
    js, sjs = pub.jetstream(), sub_conn.jetstream()
    stream = f"HOP{uuid.uuid4().hex[:6].upper()}"
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"], storage=StorageType.FILE))
    done: asyncio.Queue[float] = asyncio.Queue()

    async def relay(msg: Any) -> None:
        n = int(msg.subject.rsplit(".", 1)[1])
        await msg.ack()
        if n + 1 < hops:
            await sjs.publish(f"{stream}.hop.{n + 1}", b"x")
        else:
            done.put_nowait(time.perf_counter())

    await sjs.subscribe(
        f"{stream}.hop.*",
        durable="relay",
        cb=relay,
        manual_ack=True,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT),
    )
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        await js.publish(f"{stream}.hop.0", b"x")
        end = await done.get()
        samples.append((end - start) / hops * 1000)
    await js.delete_stream(stream)
    await pub.close()
    await sub_conn.close()
    return statistics.median(samples)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def load1() -> float:
    return os.getloadavg()[0]


def result_line(workload: str, samples_ms: list[float], notes: str, **extra: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "system": "flow-orchestrator",
        "workload": workload,
        "median_ms": round(statistics.median(samples_ms), 3),
        "p90_ms": round(percentile(samples_ms, 0.9), 3),
        "min_ms": round(min(samples_ms), 3),
        "runs": len(samples_ms),
    }
    line.update(extra)
    line["notes"] = f"{notes}; python {platform.python_version()}; load1={load1():.2f}"
    return line


def write_results(name: str, lines: list[dict[str, Any]]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(lines, indent=2) + "\n")
    return path
