"""Observing runs: ``Client.events`` (live, replayed, per workflow) against in-process workers, then
``flowctl watch``, ``show`` and ``runs`` as subprocesses against a worker subprocess."""

from __future__ import annotations

import asyncio
import gc
import io
import re
import sys
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any
from uuid import uuid4

import nats
import nats.errors
import pytest
from rich.console import Console

from flow_orchestrator import (
    NodeContext,
    NodeStatus,
    NonRetryableError,
    RunCancelled,
    RunEvent,
    RunFailed,
    RunNotFound,
    RunStatus,
    Workflow,
)
from flow_orchestrator.bus import Interceptor, PublishInput
from flow_orchestrator.runtime._journal import fold_events
from flow_orchestrator.runtime._timeline import build_timeline, trace_id_of
from flow_orchestrator.runtime._view import watch_run
from flow_orchestrator.testing import LocalEnvironment, eventually
from tests.test_cli import CLI, ROOT, WorkerProcess, flowctl, flowctl_worker

# --- workflows hosted in-process ------------------------------------------------------------------
GATES: dict[str, asyncio.Event] = {}

held = Workflow("obs_held")


@held.node()
async def first(ctx: NodeContext) -> int:
    return 1


@held.node(depends_on=[first])
async def hold(ctx: NodeContext) -> int:
    await GATES[ctx.run_id].wait()  # the test opens the gate
    return ctx.output("first") + 1


slow_failure = Workflow("obs_slow_failure")


@slow_failure.node()
async def late(ctx: NodeContext) -> None:
    await asyncio.sleep(0.3)  # past the 0.1 s after which an attempt is announced
    raise NonRetryableError("late failure")


ENTERED: dict[str, asyncio.Event] = {}
parked = Workflow("obs_parked")


@parked.node()
async def park(ctx: NodeContext) -> None:
    ENTERED[ctx.run_id].set()
    await asyncio.Event().wait()  # until the run is cancelled


slow_start = Workflow("obs_slow_start")


@slow_start.node()
async def mid(ctx: NodeContext) -> int:
    await asyncio.sleep(0.15)  # announced at 0.1 s, while it still runs
    return 1


class SlowStartedEvents(Interceptor):
    """Holds each ``mid.started`` publish 0.3 s: the action ends while its announcement is under way."""

    async def publish(self, input: PublishInput, call_next: Any) -> None:
        if input.subject.endswith(".mid.started"):
            await asyncio.sleep(0.3)
        await call_next(input)


quick = Workflow("obs_quick")


@quick.node()
async def only(ctx: NodeContext) -> str:
    return "done"


def steps(events: list[RunEvent]) -> list[tuple[str | None, str]]:
    return [(event.node, event.kind) for event in events]


