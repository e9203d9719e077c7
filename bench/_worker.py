"""A benchmark worker process:
``python -m bench._worker URL MODULE:ATTR PREFIX [--replicas N] [--concurrency N] [--max-in-flight N]
[--option KEY=VALUE ...]``.

Prints "ready" once its actors listen. ``BENCH_PROFILE=PATH`` profiles it with cProfile and writes
``PATH.<pid>.prof`` when it stops (SIGTERM), for finding where a workload's time goes.
``BENCH_TRACEMALLOC=PATH`` traces allocations and writes the largest sites to PATH on SIGUSR1, for
finding where its memory goes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import json
import os
import signal
import tracemalloc
from pathlib import Path
from typing import Any

from bench._harness import run
from flow_orchestrator import StorageSettings, Worker


async def main(args: argparse.Namespace) -> None:
    module, _, attr = args.target.partition(":")
    workflows = getattr(importlib.import_module(module), attr)
    options: dict[str, Any] = {}  # unset: the Worker's defaults
    if args.concurrency is not None:
        options["concurrency"] = args.concurrency
    if args.max_in_flight is not None:
        options["max_in_flight"] = args.max_in_flight
    options.update(worker_options(args.option))
    worker = Worker(
        workflows,
        nats_url=args.url,
        prefix=args.prefix,
        storage=StorageSettings(replicas=args.replicas),
        **options,
    )
    await worker.start()
    allocations_to = os.environ.get("BENCH_TRACEMALLOC")
    if allocations_to:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, _write_allocations, allocations_to)
    print("ready", flush=True)
    stop = await _wait_for_signal()
    await stop.wait()
    await worker.stop()


async def _wait_for_signal() -> asyncio.Event:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, event.set)
    return event


def _write_allocations(path: str, top: int = 25) -> None:
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, "<frozen *>")]
    )
    stats = snapshot.statistics("lineno")
    total = sum(stat.size for stat in stats)
    lines = [f"traced {total / 2**20:.1f} MiB in {sum(stat.count for stat in stats)} blocks"]
    lines += [
        f"{stat.size / 2**20:8.2f} MiB {stat.count:>8} blocks  {stat.traceback}" for stat in stats[:top]
    ]
    partial = Path(f"{path}.partial")
    partial.write_text("\n".join(lines) + "\n")
    partial.replace(path)  # whoever waits for ``path`` never reads half a file


def worker_options(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as ``Worker`` keyword arguments; a value that reads as JSON (a number,
    ``true``) is taken as such, anything else as a string."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"a Worker option is KEY=VALUE, got {pair!r}")
        try:
            options[key] = json.loads(text)
        except ValueError:
            options[key] = text
    return options


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("target", help="MODULE:ATTR, a workflow or a list of workflows")
    parser.add_argument("prefix")
    parser.add_argument("--replicas", type=int, default=1, help="3 on a cluster")
    parser.add_argument("--concurrency", type=int, help="messages one actor handles at once")
    parser.add_argument("--max-in-flight", type=int, help="messages the worker holds at once")
    parser.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="any other Worker argument"
    )
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if os.environ.get("BENCH_TRACEMALLOC"):
        tracemalloc.start()
    profile_to = os.environ.get("BENCH_PROFILE")
    if not profile_to:
        run(main(arguments))
    else:
        profiler = cProfile.Profile()
        profiler.enable()
        try:
            run(main(arguments))
        finally:
            profiler.disable()
            profiler.dump_stats(f"{profile_to}.{os.getpid()}.prof")
