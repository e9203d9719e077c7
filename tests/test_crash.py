"""A worker killed with SIGKILL at each point of the step protocol loses nothing.

The only worker hosting the workflow kills itself at the chosen point (``FLOW_CRASH_AT``); a fresh
worker then starts and must finish the run with the same result, every node completed exactly once
in the journal, and actions re-run only where the protocol says they must (an attempt lost before its
completion was published), with the loss visible in the journal.
"""

from __future__ import annotations

import collections
import signal
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flow_orchestrator.testing import LocalEnvironment, eventually
from tests._processes import spawn_worker, stop_all

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    point: str
    node: str = ""
    runs: int | None = None  # how many times the target node's action runs in all
    lost: bool = False  # whether the target's attempt is reported lost (its completion never went out)

    @property
    def target(self) -> str:
        return f"{self.point}:{self.node}" if self.node else self.point


CASES = [
    Case("trigger.after_record"),
    Case("node.before_action", "b", runs=1, lost=True),  # never ran there: lost, runs once elsewhere
    Case("node.after_action", "b", runs=2, lost=True),  # ran, result not published: lost, runs again
    Case("node.after_publish", "b", runs=1),  # published, not acknowledged: never runs again
    # The arrival that completes d's set is recorded, d's ready event is not out: the completing
    # upstream's message comes back, records its arrival again and publishes it. d never started.
    Case("node.after_join", "d", runs=1),
    Case("node.after_action", "d", runs=2, lost=True),
    Case("supervisor.after_schedule", "c", runs=2),  # c fails once by design; the retry is not lost
    Case("supervisor.after_record"),
]
BASE = {"a": 1, "b": 1, "c": 2, "d": 1}  # c fails its first attempt by design


def _worker(env: dict[str, str], prefix: str, extra: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return spawn_worker("tests.crash_workflows:wf", prefix, {**env, **extra}, log, "--ack-wait", "1")


@pytest.mark.parametrize("case", CASES, ids=[c.target for c in CASES])
async def test_sigkill_at_any_point_loses_nothing(
    case: Case, env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    prefix = f"c{uuid.uuid4().hex[:8]}"
    env = {**subprocess_env, "FLOW_TEST_MARKERS": str(tmp_path)}
    crash = {"FLOW_CRASH_AT": case.target, "FLOW_CRASH_ONCE": str(tmp_path / "crashed")}
    crashing = _worker(env, prefix, crash, tmp_path / "crashing.log")
    survivor: subprocess.Popen[bytes] | None = None
    try:
        client_env: LocalEnvironment = await env_factory([], prefix=prefix)

        async def registered() -> bool:
            await client_env.client.describe("crashy")
            return True

        await eventually(registered, within=30)
        handle = await client_env.client.start("crashy", {"x": 10})
        await eventually(lambda: crashing.poll() is not None, within=30, message=f"crash at {case.target}")
        assert crashing.returncode == -signal.SIGKILL
        survivor = _worker(env, prefix, {}, tmp_path / "survivor.log")
        assert await handle.result() == {"d": 11 + 12 + 10}

        async def finished_journal() -> list[dict[str, Any]] | None:
            # The run's end event reaches subscribers as the stream stores it: read until it is there.
            events = await client_env.client.journal(handle.run_id, "crashy")
            return events if any(e["node"] == "_run" and e["kind"] == "completed" for e in events) else None

        journal = await eventually(finished_journal, within=10)
    finally:
        stop_all([crashing, survivor])
    completed = collections.Counter(
        e["node"] for e in journal if e["kind"] == "completed" and e["node"] != "_run"
    )
    assert completed == {"a": 1, "b": 1, "c": 1, "d": 1}
    lines = (tmp_path / "executions.log").read_text().splitlines()
    runs = collections.Counter(line.split()[1] for line in lines)
    lost = collections.Counter(e["node"] for e in journal if e["kind"] == "lost")
    if case.node:
        assert runs[case.node] == case.runs
        assert (lost[case.node] == 1) is case.lost
    for node, base in BASE.items():
        # Any attempt in flight at the kill comes back as lost (its action may or may not have run) and
        # counts as an attempt: a lost first attempt of c makes the resumed one attempt 2, which passes.
        assert 1 <= runs[node] <= base + lost[node], (node, runs, lost)
    run_ends = [e["kind"] for e in journal if e["node"] == "_run" and e["kind"] != "started"]
    assert run_ends == ["completed"]