# --- the events API -------------------------------------------------------------------------------
async def test_events_follow_a_run_live_and_stop_after_it_ends(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([held])
    run_id = uuid4().hex
    GATES[run_id] = asyncio.Event()
    await env.client.start(held, run_id=run_id)
    seen: list[RunEvent] = []
    async with asyncio.timeout(20):
        # The workflow is given: the run may have no record yet.
        async for event in env.client.events(run_id, "obs_held"):
            seen.append(event)
            if (event.node, event.kind) == ("hold", "started"):
                GATES[run_id].set()  # the run can only end because this event arrived while it ran
    # `first` returns at once: its completion tells its start. `hold` runs past the worker's
    # announce_starts_after (0.1 s by default), so it is announced while it runs.
    assert steps(seen) == [
        (None, "started"),
        ("first", "completed"),
        ("hold", "started"),
        ("hold", "completed"),
        (None, "completed"),
    ]
    assert all(event.workflow == "obs_held" and event.run_id == run_id for event in seen)
    assert [event.seq for event in seen] == sorted({event.seq for event in seen})
    assert all(isinstance(event.at, float) and event.at > 0 for event in seen)
    assert seen[-1].ends_run
    assert seen[-1].data["results"] == {"hold": 2}
    assert seen[3].data["output"] == 2
    announced, ended = seen[2].data, seen[3].data
    assert announced["started_at"] == ended["started_at"] < ended["finished_at"]
    assert announced["worker"] == ended["worker"] == seen[1].data["worker"]


async def test_a_long_attempt_is_announced_while_it_runs_and_before_its_outcome(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([slow_failure])
    handle = await env.client.start(slow_failure)

    async def announced() -> list[tuple[str, str]] | None:
        kinds = [(e["node"], e["kind"]) for e in await env.client.journal(handle.run_id, "obs_slow_failure")]
        return kinds if ("late", "started") in kinds else None

    assert ("late", "attempt_failed") not in await eventually(announced)  # seen while the action ran
    with pytest.raises(RunFailed):
        await handle.result()
    journal = await env.client.journal(handle.run_id, "obs_slow_failure")
    late_events = [e for e in journal if e["node"] == "late"]
    assert [e["kind"] for e in late_events] == ["started", "attempt_failed"]
    started, failed = late_events[0]["data"], late_events[1]["data"]
    assert started["started_at"] == failed["started_at"]
    assert failed["finished_at"] - failed["started_at"] >= 0.3
    assert started["worker"] == failed["worker"] == env.workers[0].worker_id


async def test_a_held_attempt_keeps_no_spent_announcement_timer(env_factory: Any) -> None:
    """Once a long attempt is announced, it drops the timer that announced it: held runs would
    otherwise each keep a spent timer handle (about 2 MB over ``bench.memory``'s 10,000)."""
    env: LocalEnvironment = await env_factory([held])
    run_id = uuid4().hex
    GATES[run_id] = asyncio.Event()
    handle = await env.client.start(held, run_id=run_id)

    async def hold_announced() -> bool:
        journal = await env.client.journal(run_id, "obs_held")
        return any(e["node"] == "hold" and e["kind"] == "started" for e in journal)

    await eventually(hold_announced)

    def announcement_timers() -> int:
        return sum(
            1
            for obj in gc.get_objects()
            if isinstance(obj, asyncio.TimerHandle)
            and getattr(obj._callback, "__name__", "") == "_announce_later"
        )

    try:
        assert announcement_timers() == 0  # the action still runs: only the spent handle could be left
    finally:
        GATES[run_id].set()
    assert await handle.result() == 2


async def test_an_announcement_under_way_is_published_before_the_outcome(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([slow_start], interceptors=[SlowStartedEvents()])
    handle = await env.client.start(slow_start)
    assert await handle.result() == 1
    journal = await env.client.journal(handle.run_id, "obs_slow_start")
    assert [e["kind"] for e in journal if e["node"] == "mid"] == ["started", "completed"]


async def test_a_run_cancelled_before_its_attempt_was_announced_keeps_the_attempts_start(
    env_factory: Any,
) -> None:
    env: LocalEnvironment = await env_factory([parked])
    run_id = uuid4().hex
    ENTERED[run_id] = asyncio.Event()
    handle = await env.client.start(parked, run_id=run_id)
    await asyncio.wait_for(ENTERED[run_id].wait(), 10)
    await handle.cancel("at once")  # well within the first 0.1 s of the attempt, usually
    with pytest.raises(RunCancelled):
        await handle.result()

    async def cancelled() -> dict[str, Any] | None:
        journal = await env.client.journal(run_id, "obs_parked")
        return next((e for e in journal if (e["node"], e["kind"]) == ("park", "cancelled")), None)

    event = (await eventually(cancelled))["data"]
    assert event["started_at"] <= event["finished_at"]
    assert event["worker"] == env.workers[0].worker_id
    view = (await handle.status()).nodes["park"]
    assert view.status is NodeStatus.CANCELLED
    assert view.started_at == event["started_at"]


def test_a_node_view_takes_each_attempts_start_from_its_own_events() -> None:
    """Pure folding: an attempt that failed quickly has no started event, and an earlier attempt's
    must not stand in for it."""
    first = {"attempt": 1, "retry": True, "started_at": 10.0, "finished_at": 10.5}
    events = [
        {"node": "n", "kind": "started", "at": 10.1, "data": {"attempt": 1, "started_at": 10.0}},
        {"node": "n", "kind": "attempt_failed", "at": 10.5, "data": first},
        {"node": "n", "kind": "attempt_failed", "at": 70.0, "data": {"attempt": 2, "started_at": 69.99}},
        {"node": "q", "kind": "attempt_failed", "at": 5.0, "data": {"attempt": 1, "started_at": 4.99}},
        {"node": "c", "kind": "cancelled", "at": 8.0, "data": {"attempt": 1, "started_at": 7.5}},
    ]
    views = fold_events(events)
    assert (views["n"].attempts, views["n"].started_at, views["n"].finished_at) == (2, 69.99, 70.0)
    assert views["n"].status is NodeStatus.FAILED
    assert views["q"].started_at == 4.99
    assert (views["c"].status, views["c"].started_at) == (NodeStatus.CANCELLED, 7.5)


def test_a_completion_after_a_dead_lettered_messages_report_counts() -> None:
    """Pure folding: a join failed by the report of a dead-lettered upstream message (attempt 0),
    which a stalled delivery of that message made ready after all, completed: it is completed. An
    attempt's own failure stays final."""
    poison = {"attempt": 0, "retry": False, "error": {"type": "PoisonMessage", "message": "dead-lettered"}}
    events = [
        {"node": "j", "kind": "started", "at": 1.0, "data": {"attempt": 1, "started_at": 1.0}},
        {"node": "j", "kind": "attempt_failed", "at": 1.1, "data": poison},
        {"node": "j", "kind": "completed", "at": 2.0, "data": {"attempt": 1, "output": 3}},
        {"node": "k", "kind": "attempt_failed", "at": 1.0, "data": {"attempt": 1, "error": {"type": "E"}}},
        {"node": "k", "kind": "completed", "at": 2.0, "data": {"attempt": 1, "output": 4}},
    ]
    views = fold_events(events)
    assert (views["j"].status, views["j"].output, views["j"].error) == (NodeStatus.COMPLETED, 3, None)
    assert (views["k"].status, views["k"].output) == (NodeStatus.FAILED, None)


async def test_every_start_is_announced_when_asked(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([quick], announce_starts_after=0)
    handle = await env.client.start(quick)
    assert await handle.result() == "done"
    async with asyncio.timeout(20):
        replayed = [event async for event in env.client.events(handle.run_id)]
    announced = [(None, "started"), ("only", "started"), ("only", "completed"), (None, "completed")]
    assert steps(replayed) == announced
    assert replayed[1].data["started_at"] == replayed[2].data["started_at"]


async def test_events_of_a_finished_run_replay_its_journal_and_stop(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([quick])
    handle = await env.client.start(quick)
    assert await handle.result() == "done"
    async with asyncio.timeout(20):
        replayed = [event async for event in env.client.events(handle.run_id)]  # workflow from the record
    assert steps(replayed) == [(None, "started"), ("only", "completed"), (None, "completed")]
    done = replayed[1].data
    assert done["started_at"] <= done["finished_at"]
    assert done["worker"] == env.workers[0].worker_id
    journal = await env.client.journal(handle.run_id, "obs_quick")
    assert [event.journal_entry() for event in replayed] == [
        {key: entry[key] for key in ("node", "kind", "at", "data")} for entry in journal
    ]
    with pytest.raises(RunNotFound, match="no run with id 'never-ran'"):
        await anext(env.client.events("never-ran"))


async def test_workflow_events_see_every_run(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([quick])
    ended: dict[str, str] = {}
    async with (
        asyncio.timeout(20),
        aclosing(env.client.workflow_events("obs_quick", from_start=True)) as events,
    ):
        started = {(await env.client.start(quick)).run_id for _ in range(2)}
        async for event in events:
            if event.ends_run:
                ended[event.run_id] = event.kind
            if len(ended) == 2:
                break
    assert ended == dict.fromkeys(started, "completed")


async def test_workflow_events_by_default_start_from_now(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([quick])
    earlier = await env.client.start(quick)
    await earlier.result()
    probe = env.names.run_event("obs_quick", "probe", "probe")  # an event no worker listens for

    async with aclosing(env.client.workflow_events("obs_quick")) as events:
        first_event = asyncio.ensure_future(anext(events))
        async with asyncio.timeout(20):
            # Once the follower yields a probe stored after it started, it is surely following.
            while not first_event.done():
                await env.client.bus.js.publish(probe, b"")
                await asyncio.wait([first_event], timeout=0.2)
            assert (first_event.result().run_id, first_event.result().kind) == ("probe", "probe")
            later = await env.client.start(quick)
            event = await anext(events)
            while event.run_id == "probe":  # probes published before the first was yielded
                event = await anext(events)
    assert (event.run_id, event.node, event.kind) == (later.run_id, None, "started")


async def test_watch_run_draws_the_dag_live_on_a_terminal(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([held])
    run_id = uuid4().hex
    GATES[run_id] = asyncio.Event()
    handle = await env.client.start(held, run_id=run_id)
    output = io.StringIO()
    console = Console(file=output, force_terminal=True, width=100)
    watching = asyncio.ensure_future(watch_run(env.client, handle, console))

    def drawn_hold_running() -> bool:
        plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.getvalue())  # without the terminal codes
        return re.search(r"│\s+hold\s+│ running\s+│\s+1 │", plain) is not None

    try:
        await eventually(drawn_hold_running, within=20, message="the live view shows hold running")
        assert not watching.done()
        GATES[run_id].set()
        async with asyncio.timeout(20):
            snapshot = await watching
    finally:
        watching.cancel()
    assert snapshot.status is RunStatus.COMPLETED
    assert [(name, node.status.value) for name, node in snapshot.nodes.items()] == [
        ("first", "completed"),
        ("hold", "completed"),
    ]


# --- the timeline (pure) --------------------------------------------------------------------------
def test_trace_id_comes_from_the_records_traceparent() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id_of({"trace": {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}}) == trace_id
    assert trace_id_of({}) is None
    assert trace_id_of({"trace": {"traceparent": "garbage"}}) is None


def test_timeline_has_one_span_per_attempt() -> None:
    def event(node: str, kind: str, at: float, **data: Any) -> dict[str, Any]:
        return {"node": node, "kind": kind, "at": at, "data": data}

    journal = [
        event("_run", "started", 100.0),
        event("a", "started", 100.1, attempt=1, started_at=100.1),
        event("a", "attempt_failed", 100.2, attempt=1, retry=True, error={"type": "E", "message": "x"}),
        event("a", "retrying", 100.2, attempt=1),
        event("a", "retry", 100.5, attempt=2),
        event("a", "started", 100.5, attempt=2, started_at=100.5),
        event("a", "lost", 101.0, attempt=2),
        event("a", "started", 101.0, attempt=3, started_at=101.0),
        event("a", "completed", 101.2, attempt=3, started_at=101.0, finished_at=101.2),
        event("b", "started", 101.3, attempt=1, started_at=101.3),
    ]
    record = {"workflow": "w", "status": "running", "created_at": 100.0}
    timeline = build_timeline("r", record, journal, ["a", "b"], now=102.0)
    assert [(s.node, s.attempt, s.outcome) for s in timeline.spans] == [
        ("a", 1, "retried"),
        ("a", 2, "lost"),
        ("a", 3, "completed"),
        ("b", 1, "running"),
    ]
    assert timeline.spans[0].error == "E: x"
    assert timeline.spans[3].finished_at == 102.0  # still running: it runs until now
    document = timeline.to_json()
    assert document["duration_ms"] == pytest.approx(2000.0)
    assert document["attempts"][2]["start_ms"] == pytest.approx(1000.0)
    assert document["attempts"][2]["duration_ms"] == pytest.approx(200.0)

    ended = build_timeline("r", {**record, "status": "failed", "finished_at": 101.5}, journal, ["a", "b"])
    assert ended.spans[3].outcome == "unfinished"
    assert ended.spans[3].finished_at is None


# --- flowctl watch / show / runs ------------------------------------------------------------------
HOSTED = "tests.cli_workflows:observed"


@pytest.fixture
async def worker(subprocess_env: dict[str, str], tmp_path: Path) -> AsyncIterator[WorkerProcess]:
    """A ``flowctl worker`` subprocess hosting the CLI workflows and ``cli_gated``."""
    async with flowctl_worker(HOSTED, subprocess_env, tmp_path / "worker.log") as started:
        yield started


@pytest.mark.slow
async def test_watch_follows_a_running_run_and_exits_0(
    worker: WorkerProcess, subprocess_env: dict[str, str], nats_url: str, tmp_path: Path
) -> None:
    prefix = ("--prefix", worker.prefix)
    gate = f"gate.{uuid4().hex}"
    fired = await flowctl(
        "trigger", "cli_gated", "--input", f'{{"gate": "{gate}"}}', *prefix, env=subprocess_env
    )
    assert fired.code == 0, fired.err
    run_id = fired.out.strip()
    await eventually(
        lambda: _status_of(subprocess_env, worker.prefix, run_id), within=30, message="run accepted"
    )
    out = tmp_path / "watch.out"
    with out.open("wb") as sink:
        watcher = await asyncio.create_subprocess_exec(
            sys.executable, "-m", CLI, "watch", run_id, *prefix, cwd=ROOT, env=subprocess_env,
            stdin=asyncio.subprocess.DEVNULL, stdout=sink, stderr=sink,
        )  # fmt: skip
    try:
        await eventually(
            lambda: re.search(r"wait_for_gate\s+running \(attempt 1\)", out.read_text()),
            within=30,
            message="watch shows the gated node running",
        )
        assert watcher.returncode is None  # still watching: the run is waiting for us
        nc = await nats.connect(nats_url)
        try:
            # The node may not listen yet: no responders means "not yet".
            await eventually(
                lambda: nc.request(gate, b"go", timeout=1),
                within=30,
                message="gate opened",
                retry_on=(nats.errors.NoRespondersError, nats.errors.TimeoutError),
            )
        finally:
            await nc.close()
        async with asyncio.timeout(30):
            code = await watcher.wait()
    finally:
        if watcher.returncode is None:
            watcher.kill()
            await watcher.wait()
    text = out.read_text()
    assert code == 0, text
    lines = text.splitlines()
    first_line = next(i for i, line in enumerate(lines) if "prepare" in line)
    assert re.match(rf"\s+[\d.]+s\s+run {run_id} running$", lines[first_line - 1])
    assert re.search(r"^\s+[\d.]+s\s+prepare\s+completed \(attempt 1\)$", text, re.M)
    assert re.search(r"^\s+[\d.]+s\s+wait_for_gate\s+completed \(attempt 1\)$", text, re.M)
    assert re.search(rf"^\s+[\d.]+s\s+run {run_id} completed$", text, re.M)
    # The final view is the DAG: nodes indented by depth, with status and attempts.
    assert re.search(r"│ prepare\s+│ completed\s+│\s+1 │", text)
    assert re.search(r"│   wait_for_gate\s+│ completed\s+│\s+1 │", text)
    assert re.search(r"│     finish\s+│ completed\s+│\s+1 │", text)
    assert '"the gate said go"' in text
    assert "\x1b[" not in text


async def _status_of(env: dict[str, str], prefix: str, run_id: str) -> bool:
    return (await flowctl("status", run_id, "--json", "--prefix", prefix, env=env)).code == 0


@pytest.mark.slow
async def test_watch_of_a_failed_run_exits_1(worker: WorkerProcess, subprocess_env: dict[str, str]) -> None:
    prefix = ("--prefix", worker.prefix)
    failed = await flowctl("run", "cli_fail", "--json", *prefix, env=subprocess_env)
    assert failed.code == 1, failed.err
    run_id = failed.json()["run_id"]
    watched = await flowctl("watch", run_id, *prefix, env=subprocess_env)
    assert watched.code == 1, watched.out + watched.err
    out = watched.out
    assert re.search(r"explode\s+failed \(attempt 1\) ValueError: boom: the widget is missing$", out, re.M)
    assert re.search(r"after\s+skipped$", out, re.M)
    assert re.search(rf"run {run_id} failed$", out, re.M)
    assert "run failed at node explode: ValueError: boom: the widget is missing" in out

    missing = await flowctl("watch", "never-started", *prefix, env=subprocess_env)
    assert missing.code == 2
    assert "no run with id 'never-started'" in missing.err


@pytest.mark.slow
async def test_run_text_raises_the_rejection_instead_of_waiting(
    worker: WorkerProcess, subprocess_env: dict[str, str]
) -> None:
    result = await flowctl(
        "run", "cli_sum", "--input", '{"a": "three", "b": 4}', "--prefix", worker.prefix, env=subprocess_env
    )
    assert result.code == 2, result.out + result.err
    assert "does not match SumIn" in result.err


@pytest.mark.slow
async def test_show_draws_every_attempt_with_its_outcome_and_the_trace(
    worker: WorkerProcess, subprocess_env: dict[str, str]
) -> None:
    prefix = ("--prefix", worker.prefix)
    ran = await flowctl(
        "run", "cli_sum", "--input", '{"a": 1, "b": 2}', "--json", *prefix, env=subprocess_env
    )
    assert ran.code == 0, ran.err
    run_id = ran.json()["run_id"]

    shown = await flowctl("show", run_id, *prefix, env=subprocess_env)
    assert shown.code == 0, shown.err
    out = shown.out
    assert re.search(rf"^run {run_id} of cli_sum: completed in [\d.]+ ms$", out, re.M)
    assert re.search(r"^trace: ([0-9a-f]{32}|\(tracing off\))$", out, re.M)
    rows = re.findall(r"^│ (\w+)\s+│\s+(\d+) │ [ █]+ │\s+([\d.]+) │ (\w+)\s+│$", out, re.M)
    assert sorted((node, int(attempt), outcome) for node, attempt, _, outcome in rows) == [
        ("double", 1, "retried"),
        ("double", 2, "completed"),
        ("parse", 1, "completed"),
        ("square", 1, "completed"),
        ("total", 1, "completed"),
    ]
    assert rows[0][0] == "parse"  # in order of start
    assert "double attempt 1: RuntimeError: flaky on the first attempt" in out

    as_json = await flowctl("show", run_id, "--json", *prefix, env=subprocess_env)
    assert as_json.code == 0, as_json.err
    document = as_json.json()
    assert document["run_id"] == run_id
    assert document["status"] == "completed"
    assert document["trace_id"] is None or re.fullmatch(r"[0-9a-f]{32}", document["trace_id"])
    attempts = document["attempts"]
    assert [(a["node"], a["attempt"], a["outcome"]) for a in attempts if a["node"] == "double"] == [
        ("double", 1, "retried"),
        ("double", 2, "completed"),
    ]
    assert [a["error"] for a in attempts if a["outcome"] == "retried"] == [
        "RuntimeError: flaky on the first attempt"
    ]
    for attempt in attempts:
        assert 0 <= attempt["start_ms"] <= attempt["end_ms"] <= document["duration_ms"]
        assert attempt["duration_ms"] == pytest.approx(attempt["end_ms"] - attempt["start_ms"], abs=0.01)


@pytest.mark.slow
async def test_runs_lists_status_and_duration(worker: WorkerProcess, subprocess_env: dict[str, str]) -> None:
    prefix = ("--prefix", worker.prefix)
    ran = await flowctl(
        "run", "cli_sum", "--input", '{"a": 1, "b": 2}', "--json", *prefix, env=subprocess_env
    )
    run_id = ran.json()["run_id"]
    listed = await flowctl("runs", *prefix, env=subprocess_env)
    assert listed.code == 0, listed.err
    assert re.search(r"┃ run id\s+┃ workflow\s+┃ status\s+┃ created\s+┃ duration s ┃", listed.out)
    assert re.search(rf"│ {run_id} │ cli_sum\s+│ completed │ [\d: -]+ │\s+\d+\.\d\d │", listed.out)
