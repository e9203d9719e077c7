"""Dead letters: listing, replaying a trigger once its workflow exists, and a message that crashed its
worker on every delivery being dead-lettered on its last one, failing the run that waited on it."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

from flow_orchestrator import NodeContext, RunFailed, Workflow
from flow_orchestrator.bus import encode
from flow_orchestrator.runtime._dead_letters import NotReplayable
from flow_orchestrator.testing import LocalEnvironment, eventually
from tests._processes import spawn_worker, stop_all


def _workflow(name: str) -> Workflow:
    wf = Workflow(name)

    @wf.node()
    async def only(ctx: NodeContext) -> dict[str, Any]:
        return {"got": ctx.input}

    return wf


async def test_list_and_replay_a_trigger_for_a_workflow_deployed_later(env_factory: Any) -> None:
    prefix = f"d{uuid.uuid4().hex[:8]}"
    env: LocalEnvironment = await env_factory(
        [_workflow("present")], prefix=prefix, unknown_workflow_grace=0.2
    )
    js = env.client.bus.js
    await js.publish(env.names.trigger("later"), encode({"n": 1}), headers={"Nats-Msg-Id": "late-run"})
    await js.publish(env.names.trigger("present"), b"\xc1", headers={"Nats-Msg-Id": "broken-run"})
    letters = await eventually(lambda: _letters(env, 2), within=20)
    by_reason = {letter.reason: letter for letter in letters}
    assert set(by_reason) == {"unknown_workflow", "malformed"}
    assert by_reason["unknown_workflow"].headers["Nats-Msg-Id"] == "late-run"
    assert [d.reason for d in await env.client.dead_letters("later")] == ["unknown_workflow"]

    await env_factory([_workflow("later")], prefix=prefix)  # the missing workflow is deployed
    run_id = await env.client.replay_dead_letter(by_reason["unknown_workflow"].id)
    assert run_id == "late-run"
    assert await env.client.get_handle("late-run", "later").result() == {"got": {"n": 1}}
    # Replaying again starts no second run: the server drops the repeat, and the caller is told.
    with pytest.raises(NotReplayable, match=r"replayed a moment ago.*run late-run"):
        await env.client.replay_dead_letter(by_reason["unknown_workflow"].id)
    journal = await env.client.journal("late-run", "later")
    assert [e["kind"] for e in journal if e["node"] == "_run"].count("started") == 1


async def _letters(env: LocalEnvironment, count: int) -> Any:
    letters = await env.client.dead_letters()
    return letters if len(letters) >= count else None


async def test_only_triggers_can_be_replayed(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([_workflow("plain")])
    with pytest.raises(NotReplayable, match="no dead letter"):
        await env.client.replay_dead_letter(999)


@pytest.mark.slow
@pytest.mark.parametrize("point", ["node.before_action:d", "node.after_join:d"])
async def test_crash_loop_message_is_dead_lettered_and_fails_its_run(
    point: str, env_factory: Any, subprocess_env: dict[str, str], tmp_path: Path
) -> None:
    """``node.before_action:d``: the join d crashes every worker it starts on. ``node.after_join:d``:
    the worker that completes d's last upstream crashes after recording the arrival, before d's
    ready event, and so does each worker its message is redelivered to."""
    prefix = f"p{uuid.uuid4().hex[:8]}"
    env: LocalEnvironment = await env_factory([], prefix=prefix)
    crashing = {**subprocess_env, "FLOW_TEST_MARKERS": str(tmp_path), "FLOW_CRASH_AT": point}

    def spawn(env: dict[str, str]) -> subprocess.Popen[bytes]:
        options = ("--ack-wait", "1", "--max-deliver", "3")
        return spawn_worker("tests.crash_workflows:wf", prefix, env, tmp_path / "workers.log", *options)

    procs = [spawn(crashing)]
    try:
        await eventually(lambda: _registered(env), within=30)
        handle = await env.client.start("crashy", {"x": 1})
        # Every worker that takes the message dies. Its third (last allowed) delivery is not run: the
        # worker that gets it dead-letters it, and the run fails instead of hanging.
        for _ in range(2):
            await eventually(lambda: procs[-1].poll() is not None, within=30)
            procs.append(spawn(crashing))
        with pytest.raises(RunFailed, match="dead-lettered") as caught:
            await handle.result()
        letters = await env.client.dead_letters("crashy")
        # The crash is at the join d, when nothing else of the run is in flight: the only message
        # given up on is d's ready event, or (crashing before it is out) the message that started
        # whichever of b and c completed d's set.
        [letter] = [d for d in letters if d.reason == "max_deliveries"]
        assert "gave up after 3 deliveries" in letter.error
        if point == "node.before_action:d":
            assert "consumer node_crashy_d " in letter.error
            assert letter.subject == env.names.event("crashy", handle.run_id, "d", "ready")
        else:
            assert "consumer node_crashy_b " in letter.error or "consumer node_crashy_c " in letter.error
        snapshot = caught.value.status
        assert snapshot.nodes["d"].status.value == "failed"  # type: ignore[attr-defined]
        assert snapshot.nodes["b"].status.value == snapshot.nodes["c"].status.value == "completed"  # type: ignore[attr-defined]
    finally:
        stop_all(procs)


async def _registered(env: LocalEnvironment) -> bool:
    await env.client.describe("crashy")
    return True
