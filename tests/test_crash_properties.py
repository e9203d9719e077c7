"""Property: for random DAGs and random crash points, a run whose worker is killed with SIGKILL ends
with the same node statuses and outputs as the same run without a crash (issue: durable runs)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flow_orchestrator import RunFailed
from flow_orchestrator.testing import LocalEnvironment, eventually
from tests._processes import spawn_worker, stop_all
from tests.random_workflows import build

pytestmark = pytest.mark.slow
POINTS = ["node.before_action", "node.after_action", "node.after_publish", "node.after_join"]


@st.composite
def dags(draw: Any) -> dict[str, Any]:
    count = draw(st.integers(min_value=2, max_value=6))
    nodes: dict[str, Any] = {}
    for i in range(count):
        earlier = list(nodes)
        deps = draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3)) if earlier else []
        mode = draw(st.sampled_from(["ok", "ok", "ok", "flaky", "fatal"]))
        # Failing nodes continue on error: under fail-fast, whether a parallel branch started before the
        # failure is timing, not correctness (fail-fast is pinned in test_engine.py).
        nodes[f"n{i}"] = {"deps": deps, "mode": mode, "coe": mode == "fatal"}
    return {"nodes": nodes}


async def _outcome(env: LocalEnvironment, run_id: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    handle = env.client.get_handle(run_id, "randomdag")
    with contextlib.suppress(RunFailed):
        await handle.result()
    snapshot = await handle.status()
    statuses = {name: node.status.value for name, node in snapshot.nodes.items()}
    outputs = {name: node.output for name, node in snapshot.nodes.items() if node.status.value == "completed"}
    return snapshot.status.value, statuses, outputs


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=dags(), data=st.data())
async def test_crash_anywhere_gives_the_crash_free_outcome(
    spec: dict[str, Any], data: Any, env_factory: Any, subprocess_env: dict[str, str], tmp_path_factory: Any
) -> None:
    # Crash-free reference, in process.
    reference: LocalEnvironment = await env_factory([build(spec)])
    handle = await reference.client.start("randomdag", {})
    expected = await _outcome(reference, handle.run_id)

    point = data.draw(st.sampled_from(POINTS))
    node = data.draw(st.sampled_from(sorted(spec["nodes"])))
    tmp: Path = tmp_path_factory.mktemp("crash")
    prefix = f"r{uuid.uuid4().hex[:8]}"
    env = {**subprocess_env, "FLOW_TEST_DAG": json.dumps(spec)}
    crash = {"FLOW_CRASH_AT": f"{point}:{node}", "FLOW_CRASH_ONCE": str(tmp / "crashed")}
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(extra: dict[str, str]) -> None:
        log = tmp / "workers.log"
        procs.append(
            spawn_worker("tests.random_workflows:wf", prefix, {**env, **extra}, log, "--ack-wait", "1")
        )

    spawn(crash)
    try:
        crashing: LocalEnvironment = await env_factory([], prefix=prefix)
        await eventually(lambda: crashing.client.describe("randomdag"), within=30)
        run = await crashing.client.start("randomdag", {})
        # The crash point may never be reached (the node is skipped, or it is not a join): then the
        # run simply finishes. Either way a second worker joins once the first is gone or done.
        await eventually(lambda: procs[0].poll() is not None or _finished(crashing, run.run_id), within=30)
        spawn({})
        assert await _outcome(crashing, run.run_id) == expected
    finally:
        stop_all(procs)


async def _finished(env: LocalEnvironment, run_id: str) -> bool:
    record = await env.client.store.get(env.names.run_key(run_id))
    return record is not None and record.value.get("status") != "running"
