"""Two worker processes share one workflow's work: every node runs exactly once per run, and both
processes take part. Workers are real subprocesses (``flowctl worker``), stopped by PID with SIGTERM."""

from __future__ import annotations

import asyncio
import collections
import uuid
from pathlib import Path
from typing import Any

import pytest

from flow_orchestrator.testing import LocalEnvironment, eventually
from tests._processes import spawn_worker, stop_all

pytestmark = pytest.mark.slow


async def test_two_worker_processes_run_every_node_exactly_once(
    env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    prefix = f"w{uuid.uuid4().hex[:8]}"
    child_env = {**subprocess_env, "FLOW_TEST_MARKERS": str(tmp_path)}
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    workers = [spawn_worker("tests.workflows:counted", prefix, child_env, log) for log in logs]
    try:
        env: LocalEnvironment = await env_factory([], prefix=prefix)

        async def registered() -> bool:
            try:
                await env.client.describe("counted")
            except LookupError:
                return False
            consumers = await env.client.bus.js.consumers_info(env.names.events_stream)
            return len(consumers) >= 8 and all(w.poll() is None for w in workers)

        await eventually(registered, within=30, message="both workers up")
        await asyncio.sleep(0.5)  # let the second worker join the queue groups
        handles = [await env.client.start("counted", {}) for _ in range(40)]
        results = await asyncio.gather(*(h.result() for h in handles))
        assert results == [{"sum": 15}] * 40
    finally:
        stop_all(workers)
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log.read_text()  # SIGTERM drains and exits cleanly
    lines = (tmp_path / "executions.log").read_text().split()
    executions = collections.Counter(zip(lines[0::3], lines[1::3], strict=True))
    run_ids = {h.run_id for h in handles}
    assert {run for run, _ in executions} == run_ids
    assert len(executions) == 40 * 8
    assert set(executions.values()) == {1}, [k for k, v in executions.items() if v > 1]
    pids = collections.Counter(lines[2::3])
    assert len(pids) == 2, f"work did not spread across both processes: {pids}"
