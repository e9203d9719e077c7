"""The memory figure: one worker process holding 10,000 runs in flight on one node (the ``hold``
workflow: ``first`` returns at once, ``slow`` sleeps 120 s), its RSS, and each run's footprint in the
KV bucket and the streams. ``python -m bench.memory [--runs 10000] [--no-default]``.

Two settings: actor concurrency and the worker's max in flight raised to the run count (every run
really in its action at once), and the Worker's defaults, where back-pressure leaves the rest in
JetStream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench._harness import (
    WorkerProcess,
    embedded_server,
    engine_revision,
    event_loop_name,
    load1,
    run,
    worker_processes,
    write_results,
)
from flow_orchestrator import Client
from flow_orchestrator.bus import Names

WORKFLOW = "hold"
TARGET_MB = 150.0  # issue 5: worker memory with TARGET_RUNS runs in flight
TARGET_RUNS = 10_000


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Counter:
    """Counts journal events of one kind for the held node, as the client sees them."""

    value: int = 0

    async def on_message(self, msg: Any) -> None:
        self.value += 1


async def start_runs(client: Client, runs: int, parallel: int = 200) -> float:
    slots = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with slots:
            await client.start(WORKFLOW, {"i": i})

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(runs)))
    return time.perf_counter() - start


async def wait_steady(counter: Counter, goal: int, quiet: float, limit: float) -> float:
    """Wait until ``goal`` events were seen, or none arrived for ``quiet`` seconds; return the wait."""
    start = last_change = time.monotonic()
    seen = counter.value
    while counter.value < goal and time.monotonic() - start < limit:
        await asyncio.sleep(0.2)
        if counter.value != seen:
            seen, last_change = counter.value, time.monotonic()
        elif time.monotonic() - last_change > quiet:
            break
    return time.monotonic() - start


async def measure(
    url: str, prefix: str, worker: WorkerProcess, runs: int, observe: float, *, quiet: float = 5.0
) -> dict[str, Any]:
    names = Names(prefix)
    idle = rss_mb(worker.pid)
    client = await Client.connect(url, prefix=prefix)
    started, lost = Counter(), Counter()
    nc = client.bus.nc
    await nc.subscribe(names.event(WORKFLOW, "*", "slow", "started"), cb=started.on_message)
    await nc.subscribe(names.event(WORKFLOW, "*", "slow", "lost"), cb=lost.on_message)
    try:
        submit_s = await start_runs(client, runs)
        waited = await wait_steady(started, runs, quiet=quiet, limit=600.0)
        await nc.flush()
        result: dict[str, Any] = {
            "runs_started": runs,
            "submit_s": round(submit_s, 2),
            "in_flight_after_s": round(submit_s + waited, 1),
            "slow_started": started.value,
            "worker_rss_idle_mb": round(idle, 1),
            "worker_rss_mb": round(rss_mb(worker.pid), 1),
            **await _bus_state(client, names, runs),
        }
        result["kb_per_run_in_worker"] = round(
            (result["worker_rss_mb"] - idle) * 1024 / max(1, started.value), 2
        )
        if observe > 0:
            # Past the ack wait (30 s): are the runs held outside the actions delivered again?
            await asyncio.sleep(observe)
            later = await _bus_state(client, names, runs)
            result["after_observe"] = {
                "seconds": observe,
                "slow_started": started.value,
                "slow_lost_events": lost.value,
                "worker_rss_mb": round(rss_mb(worker.pid), 1),
                "consumer": later["consumer"],
            }
        return result
    finally:
        await client.close()


async def _bus_state(client: Client, names: Names, runs: int) -> dict[str, Any]:
    js = client.bus.js
    consumer = await js.consumer_info(names.events_stream, names.node_consumer(WORKFLOW, "slow"))
    streams = {
        "kv": f"KV_{names.state_bucket}",
        "events": names.events_stream,
        "triggers": names.triggers_stream,
    }
    per_run = {}
    for label, stream in streams.items():
        info = await js.stream_info(stream)
        per_run[f"{label}_bytes_per_run"] = round((info.state.bytes or 0) / runs, 1)
    return {
        **per_run,
        "consumer": {
            "max_ack_pending": consumer.config.max_ack_pending,
            "num_ack_pending": consumer.num_ack_pending,
            "num_pending": consumer.num_pending,
            "num_redelivered": consumer.num_redelivered,
        },
    }


def one_setting(runs: int, raised: bool, observe: float, allocations: Path | None = None) -> dict[str, Any]:
    """``raised``: actor concurrency and the worker's max in flight both set to ``runs``; otherwise
    the Worker's defaults."""
    limit = runs if raised else None
    prefix = f"m{uuid.uuid4().hex[:6]}"
    with (
        embedded_server() as server,
        worker_processes(
            server.url,
            "bench.workloads:hold",
            prefix,
            1,
            concurrency=limit,
            max_in_flight=limit,
            kill=True,
            env={"BENCH_TRACEMALLOC": str(allocations)} if allocations else None,
        ) as workers,
    ):
        # Traced, the worker runs several times slower: give it time to reach the steady state.
        quiet = 30.0 if allocations else 5.0
        result = run(measure(server.url, prefix, workers[0], runs, observe, quiet=quiet))
        if allocations:
            _dump_allocations(workers[0], allocations)
        result["worker_tracebacks"] = workers[0].log_errors()
    setting = f"concurrency={runs}, max_in_flight={runs}" if raised else "Worker defaults"
    result["worker_setting"] = setting
    result["notes"] = (
        f"1 server, replicas=1, file storage, 1 worker process ({setting}), {event_loop_name()}; "
        f"{engine_revision()}; load1={load1():.2f}"
    )
    return result


def _dump_allocations(worker: WorkerProcess, path: Path) -> None:
    path.unlink(missing_ok=True)
    os.kill(worker.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"worker {worker.pid} wrote no allocation report to {path}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=TARGET_RUNS)
    parser.add_argument(
        "--default",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure with the Worker defaults (concurrency 256, max_in_flight 1024)",
    )
    parser.add_argument(
        "--observe",
        type=float,
        default=45.0,
        help="seconds to watch the default setting past the 30 s ack wait",
    )
    parser.add_argument(
        "--allocations",
        type=Path,
        help="trace the worker's allocations (slower, bigger) and write the largest sites here",
    )
    args = parser.parse_args()
    lines = [
        {
            "system": "flow-orchestrator",
            "workload": f"memory hold{args.runs}",
            **one_setting(args.runs, raised=True, observe=0.0, allocations=args.allocations),
        }
    ]
    if args.default:
        lines.append(
            {
                "system": "flow-orchestrator",
                "workload": f"memory hold{args.runs} default",
                **one_setting(args.runs, raised=False, observe=args.observe),
            }
        )
    for line in lines:
        print(json.dumps(line))
    raised = lines[0]
    met = raised["slow_started"] == TARGET_RUNS and raised["worker_rss_mb"] <= TARGET_MB
    verdict = ("met" if met else "NOT met") if args.runs == TARGET_RUNS else "no verdict"
    print(
        f"{verdict}: worker RSS {raised['worker_rss_mb']} MB with {raised['slow_started']} runs in flight "
        f"(target: <= {TARGET_MB:.0f} MB with {TARGET_RUNS:,} runs in flight)"
    )
    if args.allocations:
        print(f"allocations (tracemalloc, raised setting): {args.allocations}")
        print(args.allocations.read_text())
        return  # traced figures are inflated by tracemalloc: not a result
    print(f"results: {write_results('memory', lines)}")


if __name__ == "__main__":
    main()
