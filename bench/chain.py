"""W1 chain20: a 20-node chain, median end-to-end latency, per-step overhead beside the raw JetStream
hop measured in the same run. ``python -m bench.chain [--workers 2] [--runs 20]``."""

from __future__ import annotations

import argparse
import json
import time
import uuid

from bench._harness import embedded_server, event_loop_name, raw_hop_ms, result_line, run, worker_processes
from flow_orchestrator import Client

STEPS = 20


async def measure(url: str, prefix: str, warmup: int, runs: int) -> list[float]:
    client = await Client.connect(url, prefix=prefix)
    try:
        samples = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            result = await client.run("chain20", {})
            elapsed = (time.perf_counter() - start) * 1000
            if result != {"k": STEPS - 1, "acc": STEPS}:
                raise AssertionError(f"wrong chain20 result: {result}")
            if i >= warmup:
                samples.append(elapsed)
        return samples
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    prefix = f"b{uuid.uuid4().hex[:6]}"
    with (
        embedded_server() as server,
        worker_processes(server.url, "bench.workloads:chain20", prefix, args.workers),
    ):
        samples = run(measure(server.url, prefix, args.warmup, args.runs))
        hop = run(raw_hop_ms(server.url))
    line = result_line(
        "W1 chain20",
        samples,
        f"1 server, replicas=1, file storage, {args.workers} worker processes, {event_loop_name()}",
        per_step_ms=round(sorted(samples)[len(samples) // 2] / STEPS, 3),
        raw_hop_ms=round(hop, 3),
    )
    print(json.dumps(line))


if __name__ == "__main__":
    main()
