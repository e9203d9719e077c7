"""Paired A/B: two worker configurations on one server, measured side by side.

``python -m bench.ab WORKLOAD [--batches 16] [--runs N] [--a KEY=VALUE ...] [--b KEY=VALUE ...]
[--b-tree PATH]``, WORKLOAD one of chain20, fan100, io50.

Two sets of 2 worker processes, A and B, each on its own prefix, share one nats-server, and the
client alternates short batches of sequential runs between them (A B, then B A, ...). On this
shared 2-core VM the drift over a minute is larger than most effects worth measuring; alternating
batches puts it on both sides alike, so B/A means something where two suite runs an hour apart do
not. A and B differ by ``Worker`` arguments (``--a announce_starts_after=0``) or by the engine
itself: ``--b-tree PATH`` runs B's workers from another checkout (``git worktree add PATH REV``).
Every run's output is checked. Prints both medians and B/A, then one JSON line; ``--out DIR``
also writes it to ``DIR/ab-<time>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

from bench._harness import embedded_server, percentile, result_line, run, worker_processes, write_results
from bench._measure import EXPECTED, WrongResult
from bench._worker import worker_options
from flow_orchestrator import Client

RUNS_PER_BATCH = {"chain20": 10, "fan100": 10, "io50": 5}


async def measure(url: str, workflow: str, prefixes: dict[str, str], batches: int, runs: int) -> Any:
    clients = {side: await Client.connect(url, prefix=prefix) for side, prefix in prefixes.items()}
    samples: dict[str, list[float]] = {side: [] for side in clients}
    expected = EXPECTED[workflow](0)

    async def one(side: str) -> float:
        start = time.perf_counter()
        output = await clients[side].run(workflow, {})
        took = (time.perf_counter() - start) * 1000
        if output != expected:
            raise WrongResult(f"{workflow} on {side} returned {output!r}, expected {expected!r}")
        return took

    try:
        for side in clients:  # warm-up, not timed
            for _ in range(3):
                await one(side)
        for batch in range(batches):
            for side in ("A", "B") if batch % 2 == 0 else ("B", "A"):
                samples[side].extend([await one(side) for _ in range(runs)])
    finally:
        for client in clients.values():
            await client.close()
    return samples


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("workload", choices=sorted(RUNS_PER_BATCH))
    parser.add_argument("--batches", type=int, default=16, help="batches per side, alternating")
    parser.add_argument("--runs", type=int, help="runs per batch (default: 10; io50: 5)")
    for side in ("a", "b"):
        parser.add_argument(
            f"--{side}", action="append", default=[], metavar="KEY=VALUE", help=f"Worker argument of {side}"
        )
    parser.add_argument("--b-tree", type=Path, help="run B's workers from this checkout")
    parser.add_argument("--out", type=Path, help="also write the JSON line to DIR/ab-<time>.jsonl")
    args = parser.parse_args()
    workflow = args.workload
    runs = args.runs or RUNS_PER_BATCH[workflow]
    given = {"A": args.a, "B": args.b}  # passed on as written; parsed here only to check and report
    options = {side: worker_options(pairs) for side, pairs in given.items()}
    prefixes = {side: f"ab{side.lower()}{uuid.uuid4().hex[:6]}" for side in options}
    target = f"bench.workloads:{workflow}"
    with (
        embedded_server() as server,
        worker_processes(server.url, target, prefixes["A"], 2, options=given["A"]),
        worker_processes(server.url, target, prefixes["B"], 2, options=given["B"], root=args.b_tree),
    ):
        samples = run(measure(server.url, workflow, prefixes, args.batches, runs))
    a, b = statistics.median(samples["A"]), statistics.median(samples["B"])
    sides = {
        side: {
            "options": options[side],
            "median_ms": round(statistics.median(values), 3),
            "p90_ms": round(percentile(values, 0.9), 3),
        }
        for side, values in samples.items()
    }
    if args.b_tree is not None:
        sides["B"]["tree"] = str(args.b_tree)
    each = len(samples["A"])
    print(f"{workflow}: A {a:.2f} ms, B {b:.2f} ms per run (medians of {each} runs each); B/A {b / a:.3f}")
    line = result_line(
        f"{workflow} A/B",
        samples["A"] + samples["B"],
        f"1 server, replicas=1, file storage, 2 worker processes per side; {args.batches} alternating"
        f" batches of {runs} runs per side",
        a=sides["A"],
        b=sides["B"],
        b_over_a=round(b / a, 4),
    )
    print(json.dumps(line))
    if args.out is not None:
        print(f"results: {write_results('ab', [line], args.out)}")


if __name__ == "__main__":
    main()
