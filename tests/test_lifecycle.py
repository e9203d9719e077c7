"""Worker lifecycle: a pending retry survives a worker restart; stopping drains in-flight attempts."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import pytest
from nats.js.api import ConsumerConfig

from flow_orchestrator import NodeContext, NodeStatus, RetryPolicy, RunFailed, StorageSettings, Workflow
from flow_orchestrator.actors._system import RunGate
from flow_orchestrator.runtime._resume import RunNotRetryable
from flow_orchestrator.testing import LocalEnvironment, eventually
from tests import workflows


def _retrying_workflow(name: str, delay: float) -> Workflow:
    wf = Workflow(name)

    @wf.node(retry=RetryPolicy(max_attempts=2, initial=delay, jitter=0.0))
    async def once_broken(ctx: NodeContext) -> dict[str, int]:
        if ctx.attempt == 1:
            raise ConnectionError("downstream service unavailable")
        return {"attempt": ctx.attempt}

    return wf


async def test_retry_delay_survives_a_worker_restart(env_factory: Any) -> None:
    wf = _retrying_workflow("restartable", delay=1.5)
    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("restartable", {})

    async def retry_scheduled() -> bool:
        return (await handle.status()).nodes["once_broken"].status is NodeStatus.RETRYING

    await eventually(retry_scheduled, within=10)
    for worker in env.workers:
        await worker.stop()
    env.workers.clear()
    await asyncio.sleep(2.0)  # the retry comes due while no worker runs: it waits in the stream
    await env.add_worker()
    assert await handle.result() == {"attempt": 2}
    journal = await env.client.journal(handle.run_id, "restartable")
    [scheduled] = [e for e in journal if e["kind"] == "retrying"]
    assert scheduled["data"]["delay"] == 1.5
    [retried] = [e for e in journal if e["kind"] == "retry"]
    assert retried["headers"]["Nats-Scheduler"].endswith(
        ".once_broken.2"
    )  # delivered by the server's scheduler


async def test_stop_drains_in_flight_attempts(env_factory: Any) -> None:
    wf = Workflow("draining")
    started = asyncio.Event()

    @wf.node()
    async def slow(ctx: NodeContext) -> str:
        started.set()
        await asyncio.sleep(0.5)
        return "done"

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("draining", {})
    await asyncio.wait_for(started.wait(), 10)
    [worker] = env.workers
    assert worker.in_flight >= 1
    await worker.stop()  # returns only after the attempt finished and its completion was published
    env.workers.clear()
    journal = await env.client.journal(handle.run_id, "draining")
    assert [e["data"]["output"] for e in journal if e["kind"] == "completed"] == ["done"]
    # The run's bookkeeping (the supervisor's run completion) resumes with the next worker.
    await env.add_worker()
    assert await handle.result() == "done"


async def test_stop_releases_attempts_that_outlive_the_grace(env_factory: Any) -> None:
    wf = Workflow("released")
    attempts: list[int] = []

    @wf.node()
    async def stubborn(ctx: NodeContext) -> int:
        attempts.append(ctx.attempt)
        if len(attempts) == 1:
            await asyncio.sleep(30)
        return ctx.attempt

    env: LocalEnvironment = await env_factory([wf], shutdown_grace=0.2)
    handle = await env.client.start("released", {})
    await eventually(lambda: attempts, within=10)
    [worker] = env.workers
    await worker.stop()  # the attempt is cancelled and its message released (nak) for another worker
    env.workers.clear()
    await env.add_worker()
    assert await handle.result() == 2
    journal = await env.client.journal(handle.run_id, "released")
    assert [e["data"]["attempt"] for e in journal if e["kind"] == "lost"] == [1]


async def test_back_pressure_leaves_surplus_work_in_jetstream(env_factory: Any) -> None:
    wf = Workflow("pressured")
    release = asyncio.Event()

    @wf.node()
    async def hold(ctx: NodeContext) -> str:
        await release.wait()
        return ctx.run_id

    env: LocalEnvironment = await env_factory([wf], max_in_flight=3)
    handles = [await env.client.start("pressured", {}) for _ in range(12)]
    # Runs start (bookkeeping is not limited), but only three attempts are taken: the rest waits in
    # the stream, not in the worker's memory.
    await eventually(
        lambda: _consumer(
            env, "node_pressured_hold", lambda i: i.num_ack_pending == 3 and i.num_pending == 9
        ),
        within=10,
    )
    [first] = env.workers
    assert first.system is not None
    assert first.system.capacity.held == 3
    second = await env.add_worker(max_in_flight=3)  # another worker takes a share at once
    await eventually(
        lambda: _consumer(env, "node_pressured_hold", lambda i: i.num_ack_pending == 6), within=10
    )
    assert second.system is not None
    assert second.system.capacity.held == 3
    release.set()
    assert sorted([await h.result() for h in handles]) == sorted(h.run_id for h in handles)


async def _consumer(env: LocalEnvironment, name: str, check: Any) -> Any:
    info = await env.client.bus.js.consumer_info(env.names.events_stream, name)
    return info if check(info) else None


async def test_retry_a_failed_run_from_its_failed_nodes(env_factory: Any) -> None:
    wf = Workflow("fixable")
    calls: dict[str, int] = {}
    broken = {"yes": True}

    def counted(name: str) -> None:
        calls[name] = calls.get(name, 0) + 1

    @wf.node()
    async def prepare(ctx: NodeContext) -> int:
        counted("prepare")
        await ctx.data.set("prepared", True)
        return 1

    @wf.node(depends_on=[prepare])
    async def fragile(ctx: NodeContext) -> int:
        counted("fragile")
        if broken["yes"]:
            raise RuntimeError("bug in fragile")
        return ctx.output("prepare") + 1

    @wf.node(depends_on=[prepare])
    async def slow_side(ctx: NodeContext) -> int:
        counted("slow_side")
        await asyncio.sleep(0.3)
        return 10

    @wf.node(depends_on=[slow_side])
    async def after_side(ctx: NodeContext) -> int:  # ready only after the run already failed
        counted("after_side")
        return ctx.output("slow_side") + 1

    @wf.node(depends_on=[fragile, after_side])
    async def finish(ctx: NodeContext) -> int:
        counted("finish")
        assert await ctx.data.get_bool("prepared")
        return ctx.output("fragile") + ctx.output("after_side")

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("fixable", {})
    with pytest.raises(RunFailed, match="bug in fragile"):
        await handle.result()
    await eventually(lambda: calls.get("slow_side") == 1, within=10)
    await asyncio.sleep(0.5)  # slow_side completes after the failure; after_side must not start
    assert "after_side" not in calls
    broken["yes"] = False  # "deploy the fix"
    resumed = await handle.retry()
    assert resumed == ["fragile", "after_side"]
    assert await handle.result() == 2 + 11
    assert calls == {"prepare": 1, "fragile": 2, "slow_side": 1, "after_side": 1, "finish": 1}
    snapshot = await handle.status()
    assert snapshot.nodes["fragile"].attempts == 2
    with pytest.raises(RunNotRetryable, match="completed"):
        await handle.retry()


async def test_a_retried_runs_join_counts_an_upstream_that_completed_after_the_failure(
    env_factory: Any,
) -> None:
    """The failed run's workers drop its messages, but not a join's arrivals: a join whose other
    upstream completed after the failure must still start once the failed one succeeds."""
    wf = Workflow("latejoin")
    broken = {"yes": True}

    @wf.node()
    async def first(ctx: NodeContext) -> int:
        return 1

    @wf.node(depends_on=[first])
    async def fragile(ctx: NodeContext) -> int:
        if broken["yes"]:
            raise RuntimeError("bug in fragile")
        return 2

    @wf.node(depends_on=[first])
    async def slow_side(ctx: NodeContext) -> int:
        await asyncio.sleep(0.3)  # completes after the run has failed
        return 10

    @wf.node(depends_on=[fragile, slow_side])
    async def join(ctx: NodeContext) -> int:
        return ctx.output("fragile") + ctx.output("slow_side")

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("latejoin", {})
    with pytest.raises(RunFailed, match="bug in fragile"):
        await handle.result()

    async def side_completed() -> bool:
        events = await env.client.journal(handle.run_id, "latejoin")
        kinds = [(e["node"], e["kind"]) for e in events]
        return ("slow_side", "completed") in kinds and kinds.index(("_run", "failed")) < kinds.index(
            ("slow_side", "completed")
        )

    await eventually(side_completed, within=10)
    await asyncio.sleep(0.3)  # its arrival at the join is handled meanwhile
    broken["yes"] = False
    assert await handle.retry() == ["fragile"]
    async with asyncio.timeout(15):  # it used to wait for ever: the join never learnt of slow_side
        assert await handle.result() == 12


async def test_finished_runs_expire_but_the_workflow_registry_stays(env_factory: Any) -> None:
    wf = Workflow("shortlived")

    @wf.node()
    async def only(ctx: NodeContext) -> int:
        await ctx.data.set("k", 1)
        return 1

    # 3 s, not less: the registry refresh (every 0.75 s) must survive a loaded CI machine's stalls.
    env: LocalEnvironment = await env_factory([wf], storage=StorageSettings.retained_for(3.0))
    handle = await env.client.start("shortlived", {})
    assert await handle.result() == 1
    store, names = env.client.store, env.names

    async def expired() -> bool:
        journal = await env.client.journal(handle.run_id, "shortlived")
        run = await store.get(names.run_key(handle.run_id))
        data = await store.get(names.data_key(handle.run_id, "k"))
        return not journal and run is None and data is None

    await eventually(expired, within=15, message="run state expired")
    # The worker refreshes its registry record (every TTL/4, at least every second), so it outlives
    # the TTL, and new runs still start.
    assert await store.get(names.workflow_key("shortlived")) is not None
    assert await env.client.run("shortlived", {}) == 1


async def test_the_run_gate_cancels_every_attempt_it_tracks() -> None:
    gate = RunGate()
    sleepers = [asyncio.create_task(asyncio.sleep(30)) for _ in range(3)]
    gate.track("r1", sleepers[0])
    gate.track("r1", sleepers[1])  # a second attempt of the same run on this worker
    gate.track("r2", sleepers[2])
    gate.untrack("r1", sleepers[1])
    gate.track("r1", sleepers[1])
    gate.close("r1", "cancelled")
    gate.close("r2", "failed")  # a failed run's attempts are not cancelled
    await asyncio.wait(sleepers[:2], timeout=5)
    assert [task.cancelled() for task in sleepers] == [True, True, False]
    gate.untrack("r2", sleepers[2])
    gate.untrack("r2", sleepers[2])  # twice is harmless
    sleepers[2].cancel()
    assert gate.closed("r1") == "cancelled"


async def test_setting_up_a_consumer_waits_for_a_server_slow_to_answer(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: LocalEnvironment = await env_factory([workflows.diamond])
    system = env.workers[0].system
    assert system is not None
    real = system.bus.js.add_consumer
    calls = 0

    async def slow_then_fine(stream: str, config: Any = None, **options: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise nats.errors.TimeoutError  # the server did not answer in time
        return await real(stream, config, **options)

    monkeypatch.setattr(system.bus.js, "add_consumer", slow_then_fine)
    config = ConsumerConfig(
        durable_name="patience", filter_subject=env.names.event("x", "r", "n", "completed")
    )
    await system.ensure_consumer(env.names.events_stream, config)
    assert calls == 3
    info = await env.client.bus.js.consumer_info(env.names.events_stream, "patience")
    assert info.config.durable_name == "patience"
