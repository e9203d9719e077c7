"""``flowctl retry`` (``RunHandle.retry``) against what may still be on its way when it runs: messages
from before the retry must not start a node the retry also issued (DESIGN.md invariant 2), and a
node whose scheduled retry came due while the run was failed must run again."""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from typing import Any

import nats.errors
import pytest

from flow_orchestrator import (
    NodeContext,
    NonRetryableError,
    PermissionDenied,
    RetryPolicy,
    RunFailed,
    RunStatus,
    Workflow,
)
from flow_orchestrator.actors._node import NodeActor
from flow_orchestrator.actors._supervisor import SupervisorActor
from flow_orchestrator.bus._codec import encode
from flow_orchestrator.bus._dlq import Letter
from flow_orchestrator.bus._reader import ReadFailed
from flow_orchestrator.runtime import _resume
from flow_orchestrator.runtime._resume import RetryInterrupted, RunNotRetryable
from flow_orchestrator.testing import LocalEnvironment, eventually


async def _recorded(env: LocalEnvironment, handle: Any, node: str, kind: str) -> bool:
    """Whether the run's journal has a ``kind`` event of ``node``."""
    journal = await env.client.journal(handle.run_id, handle.workflow)
    return (node, kind) in [(e["node"], e["kind"]) for e in journal]


def _counter() -> tuple[dict[str, list[int]], Any]:
    calls: dict[str, list[int]] = {}

    def count(ctx: NodeContext) -> None:
        calls.setdefault(ctx.node, []).append(ctx.attempt)

    return calls, count


