"""The four BENCH-SPEC workloads as measurements over any way of running a workflow (the engine
through a client, or the in-process asyncio floor). Every final output is checked."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

# Runs workflow ``name`` on ``input`` and returns its final output.
Runner = Callable[[str, Any], Awaitable[Any]]


class WrongResult(AssertionError):
    """A run returned something other than the workload's expected output: an error, not a data point."""


@dataclass(frozen=True, slots=True)
class Workload:
    id: str
    workflow: str
    steps: int
    warmup: int
    runs: int
    batch: bool = False
    sleep_ms: float = 0.0  # time the steps must spend waiting on purpose (W4)

    def input(self, i: int) -> Any:
        return {"x": i} if self.batch else {}

    def expected(self, i: int) -> Any:
        return EXPECTED[self.workflow](i)


EXPECTED: dict[str, Callable[[int], Any]] = {
    "chain20": lambda i: {"k": 19, "acc": 20},
    "fan100": lambda i: {"sum": 4950, "count": 100},
    "diamond4": lambda x: {"d": 2 * x + 3},
    "io50": lambda i: {"count": 50},
}

# Warm-up and measured counts of BENCH-SPEC; for W3 they are batch sizes.
FULL = (
    Workload("W1 chain20", "chain20", 20, warmup=3, runs=20),
    Workload("W2 fan100", "fan100", 102, warmup=2, runs=10),
    Workload("W3 diamond500", "diamond4", 4, warmup=20, runs=500, batch=True),
    Workload("W4 io50", "io50", 52, warmup=1, runs=7, sleep_ms=50.0),
)
QUICK = (
    Workload("W1 chain20", "chain20", 20, warmup=1, runs=5),
    Workload("W2 fan100", "fan100", 102, warmup=1, runs=3),
    Workload("W3 diamond500", "diamond4", 4, warmup=20, runs=100, batch=True),
    Workload("W4 io50", "io50", 52, warmup=1, runs=3, sleep_ms=50.0),
)


@dataclass(frozen=True, slots=True)
class Measurement:
    """What one workload measured: latencies in ms (W3: per-run completion from batch start)."""

    workload: Workload
    samples_ms: list[float]
    total_s: float

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def throughput_runs_s(self) -> float:
        return len(self.samples_ms) / self.total_s

    @property
    def steps_s(self) -> float:
        return self.workload.steps * self.throughput_runs_s

    @property
    def overhead_per_step_ms(self) -> float:
        """W3: wall-clock per node execution over the batch; others: the median run's time beyond
        its deliberate waits, spread over its steps (parallel steps share it)."""
        if self.workload.batch:
            return self.total_s * 1000 / (self.workload.steps * len(self.samples_ms))
        return (self.median_ms - self.workload.sleep_ms) / self.workload.steps

    def spec_fields(self) -> dict[str, Any]:
        """The workload-specific fields of the BENCH-SPEC line."""
        fields: dict[str, Any] = {
            "throughput_runs_s": round(self.throughput_runs_s, 2),
            "steps_s": round(self.steps_s, 1),
        }
        if self.workload.workflow == "chain20":
            fields["per_step_ms"] = round(self.median_ms / self.workload.steps, 3)
        if self.workload.batch:
            fields["total_s"] = round(self.total_s, 4)
        return fields


async def _checked(run: Runner, workload: Workload, i: int) -> None:
    result = await run(workload.workflow, workload.input(i))
    expected = workload.expected(i)
    if result != expected:
        raise WrongResult(f"{workload.id} run {i}: expected {expected}, got {result}")


async def sequential(run: Runner, workload: Workload) -> Measurement:
    """Warm-up runs, then measured runs, each started after the previous one's result was seen."""
    for i in range(workload.warmup):
        await _checked(run, workload, i)
    samples = []
    for i in range(workload.runs):
        start = time.perf_counter()
        await _checked(run, workload, i)
        samples.append((time.perf_counter() - start) * 1000)
    return Measurement(workload, samples, sum(samples) / 1000)


async def batch(run: Runner, workload: Workload) -> Measurement:
    """A warm-up batch, then the measured batch: every run submitted at once; each run's completion
    time is taken from the batch's start."""

    async def one(i: int, start: float) -> float:
        await _checked(run, workload, i)
        return (time.perf_counter() - start) * 1000

    start = time.perf_counter()
    await asyncio.gather(*(one(i, start) for i in range(workload.warmup)))
    start = time.perf_counter()
    samples = await asyncio.gather(*(one(i, start) for i in range(workload.runs)))
    total = time.perf_counter() - start
    return Measurement(workload, list(samples), total)


async def measure(run: Runner, workload: Workload) -> Measurement:
    return await (batch if workload.batch else sequential)(run, workload)
