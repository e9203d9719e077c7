"""A benchmark worker process: ``python -m bench._worker URL MODULE:ATTR PREFIX``. Prints "ready"."""

from __future__ import annotations

import asyncio
import importlib
import signal
import sys

from bench._harness import run
from flow_orchestrator import Worker


async def main(url: str, target: str, prefix: str) -> None:
    module, _, attr = target.partition(":")
    workflows = getattr(importlib.import_module(module), attr)
    worker = Worker(workflows, nats_url=url, prefix=prefix, concurrency=1024)
    await worker.start()
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


if __name__ == "__main__":
    run(main(*sys.argv[1:4]))
