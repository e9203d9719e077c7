"""Paired A/B: two worker configurations on one server, measured side by side, in both positions.

``python -m bench.ab WORKLOAD [--batches 16] [--runs N] [--a KEY=VALUE ...] [--b KEY=VALUE ...]
[--b-tree PATH]``, WORKLOAD one of chain20, fan100, io50.

Two sets of 2 worker processes, A and B, each on its own prefix, share one nats-server, and the
client alternates short batches of sequential runs between them (A B, then B A, ...). On this
shared 2-core VM the drift over a minute is larger than most effects worth measuring; alternating
batches puts it on both sides alike, so B/A means something where two suite runs an hour apart do
not. A and B differ by ``Worker`` arguments (``--a announce_starts_after=0``) or by the engine
itself: ``--b-tree PATH`` runs B's workers from another checkout (``git worktree add PATH REV``).

So that neither side gains from its position (which set starts first, which batch goes first),
the comparison runs twice, on a fresh server each time, with A's workers started first and then
with B's (half the batches each); B/A is the geometric mean of the two rounds' ratios, since a
position's advantage multiplies one round's ratio and divides the other's. Both rounds' ratios are
printed: how far they differ shows the noise. With the same code on both sides, fan100's B/A
ranged over 0.91-1.06 in a noisy hour, so repeat a comparison before believing a few per cent.
Every run's output is checked.
Prints both medians and B/A, then one JSON line; ``--out DIR`` also writes it to
``DIR/ab-<time>.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from bench._harness import embedded_server, percentile, result_line, run, worker_processes, write_results
from bench._measure import EXPECTED, WrongResult
from bench._worker import worker_options
from flow_orchestrator import Client

RUNS_PER_BATCH = {"chain20": 10, "fan100": 10, "io50": 5}


async def measure(
    url: str, workflow: str, prefixes: dict[str, str], batches: int, runs: int, *, first: str
) -> Any:
    """``batches`` alternating batches per side, ``first`` going first in even ones."""
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
        second = "B" if first == "A" else "A"
        for batch in range(batches):
            for side in (first, second) if batch % 2 == 0 else (second, first):
                samples[side].extend([await one(side) for _ in range(runs)])
    finally:
        for client in clients.values():
            await client.close()
    return samples


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("workload", choices=sorted(RUNS_PER_BATCH))
    parser.add_argument("--batches", type=int, default=16, help="batches per side, half in each round")
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
    roots = {"A": None, "B": args.b_tree}
    samples: dict[str, list[float]] = {"A": [], "B": []}
    ratios: dict[str, float] = {}
    for first in ("A", "B"):  # each configuration's workers started first once
        second = "B" if first == "A" else "A"
        with (
            embedded_server() as server,
            worker_processes(server.url, target, prefixes[first], 2, options=given[first], root=roots[first]),
            worker_processes(
                server.url, target, prefixes[second], 2, options=given[second], root=roots[second]
            ),
        ):
            got = run(measure(server.url, workflow, prefixes, (args.batches + 1) // 2, runs, first=first))
        ratios[first] = statistics.median(got["B"]) / statistics.median(got["A"])
        for side, values in got.items():
            samples[side].extend(values)
    a, b = statistics.median(samples["A"]), statistics.median(samples["B"])
    b_over_a = math.sqrt(ratios["A"] * ratios["B"])
    started_second = math.sqrt(ratios["A"] / ratios["B"])  # the second-started set's time over the first's
    sides = {
        side: {
            "options": options[side],
            "median_ms": round(statistics.median(values), 3),
            "p90_ms": round(percentile(values, 0.9), 3),
        }
        for side, values in samples.items()
    }
    if args.b_tree is not None:
        sides["B"]["tree"] = _revision(args.b_tree)
    each = len(samples["A"])
    print(
        f"{workflow}: A {a:.2f} ms, B {b:.2f} ms per run (medians of {each} runs each); B/A {b_over_a:.3f}"
        f" (A's workers started first: {ratios['A']:.3f}; B's first: {ratios['B']:.3f}; the set started"
        f" second took {started_second:.3f} of the first's time)"
    )
    line = result_line(
        f"{workflow} A/B",
        samples["A"] + samples["B"],
        f"1 server, replicas=1, file storage, 2 worker processes per side; two rounds (each side's"
        f" workers started first once), {(args.batches + 1) // 2} alternating batches of {runs} runs per"
        " side each",
        a=sides["A"],
        b=sides["B"],
        b_over_a=round(b_over_a, 4),
        b_over_a_by_round={"A first": round(ratios["A"], 4), "B first": round(ratios["B"], 4)},
        second_started_over_first=round(started_second, 4),
    )
    print(json.dumps(line))
    if args.out is not None:
        print(f"results: {write_results('ab', [line], args.out)}")


def _revision(tree: Path) -> str:
    """The commit a checkout is at (``+changes`` when its work tree differs): what B ran, with no
    machine path in the results."""

    def git(*command: str) -> str:
        return subprocess.run(
            ["git", *command], check=False, cwd=tree, capture_output=True, text=True
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return f"{commit}+changes" if git("status", "--porcelain", "--untracked-files=no") else commit


if __name__ == "__main__":
    main()
