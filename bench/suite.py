"""The benchmark suite of BENCH-SPEC: W1 chain20, W2 fan100, W3 diamond500, W4 io50 on one server
(replicas 1) and on a 3-node cluster (replicas 3), beside two floors measured in the same run: the raw
JetStream hop and the in-process asyncio floor. ``python -m bench.suite [--quick] [--no-cluster]``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import workloads
from bench._floor import AsyncioFloor
from bench._harness import (
    RESULTS,
    ROOT,
    CpuMeter,
    Deployment,
    WorkerProcess,
    deployment,
    engine_revision,
    event_loop_name,
    raw_hop_ms,
    result_line,
    run,
    settle,
    worker_processes,
    write_results,
)
from bench._measure import FULL, QUICK, Workload, measure
from bench._report import Row, chart, table, targets, targets_text
from flow_orchestrator import Client, RunFailed, StorageSettings, Worker

CHART = ROOT / "docs" / "img" / "bench.png"


async def measure_deployment(
    dep: Deployment,
    prefix: str,
    specs: tuple[Workload, ...],
    workers: list[WorkerProcess],
    *,
    run_timeout: float,
    engine: str,
) -> tuple[list[Row], list[dict[str, Any]]]:
    """The raw hop, then each workload; a result line is made as each ends, so its load figure and
    the count of errors the workers logged belong to that workload."""
    hop = await raw_hop_ms(dep.url, replicas=dep.replicas)
    client = await Client.connect(dep.url, prefix=prefix, storage=StorageSettings(replicas=dep.replicas))

    async def run_on_engine(workflow: str, input: Any) -> Any:
        # client.run(), as a user submits and waits: it listens for the run's end before publishing
        # the trigger, so it makes no lookups while the run starts (start() + result() must).
        try:
            async with asyncio.timeout(run_timeout):
                return await client.run(workflow, input)
        except TimeoutError:
            raise TimeoutError(
                f"a {workflow} run had no result after {run_timeout} s ({dep.description}); "
                f"`flowctl runs` lists it"
            ) from None
        except RunFailed as exc:
            # A failed run is an error, not a data point: leave its journal for whoever looks into it.
            run_id = getattr(exc.status, "run_id", "?")
            events = await client.journal(run_id, workflow)
            print(f"journal of failed run {run_id}:", file=sys.stderr)
            for event in events:
                print(f"  {event['node']} {event['kind']} {event.get('data')!s:.300}", file=sys.stderr)
            raise

    config = (
        f"{dep.description}, {len(workers)} worker processes ({_worker_defaults()}), "
        f"client and workers on {event_loop_name()}"
    )
    rows, lines = [], []
    errors_before = sum(w.log_errors() for w in workers)
    try:
        for spec in specs:
            meter = CpuMeter(dep.server_pids, [w.pid for w in workers])
            m = await measure(run_on_engine, spec)
            cpu = meter.ms_per(spec.steps * (spec.warmup + spec.runs))  # warm-up runs included
            errors = sum(w.log_errors() for w in workers)
            notes = config + (
                f"; workers logged {errors - errors_before} tracebacks" if errors > errors_before else ""
            )
            errors_before = errors
            rows.append(Row(dep.name, m, hop, cpu))
            lines.append(
                result_line(
                    m.workload.id,
                    m.samples_ms,
                    notes,
                    engine=engine,
                    raw_hop_ms=round(hop, 4),
                    cpu_ms_per_step=cpu,
                    **m.spec_fields(),
                )
            )
    finally:
        await client.close()
    return rows, lines


async def measure_floor(specs: tuple[Workload, ...]) -> tuple[list[Row], list[dict[str, Any]]]:
    floor = AsyncioFloor(workloads.all_workflows)
    notes = f"in-process asyncio runner: no bus, no persistence, 1 process, {event_loop_name()}"
    rows, lines = [], []
    for spec in specs:
        m = await measure(floor.run, spec)
        rows.append(Row("asyncio-floor", m))
        lines.append(
            result_line(m.workload.id, m.samples_ms, notes, system="asyncio-floor", **m.spec_fields())
        )
    return rows, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="few runs, to check the suite works")
    parser.add_argument(
        "--cluster", action=argparse.BooleanOptionalAction, default=True, help="also the 3-node cluster"
    )
    parser.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    parser.add_argument("--run-timeout", type=float, default=120.0, help="seconds; a late run is an error")
    parser.add_argument("--out", type=Path, help="results directory (default bench/results; a temp dir)")
    parser.add_argument("--chart", type=Path, help="chart path (default docs/img/bench.png)")
    args = parser.parse_args()
    specs = QUICK if args.quick else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="bench-quick-")) if args.quick else RESULTS)
    chart_path = args.chart or (out / "bench.png" if args.quick else CHART)
    load_before = os.getloadavg()

    rows: list[Row] = []
    lines: list[dict[str, Any]] = []
    engines: set[str] = set()
    for cluster in (False, True) if args.cluster else (False,):
        prefix = f"b{uuid.uuid4().hex[:6]}"
        engine = engine_revision()  # the code the workers are about to import
        engines.add(engine)
        with (
            deployment(cluster) as dep,
            _settled(dep, prefix),
            worker_processes(
                dep.url, "bench.workloads:all_workflows", prefix, args.workers, replicas=dep.replicas
            ) as workers,
        ):
            try:
                found_rows, found_lines = run(
                    measure_deployment(
                        dep, prefix, specs, workers, run_timeout=args.run_timeout, engine=engine
                    )
                )
            finally:
                _report_worker_errors(dep, workers)
        rows += found_rows
        lines += found_lines
    rows_floor, lines_floor = run(measure_floor(specs))
    rows += rows_floor
    lines += lines_floor

    engines.add(engine_revision())
    if len(engines) > 1:
        print(f"WARNING: the engine changed during the suite ({', '.join(sorted(engines))}): rerun it")
    path = write_results("suite", lines, out)
    print(table(rows))
    print()
    print(targets_text(targets(rows)))
    print()
    print(f"results: {path}")
    try:
        print(f"chart: {chart(rows, chart_path)}")
    except ImportError:
        print("chart: skipped (matplotlib is not installed: pip install matplotlib)")
    load_after = os.getloadavg()
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + "; after "
        + ", ".join(f"{x:.2f}" for x in load_after)
    )


def _worker_defaults() -> str:
    parameters = inspect.signature(Worker).parameters
    return ", ".join(f"{name}={parameters[name].default}" for name in ("concurrency", "max_in_flight"))


@contextlib.contextmanager
def _settled(dep: Deployment, prefix: str) -> Iterator[None]:
    run(settle(dep.url, prefix, dep.replicas))
    yield


def _report_worker_errors(dep: Deployment, workers: list[WorkerProcess]) -> None:
    for worker in workers:
        errors = worker.log_errors()
        if errors:
            print(f"WARNING: {dep.name}: worker {worker.pid} printed {errors} tracebacks: {worker.log}")


if __name__ == "__main__":
    main()