@pytest.mark.parametrize("restart", [False, True], ids=["same-worker", "new-worker"])
async def test_a_completion_waiting_through_the_retry_does_not_start_its_node_twice(
    env_factory: Any, restart: bool
) -> None:
    """A node of the failed run finishes, and its completion waits in the stream for its downstream
    node through the retry (its consumer is paused here; in life, a busy or redeployed worker pool).
    The retry also issues that downstream node. It runs once: on a worker that saw the retry, and on
    one started after it (the deploy-the-fix case), which learns of the retry when it starts."""
    wf = Workflow("delayed")
    calls, count = _counter()
    broken, release = {"yes": True}, asyncio.Event()

    @wf.node()
    async def first(ctx: NodeContext) -> int:
        return 1

    @wf.node(depends_on=[first])
    async def fragile(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            raise RuntimeError("bug in fragile")
        return 2

    @wf.node(depends_on=[first])
    async def side(ctx: NodeContext) -> int:
        count(ctx)
        await release.wait()
        return 10

    @wf.node(depends_on=[side])
    async def after(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.2)  # long enough for a second start to overlap the first
        return ctx.output("side") + 1

    @wf.node(depends_on=[fragile, after])
    async def finish(ctx: NodeContext) -> int:
        count(ctx)
        return ctx.output("fragile") + ctx.output("after")

    env: LocalEnvironment = await env_factory([wf])
    jsm, stream = env.client.bus.js, env.names.events_stream
    consumer = env.names.node_consumer("delayed", "after")
    handle = await env.client.start("delayed", {})
    with pytest.raises(RunFailed, match="bug in fragile"):
        await handle.result()
    await eventually(lambda: "side" in calls, within=10)
    await jsm.pause_consumer(stream, consumer, "2099-01-01T00:00:00Z")
    release.set()

    await eventually(lambda: _recorded(env, handle, "side", "completed"), within=10)
    if restart:
        [worker] = env.workers
        await worker.stop()
        env.workers.clear()
    broken["yes"] = False  # "deploy the fix"
    # fragile's new attempt waits too: a worker learns of the retry from `after`'s messages alone.
    await jsm.pause_consumer(stream, env.names.node_consumer("delayed", "fragile"), "2099-01-01T00:00:00Z")
    assert await handle.retry() == ["fragile", "after"]
    if restart:
        await env.add_worker()
    await jsm.resume_consumer(stream, consumer)  # side's completion reaches `after` only now

    await eventually(lambda: _recorded(env, handle, "after", "completed"), within=10)
    await asyncio.sleep(0.5)  # a second start of `after`, if any, has begun by now
    await jsm.resume_consumer(stream, env.names.node_consumer("delayed", "fragile"))
    async with asyncio.timeout(15):
        assert await handle.result() == 2 + 11
    assert calls == {"fragile": [1, 2], "side": [1], "after": [1], "finish": [1]}


def _flaky_and_fragile(name: str, delay: float) -> tuple[Workflow, dict[str, list[int]], dict[str, bool]]:
    """flaky fails once and retries after ``delay``; fragile fails (while ``broken``) just after."""
    wf = Workflow(name)
    calls, count = _counter()
    broken = {"yes": True}

    @wf.node(retry=RetryPolicy(max_attempts=3, initial=delay, jitter=0.0))
    async def flaky(ctx: NodeContext) -> int:
        count(ctx)
        if ctx.attempt == 1:
            raise ConnectionError("service unavailable")
        return 1

    @wf.node()
    async def fragile(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.05)  # fails once flaky's retry is scheduled
        if broken["yes"]:
            raise ValueError("bug in fragile")
        return 2

    return wf, calls, broken


async def test_a_scheduled_retry_that_came_due_while_the_run_was_failed_runs_after_the_retry(
    env_factory: Any,
) -> None:
    wf, calls, broken = _flaky_and_fragile("duewhilefailed", delay=0.3)

    @wf.node(depends_on=["flaky", "fragile"])
    async def total(ctx: NodeContext) -> int:
        return ctx.output("flaky") + ctx.output("fragile")

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("duewhilefailed", {})
    with pytest.raises(RunFailed, match="bug in fragile"):
        await handle.result()

    await eventually(
        lambda: _recorded(env, handle, "flaky", "retry"), within=10
    )  # ... and was dropped: the run had failed
    await asyncio.sleep(0.2)
    assert calls["flaky"] == [1]
    broken["yes"] = False
    assert await handle.retry() == ["flaky", "fragile"]
    async with asyncio.timeout(15):  # it used to wait for ever: flaky's retry was never issued again
        assert await handle.result() == 3
    assert calls == {"flaky": [1, 2], "fragile": [1, 2]}


async def test_a_scheduled_retry_due_after_the_retry_does_not_run_its_node_again(
    env_factory: Any,
) -> None:
    """The retry issues a node waiting for its scheduled retry at once; the scheduled message,
    when it comes due later, finds the node claimed and starts nothing."""
    wf, calls, broken = _flaky_and_fragile("dueafter", delay=2.5)
    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("dueafter", {})
    with pytest.raises(RunFailed, match="bug in fragile"):
        await handle.result()
    broken["yes"] = False
    assert await handle.retry() == ["flaky", "fragile"]  # before flaky's retry comes due
    assert await handle.result() == {"flaky": 1, "fragile": 2}

    async def came_due() -> bool:
        journal = await env.client.journal(handle.run_id, "dueafter")
        return [e["kind"] for e in journal if e["node"] == "flaky"].count("retry") == 2

    await eventually(came_due, within=10)
    await asyncio.sleep(0.3)
    assert calls == {"flaky": [1, 2], "fragile": [1, 2]}


async def test_a_retried_run_that_fails_again_says_so(env_factory: Any) -> None:
    """Its second end is a journal event too (its message id used to repeat the first's, so the
    stream dropped it as a duplicate: live views, workers' run gates and metrics missed it)."""
    wf = Workflow("twice")

    @wf.node()
    async def bad(ctx: NodeContext) -> int:
        raise RuntimeError(f"broken on attempt {ctx.attempt}")

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("twice", {})
    with pytest.raises(RunFailed, match="attempt 1"):
        await handle.result()
    assert await handle.retry() == ["bad"]
    with pytest.raises(RunFailed, match="attempt 2"):
        await handle.result()

    async def failed_twice() -> bool:
        journal = await env.client.journal(handle.run_id, "twice")
        return [e["kind"] for e in journal if e["node"] == "_run"] == [
            "started",
            "failed",
            "resumed",
            "failed",
        ]

    await eventually(failed_twice, within=10)


async def test_a_redelivered_attempt_that_already_failed_does_not_take_the_claim(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node's failure is stored but its message is not acknowledged, and comes back after the
    retry: it starts nothing (its attempt's outcome is in the journal), so it must not claim the
    node either, or the retry's own attempt would never run."""
    wf = Workflow("unacked")
    calls, count = _counter()
    finish, lost_ack = NodeActor._finish, {"done": False}

    @wf.node()
    async def x(ctx: NodeContext) -> int:
        count(ctx)
        if ctx.attempt == 1:
            raise NonRetryableError("bug in x")
        return 7

    async def finish_then_lose_the_ack(self: NodeActor, msg: Any, attempt: Any, kind: str, body: Any) -> None:
        if kind != "attempt_failed" or lost_ack["done"]:
            await finish(self, msg, attempt, kind, body)
            return
        lost_ack["done"] = True
        subject, msg_id = self._subject(attempt.run_id, kind), f"{attempt.run_id}.x.1.{kind}"
        await self.system.emit(subject, body, msg_id=msg_id, headers=attempt.trace)
        # Stored; the message comes back only once its consumer resumes (after the retry).
        await self.system.bus.js.pause_consumer(
            self.system.names.events_stream, self.spec.durable, "2099-01-01T00:00:00Z"
        )
        raise nats.errors.TimeoutError

    monkeypatch.setattr(NodeActor, "_finish", finish_then_lose_the_ack)
    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("unacked", {})
    with pytest.raises(RunFailed, match="bug in x"):
        await handle.result()
    assert await handle.retry() == ["x"]
    await env.client.bus.js.resume_consumer(env.names.events_stream, env.names.node_consumer("unacked", "x"))
    async with asyncio.timeout(15):
        assert await handle.result() == 7
    assert calls == {"x": [1, 2]}


def _lost_while_failed(name: str) -> tuple[Workflow, dict[str, list[int]], asyncio.Event, dict[str, bool]]:
    """x's first attempt hangs (its worker dies meanwhile); z fails the run (while ``broken``)
    once x has announced its start; w joins them."""
    wf = Workflow(name)
    calls, count = _counter()
    hang, broken = asyncio.Event(), {"yes": True}

    @wf.node()
    async def x(ctx: NodeContext) -> int:
        count(ctx)
        if ctx.attempt == 1:
            await hang.wait()
        return 1

    @wf.node()
    async def z(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.3)  # x has announced its start by then
        if broken["yes"]:
            raise ValueError("bug in z")
        return 2

    @wf.node(depends_on=[x, z])
    async def w(ctx: NodeContext) -> int:
        return ctx.output("x") + ctx.output("z")

    return wf, calls, hang, broken


async def _worker_dies(env: LocalEnvironment) -> Any:
    """The only worker loses its connection: no acknowledgement, no heartbeat, so what it held comes
    back after the ack wait. Returns it (stop it at the end)."""
    [dying] = env.workers
    assert dying._bus is not None
    await dying._bus.nc.close()
    env.workers.clear()
    return dying


async def test_an_attempt_lost_while_the_run_was_failed_runs_again_after_the_retry(env_factory: Any) -> None:
    """x's worker dies while x runs; another node fails the run; x's message comes back to a new
    worker while the run is failed. It starts nothing then, but records the attempt as lost, so
    that the retry issues x again (the journal had it running for good)."""
    wf, calls, hang, broken = _lost_while_failed("lostwhilefailed")
    env: LocalEnvironment = await env_factory([wf], ack_wait=1.0, shutdown_grace=0.2)
    handle = await env.client.start("lostwhilefailed", {})
    with pytest.raises(RunFailed, match="bug in z"):
        await handle.result()
    dying = await _worker_dies(env)
    await env.add_worker()

    try:
        await eventually(lambda: _recorded(env, handle, "x", "lost"), within=15)
        broken["yes"] = False
        assert await handle.retry() == ["x", "z"]
        async with asyncio.timeout(15):
            assert await handle.result() == 3
        assert calls == {"x": [1, 2], "z": [1, 2]}
    finally:
        hang.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(dying.stop(), 5)


async def test_the_retry_waits_for_running_attempts_even_with_the_clients_clock_ahead(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """y runs (not yet announced) when z fails the run; a client whose clock is 3 s ahead must still
    wait for y to announce itself, or it would issue y again beside the running one."""
    wf = Workflow("skewed")
    calls, count = _counter()
    broken = {"yes": True}

    @wf.node()
    async def y(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(1.5)
        return 1

    @wf.node()
    async def z(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            raise ValueError("bug in z")
        return 2

    ahead = types.SimpleNamespace(time=lambda: time.time() + 3.0)
    monkeypatch.setattr(_resume, "time", ahead)
    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("skewed", {})
    with pytest.raises(RunFailed, match="bug in z"):
        await handle.result()
    broken["yes"] = False
    assert await handle.retry() == ["z"]
    async with asyncio.timeout(15):
        assert await handle.result() == {"y": 1, "z": 2}
    assert calls == {"y": [1], "z": [1, 2]}


async def test_a_failure_reported_before_the_retry_does_not_fail_the_retried_run(env_factory: Any) -> None:
    """y's first attempt fails too, but the supervisor takes its report only after the retry, which
    issued y a new attempt: that old report must not fail the run again."""
    wf = Workflow("stalereport")
    calls, count = _counter()
    broken, go = {"yes": True}, asyncio.Event()

    @wf.node()
    async def y(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            await go.wait()
            raise ValueError("bug in y")
        return 1

    @wf.node()
    async def z(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            raise ValueError("bug in z")
        return 2

    env: LocalEnvironment = await env_factory([wf])
    js, stream, supervisor = (
        env.client.bus.js,
        env.names.events_stream,
        env.names.supervisor_consumer("stalereport"),
    )
    handle = await env.client.start("stalereport", {})
    with pytest.raises(RunFailed, match="bug in z"):
        await handle.result()
    await js.pause_consumer(stream, supervisor, "2099-01-01T00:00:00Z")
    go.set()

    await eventually(lambda: _recorded(env, handle, "y", "attempt_failed"), within=10)
    broken["yes"] = False
    assert await handle.retry() == ["y", "z"]
    await js.resume_consumer(stream, supervisor)
    async with asyncio.timeout(15):
        assert await handle.result() == {"y": 1, "z": 2}
    assert calls == {"y": [1, 2], "z": [1, 2]}


async def test_a_sink_that_completed_while_the_run_was_failed_counts_after_the_retry(
    env_factory: Any,
) -> None:
    wf = Workflow("latesink")
    broken = {"yes": True}

    @wf.node()
    async def x(ctx: NodeContext) -> int:
        await asyncio.sleep(0.5)  # completes after z failed the run
        return 1

    @wf.node()
    async def z(ctx: NodeContext) -> int:
        if broken["yes"]:
            raise ValueError("bug in z")
        return 2

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("latesink", {})
    with pytest.raises(RunFailed, match="bug in z"):
        await handle.result()

    async def x_counted() -> bool:  # the failed run's record keeps x's result
        record = await env.client.store.get(env.names.run_key(handle.run_id))
        return record is not None and record.value["results"] == {"x": 1}

    await eventually(x_counted, within=10)
    broken["yes"] = False
    assert await handle.retry() == ["z"]
    async with asyncio.timeout(15):  # it used to wait for ever: x's result was never counted
        assert await handle.result() == {"x": 1, "z": 2}


def _held_side(name: str) -> tuple[Workflow, dict[str, list[int]], dict[str, bool], asyncio.Event]:
    """Two roots: fragile fails (while ``broken``) and fails the run; side waits for ``release``;
    after follows side."""
    wf = Workflow(name)
    calls, count = _counter()
    broken, release = {"yes": True}, asyncio.Event()

    @wf.node()
    async def fragile(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            raise RuntimeError("bug in fragile")
        return 2

    @wf.node()
    async def side(ctx: NodeContext) -> int:
        await release.wait()
        return 10

    @wf.node(depends_on=[side])
    async def after(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.5)
        return ctx.output("side") + 1

    return wf, calls, broken, release


async def test_a_worker_that_missed_the_retry_learns_of_it_when_it_reconnects(env_factory: Any) -> None:
    """The retry's `_run.resumed` is a core message: a worker disconnected at that moment misses it
    (simulated: its gate forgets the run, and drops the message). Reconnecting, it reads the past
    retries again, so a message from before the retry still claims what it starts."""
    wf, calls, broken, release = _held_side("partitioned")
    env: LocalEnvironment = await env_factory([wf])
    [worker] = env.workers
    assert worker.system is not None
    assert worker._bus is not None
    system, bus = worker.system, worker._bus
    js, stream = env.client.bus.js, env.names.events_stream
    handle = await env.client.start("partitioned", {})
    with pytest.raises(RunFailed, match="bug in fragile"):
        await handle.result()
    await js.pause_consumer(stream, env.names.node_consumer("partitioned", "after"), "2099-01-01T00:00:00Z")
    await js.pause_consumer(stream, env.names.node_consumer("partitioned", "fragile"), "2099-01-01T00:00:00Z")
    release.set()
    await asyncio.sleep(0.5)  # side completes; its completion waits for `after`
    system.gate = type(system.gate)()  # the worker knows nothing of the run ...
    resumed_sub = system._gate_subs.pop()
    await resumed_sub.unsubscribe()  # ... and misses the retry's announcement
    broken["yes"] = False
    assert await handle.retry() == ["fragile", "after"]
    assert system.gate.epoch(handle.run_id) == 0
    for listener in list(bus.reconnected):  # as nats-py does once the connection is back
        listener()
    await eventually(lambda: system.gate.epoch(handle.run_id) == 1, within=10)
    await js.resume_consumer(stream, env.names.node_consumer("partitioned", "after"))
    await asyncio.sleep(1.0)  # both of `after`'s messages are handled by now
    await js.resume_consumer(stream, env.names.node_consumer("partitioned", "fragile"))
    async with asyncio.timeout(15):
        assert await handle.result() == {"fragile": 2, "after": 11}
    assert calls == {"fragile": [1, 2], "after": [1]}


async def test_a_lost_attempt_reported_after_the_retry_read_the_journal_still_runs(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The redelivery finds the run failed; the retry reopens it and reads the journal before the
    redelivery's `lost` event is stored, so it does not issue x: the redelivery must start x then."""
    wf, calls, hang, broken = _lost_while_failed("lostrace")
    checking, go = asyncio.Event(), asyncio.Event()
    unfinished = NodeActor._unfinished

    async def slow_unfinished(self: NodeActor, attempt: Any) -> bool:
        checking.set()
        await go.wait()  # a slow journal read on the worker, while the retry runs
        return await unfinished(self, attempt)

    env: LocalEnvironment = await env_factory([wf], ack_wait=1.0, shutdown_grace=0.2)
    handle = await env.client.start("lostrace", {})
    with pytest.raises(RunFailed, match="bug in z"):
        await handle.result()
    dying = await _worker_dies(env)
    monkeypatch.setattr(NodeActor, "_unfinished", slow_unfinished)
    await env.add_worker()
    try:
        await asyncio.wait_for(checking.wait(), 15)  # x's redelivery found the run failed
        broken["yes"] = False
        assert await handle.retry() == ["z"]  # x shows running: nothing says it was lost yet
        go.set()
        async with asyncio.timeout(15):  # it used to wait for ever: x was never started again
            assert await handle.result() == 3
        assert calls == {"x": [1, 2], "z": [1, 2]}
    finally:
        hang.set()
        go.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(dying.stop(), 5)


async def test_a_failure_reported_late_after_two_retries_does_not_fail_the_run(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """n's first attempt fails; the supervisor takes that report only after two retries, of which
    the first issued n again (and n completed): the report is stale, whichever retry superseded it."""
    wf = Workflow("tworetries")
    calls, count = _counter()
    broken = {"z": True}
    n_go, held, release = asyncio.Event(), asyncio.Event(), asyncio.Event()
    attempt_failed = SupervisorActor._attempt_failed

    async def late(self: SupervisorActor, run_id: str, node: str, payload: Any, trace: Any) -> None:
        if node == "n" and int(payload["attempt"]) == 1:
            held.set()
            await release.wait()
        await attempt_failed(self, run_id, node, payload, trace)

    monkeypatch.setattr(SupervisorActor, "_attempt_failed", late)

    @wf.node()
    async def n(ctx: NodeContext) -> int:
        count(ctx)
        if ctx.attempt == 1:
            await n_go.wait()
            raise NonRetryableError("n attempt 1 broke")
        return 1

    @wf.node()
    async def z(ctx: NodeContext) -> int:
        count(ctx)
        if broken["z"]:
            raise NonRetryableError(f"bug in z {ctx.attempt}")
        return 2

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("tworetries", {})
    with pytest.raises(RunFailed, match="bug in z 1"):
        await handle.result()
    n_go.set()
    await asyncio.wait_for(held.wait(), 10)
    assert await handle.retry() == ["n", "z"]
    with pytest.raises(RunFailed, match="bug in z 2"):
        await handle.result()
    broken["z"] = False
    assert await handle.retry() == ["z"]
    release.set()
    async with asyncio.timeout(15):
        assert await handle.result() == {"n": 1, "z": 2}
    assert calls == {"n": [1, 2], "z": [1, 2, 3]}


async def test_an_earlier_retrys_message_for_a_node_loses_to_the_latest_retry(env_factory: Any) -> None:
    """The first retry's message for x waits in x's consumer (a busy pool) while y fails the run
    again and a second retry issues x again: x runs once, not once per retry."""
    wf = Workflow("tworeissues")
    calls, count = _counter()

    @wf.node()
    async def x(ctx: NodeContext) -> int:
        count(ctx)
        if ctx.attempt == 1:
            raise NonRetryableError("x broken once")
        await asyncio.sleep(0.3)
        return 1

    @wf.node()
    async def y(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.1)
        if ctx.attempt < 3:
            raise NonRetryableError(f"y broken {ctx.attempt}")
        return 2

    env: LocalEnvironment = await env_factory([wf])
    js, stream = env.client.bus.js, env.names.events_stream
    consumer = env.names.node_consumer("tworeissues", "x")
    handle = await env.client.start("tworeissues", {})
    with pytest.raises(RunFailed):
        await handle.result()
    await js.pause_consumer(stream, consumer, "2099-01-01T00:00:00Z")
    assert set(await handle.retry()) == {"x", "y"}  # x's message waits in its paused consumer
    with pytest.raises(RunFailed, match="y broken 2"):
        async with asyncio.timeout(15):
            await handle.result()
    assert set(await handle.retry()) == {"x", "y"}
    await js.resume_consumer(stream, consumer)  # the first retry's message, then the second's
    async with asyncio.timeout(20):
        assert await handle.result() == {"x": 1, "y": 2}
    await asyncio.sleep(0.8)  # a second start of x, if any, has begun by now
    assert calls["x"] == [1, 2]


async def test_a_retry_that_stopped_halfway_is_finished_by_retrying_again(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is reopened, then reading its journal fails: the run is not left running for good
    with nothing issued; retrying again finishes that retry."""
    wf = Workflow("halfway")
    calls, count = _counter()
    broken = {"yes": True}

    @wf.node()
    async def only(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            raise ValueError("bug in only")
        return 1

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("halfway", {})
    with pytest.raises(RunFailed, match="bug in only"):
        await handle.result()
    broken["yes"] = False
    journal = env.client.journal

    async def unreadable(run_id: str, workflow: str) -> Any:
        raise ReadFailed("no answer to a direct get within 5 s")

    monkeypatch.setattr(env.client, "journal", unreadable)
    with pytest.raises(RetryInterrupted, match="retry it again to finish"):
        await handle.retry()
    reopened = await env.client.store.get(env.names.run_key(handle.run_id))
    assert reopened is not None
    assert reopened.value["status"] == RunStatus.RUNNING.value  # reopened, nothing issued yet
    monkeypatch.setattr(env.client, "journal", journal)
    assert await handle.retry() == ["only"]
    async with asyncio.timeout(15):
        assert await handle.result() == 1
    assert calls == {"only": [1, 2]}
    record = await env.client.store.get(env.names.run_key(handle.run_id))
    assert record is not None
    [entry] = record.value["resumed"]
    assert (entry["epoch"], entry["done"], entry["attempts"]) == (1, True, {"only": 2})


async def test_finishing_a_retry_whose_publish_failed_issues_what_it_had_chosen(env_factory: Any) -> None:
    """The retry issues a, then publishing b's message fails. a completes meanwhile, and its
    completion waits for c in a busy pool. Finishing the retry issues b (what it had chosen), not
    c as well: c starts once, from a's completion."""
    wf = Workflow("finishing")
    calls, count = _counter()
    broken = {"yes": True}

    @wf.node()
    async def a(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            raise NonRetryableError("a broken")
        return 1

    @wf.node()
    async def b(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.05)
        if broken["yes"]:
            raise NonRetryableError("b broken")
        return 2

    @wf.node(depends_on=[a])
    async def c(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.3)
        return ctx.output("a") + 10

    env: LocalEnvironment = await env_factory([wf])
    js, stream = env.client.bus.js, env.names.events_stream
    handle = await env.client.start("finishing", {})
    with pytest.raises(RunFailed):
        await handle.result()
    await eventually(lambda: _recorded(env, handle, "b", "attempt_failed"), within=10)
    broken["yes"] = False
    await js.pause_consumer(stream, env.names.node_consumer("finishing", "c"), "2099-01-01T00:00:00Z")
    publish = js.publish

    async def failing_for_b(subject: str, *args: Any, **kwargs: Any) -> Any:
        if subject.endswith(".b.retry"):
            raise nats.errors.TimeoutError
        return await publish(subject, *args, **kwargs)

    js.publish = failing_for_b  # type: ignore[method-assign]
    try:
        with pytest.raises(RetryInterrupted):
            await handle.retry()
    finally:
        js.publish = publish  # type: ignore[method-assign]

    await eventually(lambda: _recorded(env, handle, "a", "completed"), within=10)
    assert await handle.retry() == ["a", "b"]  # as noted; a's repeat starts nothing
    with pytest.raises(RunNotRetryable, match="running"):  # finished now: nothing left to finish
        await handle.retry()
    await js.resume_consumer(stream, env.names.node_consumer("finishing", "c"))
    async with asyncio.timeout(15):
        assert await handle.result() == {"b": 2, "c": 11}
    await asyncio.sleep(0.8)  # a second start of c, if any, has begun by now
    assert calls == {"a": [1, 2], "b": [1, 2], "c": [1]}


async def test_a_retry_refused_halfway_by_the_server_says_so(env_factory: Any) -> None:
    """A user allowed to reopen the run but not to publish its retry messages gets PermissionDenied,
    not "retry it again" (the server's refusal arrives on the connection, as nats-py reports it)."""
    wf = Workflow("refusedhalfway")

    @wf.node()
    async def only(ctx: NodeContext) -> int:
        raise ValueError("bug in only")

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("refusedhalfway", {})
    with pytest.raises(RunFailed, match="bug in only"):
        await handle.result()
    bus, publish = env.client.bus, env.client.bus.js.publish

    async def refused_for_retries(subject: str, *args: Any, **kwargs: Any) -> Any:
        if not subject.endswith(".retry"):
            return await publish(subject, *args, **kwargs)
        bus.refused[subject.lower()] = f'Permissions Violation for Publish to "{subject}"'
        bus.refusals += 1
        raise nats.errors.TimeoutError

    bus.js.publish = refused_for_retries  # type: ignore[method-assign]
    try:
        with pytest.raises(PermissionDenied, match=r"\.only\.retry'.*allowed to retry runs"):
            await handle.retry()
    finally:
        bus.js.publish = publish  # type: ignore[method-assign]


async def test_a_cancel_while_the_run_is_being_retried_stops_the_retry(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone cancels the run while the retry reads its journal: the retry issues nothing, says
    so, and the run stays cancelled (a late `_run.resumed` must not reopen it on the workers)."""
    wf = Workflow("cancelledmidretry")
    calls, count = _counter()

    @wf.node()
    async def only(ctx: NodeContext) -> int:
        count(ctx)
        raise ValueError("bug in only")

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("cancelledmidretry", {})
    with pytest.raises(RunFailed, match="bug in only"):
        await handle.result()
    journal = env.client.journal

    async def cancelled_meanwhile(run_id: str, workflow: str) -> Any:
        await handle.cancel("another operator")

        async def cancelled() -> bool:
            record = await env.client.store.get(env.names.run_key(run_id))
            return record is not None and record.value["status"] == "cancelled"

        await eventually(cancelled, within=10)
        return await journal(run_id, workflow)

    monkeypatch.setattr(env.client, "journal", cancelled_meanwhile)
    with pytest.raises(RunNotRetryable, match="cancelled again; its retry stopped"):
        await handle.retry()
    await asyncio.sleep(0.5)
    record = await env.client.store.get(env.names.run_key(handle.run_id))
    assert record is not None
    assert record.value["status"] == "cancelled"
    assert calls == {"only": [1]}


async def test_a_second_retry_while_one_is_under_way_is_refused(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It used to "finish" the first, choosing anew and overwriting the attempts it had noted."""
    wf = Workflow("twooperators")
    calls, count = _counter()
    broken = {"yes": True}

    @wf.node()
    async def only(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            raise ValueError("bug in only")
        return 1

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("twooperators", {})
    with pytest.raises(RunFailed, match="bug in only"):
        await handle.result()
    broken["yes"] = False
    journal, reading, go = env.client.journal, asyncio.Event(), asyncio.Event()

    async def slow_journal(run_id: str, workflow: str) -> Any:
        reading.set()
        await go.wait()
        return await journal(run_id, workflow)

    monkeypatch.setattr(env.client, "journal", slow_journal)
    first = asyncio.ensure_future(handle.retry())
    await asyncio.wait_for(reading.wait(), 15)
    with pytest.raises(RunNotRetryable, match="under way"):
        await handle.retry()
    go.set()
    assert await first == ["only"]
    async with asyncio.timeout(15):
        assert await handle.result() == 1
    assert calls == {"only": [1, 2]}


def _two_big_sinks(name: str, late: asyncio.Event | None = None) -> Workflow:
    """Two sinks of 600 KB each: either fits in the run record, both together do not. ``late``
    holds the second until it is set; a third node, ``bad``, fails at once when ``late`` is given."""
    wf = Workflow(name)

    @wf.node()
    async def left(ctx: NodeContext) -> str:
        return "z" * 600_000

    @wf.node()
    async def right(ctx: NodeContext) -> str:
        if late is not None:
            await late.wait()
        return "z" * 600_000

    if late is not None:

        @wf.node()
        async def bad(ctx: NodeContext) -> None:
            raise NonRetryableError("bad broke")

    return wf


async def _record_of(env: LocalEnvironment, handle: Any) -> dict[str, Any]:
    record = await env.client.store.get(env.names.run_key(handle.run_id))
    assert record is not None
    return dict(record.value)


async def _marked(env: LocalEnvironment, handle: Any) -> bool:
    """Whether the run is marked: one of its sinks' results does not fit its record."""
    return await env.client.store.get(env.names.unstorable_key(handle.run_id)) is not None


async def _failed_with_nothing_to_run(env: LocalEnvironment, name: str) -> Any:
    """A run of ``_two_big_sinks(name)`` failed with every node completed and without the mark that
    refuses its retry (as an engine from before the mark leaves it)."""
    handle = await env.client.start(name, {})
    with pytest.raises(RunFailed, match="results cannot be stored"):
        await handle.result()
    await eventually(lambda: _marked(env, handle), message="the run marked")
    await env.client.store.delete(env.names.unstorable_key(handle.run_id))
    return handle


async def test_a_run_whose_results_do_not_fit_its_record_is_not_retried(env_factory: Any) -> None:
    """Its nodes all completed; it failed because its results do not fit its record. Retrying used
    to reopen it with nothing to run, running for good."""
    env: LocalEnvironment = await env_factory([_two_big_sinks("nothingleft")])
    handle = await env.client.start("nothingleft", {})
    with pytest.raises(RunFailed, match="results cannot be stored"):
        await handle.result()
    await eventually(lambda: _marked(env, handle), message="the record marked")
    with pytest.raises(RunNotRetryable, match="does not fit its record"):
        await handle.retry()
    record = await _record_of(env, handle)
    assert record["status"] == "failed"
    assert "results cannot be stored" in record["error"]["message"]
    assert not record.get("resumed")  # refused before reopening it


async def test_a_sink_result_that_comes_too_large_while_the_run_is_failed_refuses_the_retry(
    env_factory: Any,
) -> None:
    """``bad`` fails the run; ``right`` completes afterwards, and its result does not fit beside
    ``left``'s. It used to be dropped: a retry ran ``bad`` again, and then the run waited for good for
    a result it would never have."""
    late = asyncio.Event()
    env: LocalEnvironment = await env_factory([_two_big_sinks("failedbig", late)])
    handle = await env.client.start("failedbig", {})
    with pytest.raises(RunFailed, match="bad broke"):
        await handle.result()
    await eventually(lambda: _recorded(env, handle, "left", "completed"))
    late.set()
    await eventually(lambda: _recorded(env, handle, "right", "completed"))
    await eventually(lambda: _marked(env, handle), message="the record marked")
    with pytest.raises(RunNotRetryable, match="'right' does not fit its record"):
        await handle.retry()
    record = await _record_of(env, handle)
    assert record["status"] == "failed"
    assert record["error"]["message"] == "bad broke"  # the run's failure is still its own


async def _retry_with_nothing_to_run_while_waiting(env: LocalEnvironment, handle: Any) -> None:
    """Retry the run; once it is reopened, wait on it. The retry is refused (nothing to run) and
    the waiting client learns, within 10 s, that the run failed again."""
    retrying = asyncio.create_task(handle.retry())

    async def reopened() -> bool:
        return (await _record_of(env, handle))["status"] == "running"

    await eventually(reopened, within=10, interval=0.01)
    waiting = asyncio.create_task(handle.result())
    with pytest.raises(RunNotRetryable, match="no node to run again"):
        await retrying
    async with asyncio.timeout(10):
        with pytest.raises(RunFailed, match="results cannot be stored"):
            await waiting


async def test_a_retry_with_nothing_to_run_wakes_who_waits_on_the_run(env_factory: Any) -> None:
    """The retry reopens such a run, finds nothing to run, and puts it back to failed. A client that
    began waiting on it meanwhile used to wait for good."""
    env: LocalEnvironment = await env_factory([_two_big_sinks("nothingleft")])
    handle = await _failed_with_nothing_to_run(env, "nothingleft")
    await _retry_with_nothing_to_run_while_waiting(env, handle)
    record = await _record_of(env, handle)
    assert record["status"] == "failed"
    assert record["resumed"][-1]["done"]
    assert "results cannot be stored" in record["error"]["message"]


async def test_a_retry_with_nothing_to_run_that_stops_halfway_is_finished_by_the_next(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Putting the run back to failed fails once (a KV timeout). The retry used to mark itself done
    first, in a write of its own: the run then stayed running for good, since a done retry is not
    finished again and a running run is not retried."""
    env: LocalEnvironment = await env_factory([_two_big_sinks("halfnothing")])
    handle = await _failed_with_nothing_to_run(env, "halfnothing")
    store, failures = env.client.store, []
    real = store.mutate

    async def fails_once(key: str, change: Any, **options: Any) -> Any:
        current, new = await store.get(key), None
        with contextlib.suppress(Exception):  # (a change may refuse: the real write says so)
            new = change(current.value if current else None)
        if not failures and new is not None and new.get("status") == "failed":
            failures.append(key)  # the write that puts the run back to failed
            raise nats.errors.TimeoutError
        return await real(key, change, **options)

    monkeypatch.setattr(store, "mutate", fails_once)
    with pytest.raises(RetryInterrupted):
        await handle.retry()
    assert (await _record_of(env, handle))["status"] == "running"
    with pytest.raises(RunNotRetryable, match="no node to run again"):
        await handle.retry()
    record = await _record_of(env, handle)
    assert record["status"] == "failed"
    assert record["resumed"][-1]["done"]
    async with asyncio.timeout(10):
        with pytest.raises(RunFailed, match="results cannot be stored"):
            await handle.result()


async def test_the_failed_event_of_a_retry_with_nothing_to_run_is_published_again_if_it_fails(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing else would publish it: a client waiting on the reopened run would wait for good."""
    env: LocalEnvironment = await env_factory([_two_big_sinks("lostend")])
    handle = await _failed_with_nothing_to_run(env, "lostend")
    js, real, failures = env.client.bus.js, env.client.bus.js.publish, []

    async def publish(subject: str, *args: Any, **options: Any) -> Any:
        if subject.endswith("._run.failed") and not failures:
            failures.append(subject)
            raise nats.errors.TimeoutError
        return await real(subject, *args, **options)

    monkeypatch.setattr(js, "publish", publish)
    await _retry_with_nothing_to_run_while_waiting(env, handle)
    assert failures


async def test_the_mark_fits_however_full_the_failed_record_is(env_factory: Any) -> None:
    """The failed record is within 180 bytes of the server's limit when ``right``'s result comes
    late: a mark in the record itself would not have fitted, and the retry would have run ``bad``
    again and then waited for ``right``'s result for good."""
    late = asyncio.Event()
    wf = Workflow("fullrecord")

    @wf.node()
    async def left(ctx: NodeContext) -> str:
        return "y" * int(ctx.input["n"])

    @wf.node()
    async def right(ctx: NodeContext) -> str:
        await late.wait()
        return "z" * 600_000

    @wf.node()
    async def bad(ctx: NodeContext) -> None:
        raise NonRetryableError("bad broke")

    env: LocalEnvironment = await env_factory([wf])

    async def failed_with_left(n: int) -> tuple[Any, int]:
        handle = await env.client.start("fullrecord", {"n": n})
        with pytest.raises(RunFailed, match="bad broke"):
            await handle.result()

        async def left_kept() -> bool:
            return "left" in ((await _record_of(env, handle)).get("results") or {})

        await eventually(left_kept, message="left's result kept")
        return handle, len(encode(await _record_of(env, handle)))

    _, size = await failed_with_left(400_000)
    handle, size = await failed_with_left(400_000 + env.client.bus.nc.max_payload - size - 180)
    assert env.client.bus.nc.max_payload - 200 < size < env.client.bus.nc.max_payload
    late.set()
    await eventually(lambda: _marked(env, handle), message="the run marked")
    with pytest.raises(RunNotRetryable, match="'right' does not fit its record"):
        await handle.retry()


async def test_a_join_whose_upstream_outputs_are_large_can_be_retried(env_factory: Any) -> None:
    """Its retry message would carry both 600 KB outputs, over the server's message limit: it used
    to stop halfway at every try. The outputs are read from the journal instead."""
    wf = Workflow("bigjoin")
    calls, count = _counter()
    broken = {"yes": True}

    @wf.node()
    async def one(ctx: NodeContext) -> str:
        return "a" * 600_000

    @wf.node()
    async def two(ctx: NodeContext) -> str:
        return "b" * 600_000

    @wf.node(depends_on=[one, two])
    async def both(ctx: NodeContext) -> int:
        count(ctx)
        if broken["yes"]:
            raise NonRetryableError("bug in both")
        return len(ctx.output("one")) + len(ctx.output("two"))

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("bigjoin", {})
    with pytest.raises(RunFailed, match="bug in both"):
        await handle.result()
    broken["yes"] = False
    assert await handle.retry() == ["both"]
    async with asyncio.timeout(15):
        assert await handle.result() == 1_200_000
    assert calls == {"both": [1, 2]}


async def test_a_worker_started_after_the_failure_takes_a_held_message_during_the_retry(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deploy the fix: the new worker never saw the run fail. A message from before the retry
    reaches it while the retry reads the journal: it must claim (the retry announces its epoch
    before reading), so the node, which the retry issues too, runs once."""
    wf, calls, broken, release = _held_side("freshworker")
    env: LocalEnvironment = await env_factory([wf])
    js, stream = env.client.bus.js, env.names.events_stream
    held = env.names.node_consumer("freshworker", "after")
    handle = await env.client.start("freshworker", {})
    with pytest.raises(RunFailed, match="bug in fragile"):
        await handle.result()
    await js.pause_consumer(stream, held, "2099-01-01T00:00:00Z")  # a busy pool
    release.set()
    await eventually(lambda: _recorded(env, handle, "side", "completed"), within=10)
    [old] = env.workers
    await old.stop()
    env.workers.clear()
    broken["yes"] = False
    await env.add_worker()
    journal = env.client.journal

    async def held_message_taken_meanwhile(run_id: str, workflow: str) -> Any:
        events = await journal(run_id, workflow)
        await js.resume_consumer(stream, held)
        await eventually(lambda: "after" in calls, within=10)
        return events

    monkeypatch.setattr(env.client, "journal", held_message_taken_meanwhile)
    assert await handle.retry() == ["fragile", "after"]
    monkeypatch.setattr(env.client, "journal", journal)
    async with asyncio.timeout(15):
        assert await handle.result() == {"fragile": 2, "after": 11}
    await asyncio.sleep(1.0)  # a second start of after, if any, has begun by now
    assert calls == {"fragile": [1, 2], "after": [1]}


async def test_a_dead_letter_report_from_before_the_retry_does_not_fail_the_retried_run(
    env_factory: Any,
) -> None:
    """A delivery dead-lettered before the retry reports its node's attempt as failed with attempt
    0. Reaching the supervisor after a retry issued that node a later attempt, it is stale, like a
    late report of any older attempt; it used to fail the retried run (0 read as "no attempt")."""
    wf = Workflow("stale0")
    calls, count = _counter()
    release = asyncio.Event()

    @wf.node()
    async def x(ctx: NodeContext) -> int:
        count(ctx)
        if ctx.attempt == 1:
            raise NonRetryableError("x broke")
        await release.wait()
        return 7

    env: LocalEnvironment = await env_factory([wf])
    [worker] = env.workers
    assert worker.system is not None
    handle = await env.client.start("stale0", {})
    with pytest.raises(RunFailed, match="x broke"):
        await handle.result()
    assert await handle.retry() == ["x"]
    await eventually(lambda: calls.get("x") == [1, 2])
    # What give_up() sends for a message of x's from before the retry (no epoch on its headers).
    letter = Letter(env.names.run_event("stale0", handle.run_id, "started"), {}, b"")
    await worker.system._fail_waiting_node("stale0", "x", letter=letter, reason="a test's poison")
    js, stream = env.client.bus.js, env.names.events_stream

    async def handled() -> bool:
        journal = await env.client.journal(handle.run_id, "stale0")
        reports = [e for e in journal if e["kind"] == "attempt_failed"]
        info = await js.consumer_info(stream, env.names.supervisor_consumer("stale0"))
        return len(reports) == 2 and info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(handled, message="the supervisor took the report")
    assert (await _record_of(env, handle))["status"] == "running"
    release.set()
    async with asyncio.timeout(15):
        assert await handle.result() == 7


async def test_nodes_below_a_claim_won_against_the_retry_claim_too(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A completion from before the retry reaches b after the retry began: it claims b for the retry's
    epoch and b completes before the retry reads the journal. The retry then finds b's downstream
    nodes (the join j, and d) ready and issues them, while b's completion starts them too. Each runs
    once: b's lineage won a claim, so what it starts claims as well (it used to start them without
    one, as if the retry had issued them). d's scheduled retry is not held up by the claim.

    Messages are held where the worker receives them, not by pausing consumers: a resumed consumer
    serves the pull requests already waiting on it only when something new reaches it or at their
    next idle heartbeat (up to 5 s later), so what it held arrived at a time the test did not choose
    (it failed CI when the retry read the journal first)."""
    wf = Workflow("claimed_below")
    calls, count = _counter()
    broken = {"yes": True}

    @wf.node()
    async def s(ctx: NodeContext) -> int:
        return 1

    @wf.node(depends_on=[s])
    async def b(ctx: NodeContext) -> int:
        count(ctx)
        return 2

    @wf.node(depends_on=[s])
    async def c(ctx: NodeContext) -> int:
        return 3

    @wf.node(depends_on=[s])
    async def x(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.2)  # b's message is held back (below) while x fails
        if broken["yes"]:
            raise NonRetryableError("x broke")
        return 4

    @wf.node(depends_on=[b, c])
    async def j(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.3)
        return ctx.outputs["b"] + ctx.outputs["c"]

    @wf.node(depends_on=[b], retry=RetryPolicy(max_attempts=2, initial=0.1, jitter=0.0))
    async def d(ctx: NodeContext) -> int:
        count(ctx)
        await asyncio.sleep(0.3)
        if ctx.attempt == 1:  # its scheduled retry continues the node its lineage claimed: no claim
            raise ConnectionError("d's first attempt fails")
        return 5

    retried = asyncio.Event()
    real_receive = NodeActor.receive

    async def receive(self: NodeActor, msg: Any) -> None:
        if self.node.name == "b":  # s's completion, from before the retry, reaches b once it began
            run_id = msg.subject.split(".")[-3]
            heard = lambda: self.system.gate.epoch(run_id) >= 1  # noqa: E731
            await eventually(heard, within=20, message="b's worker heard of the retry")
        elif self.node.name in ("j", "d") and not retried.is_set():
            await retried.wait()  # what b's completion starts arrives after the retry issued j and d
        await real_receive(self, msg)

    monkeypatch.setattr(NodeActor, "receive", receive)
    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("claimed_below", {})
    with pytest.raises(RunFailed, match="x broke"):
        await handle.result()
    broken["yes"] = False
    real_journal = env.client.journal

    async def journal(run_id: str, workflow: str) -> list[dict[str, Any]]:
        if asyncio.current_task() is retry:  # the retry reads the journal once b completed

            async def completed() -> bool:
                events = await real_journal(run_id, workflow)
                return ("b", "completed") in [(e["node"], e["kind"]) for e in events]

            await eventually(completed, within=20, message="b completed")
        return await real_journal(run_id, workflow)

    monkeypatch.setattr(env.client, "journal", journal)
    retry = asyncio.ensure_future(handle.retry())
    assert sorted(await retry) == ["d", "j", "x"]  # b completed before the retry read the journal
    retried.set()
    assert await handle.result() == {"j": 5, "d": 5, "x": 4}
    await asyncio.sleep(1.0)  # a second start would have begun by now
    assert calls == {"x": [1, 2], "b": [1], "j": [1], "d": [1, 2]}


async def test_a_reissue_given_up_after_the_retry_fails_the_run(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every delivery of the retry's own message for x stalls its worker: at the last one it is
    dead-lettered, and its report fails the run. (The report lost the message's retry epoch, so the
    supervisor took it for a stale report of an attempt from before the retry: the run hung.)"""
    wf = Workflow("poisoned_reissue")

    @wf.node()
    async def x(ctx: NodeContext) -> int:
        if ctx.attempt == 1:
            raise NonRetryableError("x broke")
        return 7

    real = NodeActor._run_attempt

    async def run_attempt(self: Any, msg: Any, attempt: Any) -> None:
        if self.node.name == "x" and attempt.attempt >= 2:
            raise ConnectionError("the worker stalls on x's reissue")
        await real(self, msg, attempt)

    monkeypatch.setattr(NodeActor, "_run_attempt", run_attempt)
    env: LocalEnvironment = await env_factory([wf], max_deliver=3, ack_wait=1.0)
    handle = await env.client.start("poisoned_reissue", {})
    with pytest.raises(RunFailed, match="x broke"):
        await handle.result()
    assert await handle.retry() == ["x"]
    with pytest.raises(RunFailed, match="dead-lettered"):
        await handle.result()


async def test_a_claim_winner_given_up_after_the_retry_fails_the_run(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message from before the retry wins n's claim (the retry's own message for n then starts
    nothing), and every delivery of it stalls its worker. Its report carries the epoch it holds n
    for, so it fails the run instead of being taken for a stale one."""
    monkeypatch.setattr(_resume, "ANNOUNCED_WITHIN", 2.0)
    wf = Workflow("poisoned_winner")
    broken = {"yes": True}

    @wf.node()
    async def s(ctx: NodeContext) -> int:
        return 1

    @wf.node(depends_on=[s])
    async def n(ctx: NodeContext) -> int:
        return 2

    @wf.node(depends_on=[s])
    async def x(ctx: NodeContext) -> int:
        await asyncio.sleep(0.2)
        if broken["yes"]:
            raise NonRetryableError("x broke")
        return 4

    real = NodeActor._run_attempt
    retry_done = asyncio.Event()

    async def run_attempt(self: Any, msg: Any, attempt: Any) -> None:
        if self.node.name == "n" and msg.subject.endswith(".s.completed"):
            await retry_done.wait()  # the retry has named its attempts by then
            raise ConnectionError("the message from before the retry stalls its worker")
        await real(self, msg, attempt)

    monkeypatch.setattr(NodeActor, "_run_attempt", run_attempt)
    env: LocalEnvironment = await env_factory([wf], max_deliver=3, ack_wait=1.0)
    js, stream = env.client.bus.js, env.names.events_stream
    held = env.names.node_consumer("poisoned_winner", "n")
    await js.pause_consumer(stream, held, "2099-01-01T00:00:00Z")
    handle = await env.client.start("poisoned_winner", {})
    with pytest.raises(RunFailed, match="x broke"):
        await handle.result()
    broken["yes"] = False
    retry = asyncio.ensure_future(handle.retry())
    await eventually(lambda: _recorded(env, handle, "_run", "resumed"), within=10)
    await js.resume_consumer(stream, held)  # s's completion, from before the retry, claims n
    assert sorted(await retry) == ["n", "x"]
    retry_done.set()
    with pytest.raises(RunFailed, match="dead-lettered"):
        await handle.result()
