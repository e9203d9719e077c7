"""Worker memory under churn: what a worker keeps after serving many finished runs.

``python -m bench.churn [--workload fan100] [--runs 5000] [--parallel 16]``

``bench.memory`` holds 10,000 runs in one slow node; this one lets runs finish, many at a time, and
reads each worker's RSS after a warm-up and after ``--runs`` more, on one server with 2 workers.
Whatever a worker keeps per finished run (a cache that outlives its use, a record never dropped)
shows as growth per run. It found the fifth session's join-record bug: a worker kept every decided
join's record, 28 KB per fan100 run, until 4,096 newer joins pushed it out. Prints one JSON line and
writes it to ``bench/results/churn-<time>.jsonl``. Not part of ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid

from bench._harness import (
    embedded_server,
    engine_revision,
    event_loop_name,
    load1,
    run,
    worker_processes,
    write_results,
)
from bench._measure import EXPECTED, WrongResult
from bench.memory import rss_mb
from flow_orchestrator import Client

WARM_UP = 50


async def churn(
    url: str, prefix: str, workflow: str, *, runs: int, parallel: int, pids: list[int]
) -> dict[str, object]:
    client = await Client.connect(url, prefix=prefix)
    expected = EXPECTED[workflow](0)
    limit = asyncio.Semaphore(parallel)

    async def one() -> None:
        async with limit:
            output = await client.run(workflow, {})
        if output != expected:
            raise WrongResult(f"{workflow} returned {output!r}, expected {expected!r}")

    try:
        await asyncio.gather(*(one() for _ in range(WARM_UP)))
        warm = [rss_mb(pid) for pid in pids]
        started = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(runs)))
        took = time.perf_counter() - started
        after = [rss_mb(pid) for pid in pids]
    finally:
        await client.close()
    growth = [(a - w) * 1024 / runs for w, a in zip(warm, after, strict=True)]
    return {
        "worker_rss_mb_after_warm_up": [round(mb, 1) for mb in warm],
        "worker_rss_mb_after_runs": [round(mb, 1) for mb in after],
        "kb_per_run": [round(kb, 2) for kb in growth],
        "runs_per_s": round(runs / took, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=("chain20", "fan100", "io50"), default="fan100")
    parser.add_argument("--runs", type=int, default=5000, help="runs after the warm-up")
    parser.add_argument("--parallel", type=int, default=16, help="runs in flight at once")
    args = parser.parse_args()
    prefix = f"churn{uuid.uuid4().hex[:6]}"
    with (
        embedded_server() as server,
        worker_processes(server.url, f"bench.workloads:{args.workload}", prefix, 2) as workers,
    ):
        pids = [worker.pid for worker in workers]
        found = run(
            churn(server.url, prefix, args.workload, runs=args.runs, parallel=args.parallel, pids=pids)
        )
    line = {
        "system": "flow-orchestrator",
        "workload": f"churn {args.workload}",
        "runs": args.runs,
        **found,
        "notes": (
            f"1 server, replicas=1, file storage, 2 worker processes (Worker defaults), {event_loop_name()};"
            f" {args.runs} runs after {WARM_UP} of warm-up, {args.parallel} in flight; {engine_revision()};"
            f" load1={load1():.2f}"
        ),
    }
    print(json.dumps(line))
    print(f"results: {write_results('churn', [line])}")


if __name__ == "__main__":
    main()
