"""Join bookkeeping against real KV: coalesced arrivals, and a failed batched write losing nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import pytest

from flow_orchestrator import NodeContext, NonRetryableError, RetryPolicy, RunFailed, Workflow
from flow_orchestrator._errors import UnencodableValue
from flow_orchestrator.actors import _join
from flow_orchestrator.actors._join import JoinBook, JoinNotRecorded
from flow_orchestrator.actors._node import NodeActor
from flow_orchestrator.actors._supervisor import SupervisorActor
from flow_orchestrator.bus import _journal, _kv, encode
from flow_orchestrator.testing import LocalEnvironment, eventually


async def test_a_failed_batched_write_loses_no_arrival(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: LocalEnvironment = await env_factory([])
    store = env.client.store
    book = JoinBook(store, {"a", "b", "c"})
    real_mutate = store.mutate
    calls = 0

    async def flaky_mutate(key: str, change: Any, **options: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            await asyncio.sleep(0.05)  # a's write is slow: b and c queue up behind it
        if calls == 2:
            raise nats.errors.TimeoutError  # b's batch, which also carries c's arrival, fails
        return await real_mutate(key, change, **options)

    monkeypatch.setattr(store, "mutate", flaky_mutate)
    a = asyncio.create_task(book.arrive("join.r1.n", "a", 1))
    await asyncio.sleep(0.01)
    b = asyncio.create_task(book.arrive("join.r1.n", "b", 2))
    c = asyncio.create_task(book.arrive("join.r1.n", "c", 3))
    results = await asyncio.gather(a, b, c, return_exceptions=True)
    assert results[0] == {"arrived": ["a"], "holder": None, "outputs": {}}
    assert isinstance(results[1], nats.errors.TimeoutError)  # b is not acknowledged: it comes back
    # c's arrival rode in b's failed batch: it was handed back and written by c, with b's, so c's
    # message completes the set and wins the join.
    assert results[2] == {"arrived": ["a", "c", "b"], "holder": 3, "outputs": {}} or results[2] == {
        "arrived": ["a", "b", "c"],
        "holder": 3,
        "outputs": {},
    }
    # b's redelivery finds its arrival recorded and another message holding the join.
    again = await book.arrive("join.r1.n", "b", 2)
    assert again is not None
    assert again["holder"] == 3


async def test_an_arrival_whose_write_never_landed_is_not_acknowledged(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: LocalEnvironment = await env_factory([])
    store = env.client.store
    book = JoinBook(store, {"a", "b"})
    latest = {"arrived": ["a"], "holder": None, "outputs": {}}

    async def stale_mutate(key: str, change: Any, **options: Any) -> Any:
        return latest, 1  # a write that does not include this arrival (it must not be trusted)

    monkeypatch.setattr(store, "mutate", stale_mutate)
    with pytest.raises(JoinNotRecorded):
        await book.arrive("join.r2.n", "b", 7)


async def test_two_books_racing_on_one_join_start_from_what_they_wrote(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker's book guesses the key is as it last wrote it (absent at first): a right guess
    saves the read, a wrong one (the other worker wrote) costs a conflict and one read, never an
    arrival. A failed create has read the key on the way: the retry uses that read."""
    env: LocalEnvironment = await env_factory([])
    store = env.client.store
    reads = 0
    bucket = store.bucket
    real_get = bucket.get

    async def counted_get(key: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        return await real_get(key, *args, **kwargs)

    monkeypatch.setattr(bucket, "get", counted_get)
    needed = {"a", "b", "c", "d"}
    one, two = JoinBook(store, needed), JoinBook(store, needed)
    assert await one.arrive("join.r2.n", "a", 1) == {"arrived": ["a"], "holder": None, "outputs": {}}
    assert reads == 0  # created without reading: the guess "absent" was right
    assert await one.arrive("join.r2.n", "b", 2) == {"arrived": ["a", "b"], "holder": None, "outputs": {}}
    assert reads == 0  # updated from the revision it wrote
    third = await two.arrive("join.r2.n", "c", 3)  # the other book guessed "absent": wrong
    assert third == {"arrived": ["a", "b", "c"], "holder": None, "outputs": {}}
    assert reads == 1  # the failed create's own read, nothing more
    reads = 0
    last = await one.arrive("join.r2.n", "d", 4)  # one's guess is stale now: conflict, read, retry
    assert last == {"arrived": ["a", "b", "c", "d"], "holder": 4, "outputs": {}}
    assert reads == 1
    stored = await store.get("join.r2.n")
    assert stored is not None
    assert stored.value == last


async def test_a_decided_join_is_not_kept_in_the_workers_memory(env_factory: Any) -> None:
    """A worker remembers what it last wrote to a join only until the join is decided: after that
    no arrival writes it again, and holding it would keep its outputs (28 KB a fan100 run) until
    4,096 other joins pushed it out."""
    env: LocalEnvironment = await env_factory([])
    book = JoinBook(env.client.store, {"a", "b"})
    await book.arrive("join.r5.n", "a", 1, {"x": 1})
    assert "join.r5.n" in book._written  # undecided: the next arrival writes from it
    decided = await book.arrive("join.r5.n", "b", 2, {"x": 2})
    assert decided is not None
    assert decided["holder"] == 2
    assert "join.r5.n" not in book._written
    again = await book.arrive("join.r5.n", "a", 1, {"x": 1})  # a redelivery reads the record
    assert again == decided


async def test_a_join_written_long_ago_is_forgotten(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker may decide a join this one wrote to, and nothing tells this one: what it wrote
    is forgotten after ``WRITTEN_FOR`` seconds; a later arrival finds the record all the same."""
    monkeypatch.setattr(_join, "WRITTEN_FOR", 0.05)
    env: LocalEnvironment = await env_factory([])
    book = JoinBook(env.client.store, {"a", "b", "c"})
    await book.arrive("join.r6.n", "a", 1)
    await book.arrive("join.r7.n", "a", 1)
    assert list(book._written) == ["join.r6.n", "join.r7.n"]
    await asyncio.sleep(0.1)
    late = await book.arrive("join.r7.n", "b", 2)  # guessed absent: the create fails, the read is used
    assert late == {"arrived": ["a", "b"], "holder": None, "outputs": {}}
    assert list(book._written) == ["join.r7.n"]  # r6's went with its age, r7's was written again


async def _completions(env: LocalEnvironment, run_id: str, nodes: int, *, completed: int) -> list[str]:
    """The completion subjects of nodes n0.. of a run; the first ``completed`` get ``{"output": i}``."""
    subjects = [env.names.event("wf", run_id, f"n{i}", "completed") for i in range(nodes)]
    for i, subject in enumerate(subjects[:completed]):
        await env.client.bus.js.publish(subject, encode({"output": i}))
    return subjects


async def test_a_batched_read_returns_each_subjects_last_event(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env: LocalEnvironment = await env_factory([])
    bus, names = env.client.bus, env.names
    subjects = await _completions(env, "r3", 7, completed=6)  # n6 never completed
    await bus.js.publish(subjects[0], encode({"output": "later"}))  # the last one counts
    monkeypatch.setattr(_journal, "MULTI_LAST_LIMIT", 3)  # three batches
    found = await _journal.last_events(bus.nc, bus.js, names.events_stream, subjects)
    assert found == {
        **{subject: {"output": i} for i, subject in enumerate(subjects[:6])},
        subjects[0]: {"output": "later"},
        subjects[6]: None,
    }


async def test_a_batched_read_falls_back_to_the_leader_for_what_it_missed(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a (lagging) replica did not return is read from the leader, one by one."""
    env: LocalEnvironment = await env_factory([])
    bus, names = env.client.bus, env.names
    subjects = await _completions(env, "r4", 3, completed=3)

    async def lagging(nc: Any, api: str, asked: list[str], wait: float) -> dict[str, Any]:
        return {asked[0]: {"output": 0}}  # as if the replica had only the first

    monkeypatch.setattr(_journal, "_multi_last", lagging)
    found = await _journal.last_events(bus.nc, bus.js, names.events_stream, subjects)
    assert found == {subject: {"output": i} for i, subject in enumerate(subjects)}


async def test_small_outputs_ride_in_the_join_record(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([])
    book = JoinBook(env.client.store, {"a", "b", "c"})
    assert book.inlines_outputs
    await book.arrive("join.r5.n", "a", 1, {"x": 1})
    await book.arrive("join.r5.n", "b", 2)  # too big to ride along: the winner reads it back
    record = await book.arrive("join.r5.n", "c", 3, [3])
    assert record == {"arrived": ["a", "b", "c"], "holder": 3, "outputs": {"a": {"x": 1}, "c": [3]}}
    assert not JoinBook(env.client.store, {f"u{i}" for i in range(1000)}).inlines_outputs


async def test_a_join_gets_every_output_whether_it_rode_in_the_record_or_not(env_factory: Any) -> None:
    wf = Workflow("mixed_join")
    sizes = {"small": 10, "big": 5000, "tiny": 1}

    def make(size: int) -> Any:
        async def action(ctx: NodeContext) -> str:
            return "x" * size

        return action

    for name, size in sizes.items():
        wf.node(name)(make(size))

    @wf.node(depends_on=list(sizes))
    async def join(ctx: NodeContext) -> dict[str, int]:
        return {name: len(ctx.outputs[name]) for name in sizes}

    env: LocalEnvironment = await env_factory([wf], workers=2)
    for _ in range(3):
        assert await env.client.run("mixed_join", {}) == sizes


async def test_many_fan_ins_on_two_workers_each_run_their_join_once(env_factory: Any) -> None:
    """Forty fan-ins at once, their arrivals coalesced and racing between two workers differently in
    every run: each join runs exactly once and sees every output."""
    wf = Workflow("many_joins")
    ran: list[str] = []
    leaves = [f"l{i}" for i in range(6)]

    def leaf(i: int) -> Any:
        async def action(ctx: NodeContext) -> int:
            return i

        return action

    for i, name in enumerate(leaves):
        wf.node(name)(leaf(i))

    @wf.node(depends_on=leaves)
    async def join(ctx: NodeContext) -> int:
        ran.append(ctx.run_id)
        return sum(ctx.outputs[name] for name in leaves)

    env: LocalEnvironment = await env_factory([wf], workers=2)
    results = await asyncio.gather(*(env.client.run("many_joins", {}) for _ in range(40)))
    assert results == [15] * 40
    assert len(ran) == len(set(ran)) == 40
    # The upstreams' workers record their arrivals: the join's consumer delivered one message per
    # run (its ready event), not one per upstream.
    handle = await env.client.start("many_joins", {})
    assert await handle.result() == 15
    journal = await env.client.journal(handle.run_id, "many_joins")
    assert [e["kind"] for e in journal if e["node"] == "join"] == ["ready", "completed"]
    names = env.client.names
    consumer = names.node_consumer("many_joins", "join")
    info = await env.client.bus.js.consumer_info(names.events_stream, consumer)
    assert info.delivered.consumer_seq == 41


async def test_a_ready_event_too_large_for_its_outputs_leaves_them_in_the_journal(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The join's ready event carries the outputs its record holds; should that not fit in one
    message with the run's input, it goes out without them and the join reads them back."""
    env: LocalEnvironment = await env_factory([_two_into_one("big_ready")])
    [worker] = env.workers
    assert worker.system is not None
    system = worker.system
    emit = system.emit

    async def emit_without_room(subject: str, payload: Any, **options: Any) -> Any:
        if subject.endswith(".ready") and payload.get("outputs"):
            raise UnencodableValue(f"{subject}: pretend it is too large")
        return await emit(subject, payload, **options)

    monkeypatch.setattr(system, "emit", emit_without_room)
    handle = await env.client.start("big_ready", {})
    assert await handle.result() == "pq"
    journal = await env.client.journal(handle.run_id, "big_ready")
    [ready] = [e for e in journal if e["node"] == "join" and e["kind"] == "ready"]
    assert ready["data"]["outputs"] == {}


def _two_into_one(name: str) -> Workflow:
    """p and q, each returning its name, and their join returning both."""
    wf = Workflow(name)

    def returning(value: str) -> Any:
        async def action(ctx: NodeContext) -> str:
            return value

        return action

    for upstream in ("p", "q"):
        wf.node(upstream)(returning(upstream))

    @wf.node(depends_on=["p", "q"])
    async def join(ctx: NodeContext) -> str:
        return ctx.outputs["p"] + ctx.outputs["q"]

    return wf


async def test_an_arrival_that_cannot_be_recorded_fails_the_join_visibly(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The upstreams completed but their arrivals cannot be written (the join record's writes time
    out, as in a long KV outage): at their messages' last allowed delivery the join is failed, so
    the run ends (and can be retried) instead of waiting for ever."""

    async def timing_out(self: Any, key: str, batch: Any, holder: int) -> Any:
        raise nats.errors.TimeoutError

    monkeypatch.setattr(_join.JoinBook, "_write", timing_out)
    env: LocalEnvironment = await env_factory([_two_into_one("unrecordable")], max_deliver=3, ack_wait=1.0)
    handle = await env.client.start("unrecordable", {})
    with pytest.raises(RunFailed, match="dead-lettered") as caught:
        await handle.result()
    nodes = caught.value.status.nodes  # type: ignore[attr-defined]
    assert nodes["join"].status.value == "failed"
    assert nodes["p"].status.value == nodes["q"].status.value == "completed"
    letters = await env.client.dead_letters("unrecordable")
    assert letters
    assert {letter.reason for letter in letters} == {"max_deliveries"}


async def test_a_give_up_during_an_outage_waits_it_out(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and at the messages' last delivery the join record cannot even be read (the same
    outage): the give-up tries again until it can, instead of dropping the message unreported."""
    outage = asyncio.get_running_loop().time() + 3.0
    real_get = _kv.StateStore.get

    async def timing_out(self: Any, key: str, batch: Any, holder: int) -> Any:
        raise nats.errors.TimeoutError

    async def get(self: Any, key: str) -> Any:
        if key.startswith("join.") and asyncio.get_running_loop().time() < outage:
            raise nats.errors.TimeoutError
        return await real_get(self, key)

    monkeypatch.setattr(_join.JoinBook, "_write", timing_out)
    monkeypatch.setattr(_kv.StateStore, "get", get)
    env: LocalEnvironment = await env_factory([_two_into_one("outage")], max_deliver=3, ack_wait=1.0)
    handle = await env.client.start("outage", {})
    with pytest.raises(RunFailed, match="dead-lettered") as caught:
        await handle.result()
    assert asyncio.get_running_loop().time() >= outage
    assert caught.value.status.nodes["join"].status.value == "failed"  # type: ignore[attr-defined]


async def test_a_give_up_in_a_cancelled_run_owes_no_arrival(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled run records no arrivals: an upstream's message given up after the cancel is
    acknowledged, not dead-lettered, and the join is cancelled, not failed."""
    wf = Workflow("owed_cancelled")
    cancelled = asyncio.Event()

    @wf.node()
    async def a(ctx: NodeContext) -> str:
        return "a"

    @wf.node()
    async def b(ctx: NodeContext) -> str:
        await asyncio.sleep(30)
        return "b"

    @wf.node(depends_on=["a", "b"])
    async def join(ctx: NodeContext) -> str:
        return "never"

    real_write = _join.JoinBook._write
    tries = {"a": 0}

    async def write(self: Any, key: str, batch: Any, holder: int) -> Any:
        if "a" in batch:  # a's arrival fails; its second try fails after the cancel: then comes
            tries["a"] += 1  # its last delivery, which goes to the give-up, not to the run's gate
            if tries["a"] == 2:
                await cancelled.wait()
            raise nats.errors.TimeoutError
        return await real_write(self, key, batch, holder)

    monkeypatch.setattr(_join.JoinBook, "_write", write)
    env: LocalEnvironment = await env_factory([wf], max_deliver=3, ack_wait=1.0)
    handle = await env.client.start("owed_cancelled", {})
    await eventually(lambda: tries["a"] == 2, within=10)
    await handle.cancel("stop")
    cancelled.set()
    await asyncio.sleep(3.0)  # a's message reaches its last delivery
    status = await handle.status()
    assert status.nodes["join"].status.value == "cancelled"  # type: ignore[union-attr]
    assert await env.client.dead_letters("owed_cancelled") == []


def _join_behind_b(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[Workflow, list[dict[str, Any]], asyncio.Event, dict[str, bool]]:
    """a, and b (which waits for the event, then fails while ``broken["b_fails"]``), into a join
    that keeps the outputs it got. An upstream's arrival cannot be recorded while ``broken`` says
    so of it (the join record's writes time out)."""
    wf = Workflow(name)
    seen: list[dict[str, Any]] = []
    release = asyncio.Event()
    broken = {"a": False, "b": False, "b_fails": False}

    @wf.node()
    async def a(ctx: NodeContext) -> str:
        return "A"

    @wf.node()
    async def b(ctx: NodeContext) -> str:
        await release.wait()  # still running when the run fails and is retried
        if broken["b_fails"]:
            raise NonRetryableError("b broke")
        return "B"

    @wf.node(depends_on=["a", "b"])
    async def join(ctx: NodeContext) -> str:
        seen.append(dict(ctx.outputs))
        await asyncio.sleep(0.5)
        return f"{ctx.outputs['a']}+{ctx.outputs['b']}"

    real_write = _join.JoinBook._write

    async def write(self: Any, key: str, batch: Any, holder: int) -> Any:
        if any(broken.get(up) for up in batch):
            raise nats.errors.TimeoutError
        return await real_write(self, key, batch, holder)

    monkeypatch.setattr(_join.JoinBook, "_write", write)
    return wf, seen, release, broken


async def _join_failed_then_retried(
    env_factory: Any, wf: Workflow, broken: dict[str, bool]
) -> tuple[LocalEnvironment, Any]:
    """Run ``wf`` (from :func:`_join_behind_b`) with a's arrival unrecordable: a's give-up fails the
    join while b still runs. Then retry it: the join is reissued, records a's arrival, waits for b."""
    broken["a"] = True
    env: LocalEnvironment = await env_factory([wf], max_deliver=3, ack_wait=1.0)
    handle = await env.client.start(wf.name, {})
    with pytest.raises(RunFailed, match="dead-lettered"):
        await handle.result()
    broken["a"] = False
    assert await handle.retry() == ["join"]
    await asyncio.sleep(1.0)
    return env, handle


async def test_a_join_failed_before_its_upstreams_resolved_waits_for_them_after_a_retry(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a's arrival cannot be recorded, so its give-up fails the join while b still runs. The retry
    reissues the join; it must not start with b's output missing. The retry's message records a's
    arrival instead, and b's completion, when it comes, makes the join ready."""
    wf, seen, release, broken = _join_behind_b("early_join", monkeypatch)
    _, handle = await _join_failed_then_retried(env_factory, wf, broken)
    assert seen == []  # b has not resolved: the join waits
    release.set()
    assert await handle.result() == "A+B"
    assert seen == [{"a": "A", "b": "B"}]


async def test_a_join_given_up_on_again_after_a_retry_fails_the_run(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and then b's arrival cannot be recorded either: its message, from before the
    retry, is given up owing the join the retry reissued. Its report carries the retry's epoch, so
    the run fails again. (It carried the message's own epoch: a duplicate of the first report's
    message id, dropped, and a report the supervisor took for a stale one: the run hung.)"""
    wf, _, release, broken = _join_behind_b("owed_again", monkeypatch)
    _, handle = await _join_failed_then_retried(env_factory, wf, broken)
    broken["b"] = True
    release.set()
    with pytest.raises(RunFailed, match="dead-lettered") as caught:
        async with asyncio.timeout(25):
            await handle.result()
    assert caught.value.status.nodes["join"].status.value == "failed"  # type: ignore[attr-defined]


@pytest.mark.parametrize("first", ["ready", "retry"])
async def test_a_join_reissued_with_its_last_upstream_runs_once(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch, first: str
) -> None:
    """The first retry reissues the join, which records a's arrival and waits for b; b then fails.
    The second retry reissues b and the join. b completes before the join's own retry message is
    handled: b's arrival makes the join ready, and that message finds every upstream resolved. Both
    would start the join; one claim decides, whichever comes ``first`` (the ready event claimed
    nothing: the join ran twice). The message takes b's output from the journal: the retry read it
    before b completed (the join ran with b's output None)."""
    wf, seen, release, broken = _join_behind_b(f"reissued_join_{first}", monkeypatch)
    real_receive = NodeActor.receive
    second = {"retry": False}

    async def b_completed() -> bool:
        journal = await env.client.journal(handle.run_id, handle.workflow)
        return ("b", "completed") in [(event["node"], event["kind"]) for event in journal]

    async def receive(self: NodeActor, msg: Any) -> None:
        if second["retry"] and self.node.name == "join":
            if msg.subject.endswith(".retry"):  # a busy join consumer: b's reissue completes first
                await eventually(b_completed, within=20, message="b completed")
            if not msg.subject.endswith(f".{first}"):
                await asyncio.sleep(1.0)
        await real_receive(self, msg)

    monkeypatch.setattr(NodeActor, "receive", receive)
    broken["b_fails"] = True
    env, handle = await _join_failed_then_retried(env_factory, wf, broken)
    release.set()
    with pytest.raises(RunFailed, match="b broke"):
        await handle.result()
    broken["b_fails"], second["retry"] = False, True
    assert sorted(await handle.retry()) == ["b", "join"]
    assert await handle.result() == "A+B"
    await asyncio.sleep(1.5)  # a second start would have begun by now
    assert seen == [{"a": "A", "b": "B"}]


async def test_a_join_reissued_with_its_last_continue_on_error_upstream_runs_once(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with b continue-on-error: the second retry reissues b (waiting for its scheduled
    retry when r failed the run) and the join; b fails for good, and its failure, an arrival the
    join's own consumer records, completes the set. That and the join's retry message, handled
    after, both want to start the join; one claim decides (the failure claimed nothing)."""
    wf = Workflow("reissued_coe_join")
    seen: list[dict[str, Any]] = []
    release_b, release_r = asyncio.Event(), asyncio.Event()
    r_calls: list[int] = []
    broken, second = {"a": True}, {"retry": False}

    @wf.node()
    async def a(ctx: NodeContext) -> str:
        return "A"

    @wf.node(continue_on_error=True, retry=RetryPolicy(max_attempts=2, initial=0.3, jitter=0))
    async def b(ctx: NodeContext) -> str:
        await release_b.wait()
        if ctx.attempt == 1:
            raise RuntimeError("b flaky")
        raise NonRetryableError("b broke for good")

    @wf.node()
    async def r(ctx: NodeContext) -> str:
        r_calls.append(1)
        await release_r.wait()
        if len(r_calls) == 1:
            raise NonRetryableError("r broke once")
        return "R"

    @wf.node(depends_on=["a", "b"])
    async def join(ctx: NodeContext) -> str:
        seen.append(dict(ctx.outputs))
        await asyncio.sleep(0.5)
        return f"{ctx.outputs['a']}+{ctx.outputs['b']}"

    real_write, real_receive = _join.JoinBook._write, NodeActor.receive

    async def write(self: Any, key: str, batch: Any, holder: int) -> Any:
        if broken["a"] and "a" in batch:
            raise nats.errors.TimeoutError
        return await real_write(self, key, batch, holder)

    async def recorded(node: str, kind: str) -> bool:
        journal = await env.client.journal(handle.run_id, handle.workflow)
        return (node, kind) in [(event["node"], event["kind"]) for event in journal]

    async def receive(self: NodeActor, msg: Any) -> None:
        if second["retry"] and self.node.name == "join" and msg.subject.endswith(".retry"):
            # A busy join consumer: b's failure is handled first.
            await eventually(lambda: recorded("b", "failed"), within=20, message="b failed")
            await asyncio.sleep(0.3)
        await real_receive(self, msg)

    monkeypatch.setattr(_join.JoinBook, "_write", write)
    monkeypatch.setattr(NodeActor, "receive", receive)
    env: LocalEnvironment = await env_factory([wf], max_deliver=3, ack_wait=1.0, shutdown_grace=0.5)
    handle = await env.client.start("reissued_coe_join", {})
    with pytest.raises(RunFailed, match="dead-lettered"):  # a's give-up fails the join
        await handle.result()
    broken["a"] = False
    assert sorted(await handle.retry()) == ["join"]  # records a's arrival, waits for b
    await asyncio.sleep(1.0)
    release_r.set()
    with pytest.raises(RunFailed, match="r broke"):
        await handle.result()
    release_b.set()  # b's first attempt fails, retryably, in the failed run
    await eventually(lambda: recorded("b", "attempt_failed"), within=10, message="b failed once")
    await asyncio.sleep(1.0)
    second["retry"] = True
    assert sorted(await handle.retry()) == ["b", "join", "r"]
    async with asyncio.timeout(20):
        assert await handle.result() == {"join": "A+None", "r": "R"}
    await asyncio.sleep(1.5)  # a second start would have begun by now
    assert seen == [{"a": "A", "b": None}]


def _b_then_a_into_join(name: str, join_action: Any) -> Workflow:
    wf = Workflow(name)

    @wf.node()
    async def b(ctx: NodeContext) -> str:
        return "B"

    @wf.node()
    async def a(ctx: NodeContext) -> str:
        await asyncio.sleep(0.3)  # b's arrival is recorded first
        return "A"

    wf.node(name="join", depends_on=["a", "b"])(join_action)
    return wf


def _stall_a_after_its_completion(
    monkeypatch: pytest.MonkeyPatch, until: asyncio.Event, arrived: asyncio.Event | None = None
) -> None:
    """a's first delivery stalls (no heartbeats: a paused worker) after publishing a's completion,
    before recording its arrival, until ``until`` is set; ``arrived`` is set if that arrival then
    makes the join ready."""
    real_finish, real_arrive = NodeActor._finish_completed, NodeActor._arrive_below

    async def finish(self: Any, msg: Any, attempt: Any, output: Any) -> None:
        if self.node.name == "a" and msg.metadata.num_delivered == 1:
            self._held.pop(id(msg), None)  # its worker stalls: no more heartbeats for it
        await real_finish(self, msg, attempt, output)

    async def arrive(self: Any, run_id: str, *args: Any) -> bool:
        if self.node.name == "a":
            await until.wait()
        published = await real_arrive(self, run_id, *args)
        if self.node.name == "a" and published and arrived is not None:
            arrived.set()
        return published

    monkeypatch.setattr(NodeActor, "_finish_completed", finish)
    monkeypatch.setattr(NodeActor, "_arrive_below", arrive)


def _stall_a_until_its_give_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """a's first delivery stalls after publishing a's completion until a's last delivery has worked
    out what it owes; that give-up goes on once the stalled delivery has made the join ready."""
    owed_computed, ready_published = asyncio.Event(), asyncio.Event()
    real_owed = NodeActor._owed

    async def owed(self: Any, run_id: str) -> Any:
        joins = await real_owed(self, run_id)
        if self.node.name == "a":
            assert joins == ["join"]
            owed_computed.set()
            await asyncio.wait_for(ready_published.wait(), 20)
            await asyncio.sleep(0.3)  # the join has started by now
        return joins

    _stall_a_after_its_completion(monkeypatch, owed_computed, ready_published)
    monkeypatch.setattr(NodeActor, "_owed", owed)


async def test_a_join_made_ready_by_a_stalled_delivery_after_its_give_up_completes(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a's last delivery is given up owing the join; meanwhile a's stalled first delivery records
    the arrival and makes the join ready, and the join runs. The give-up's report is dropped (the
    join was made ready after all): the run completes, the join ran once. (The report failed the
    run, and the journal hid the join's completion behind it: a retry ran the join again, and the
    run hung.)"""
    calls: list[str] = []

    async def join(ctx: NodeContext) -> str:
        calls.append(ctx.run_id)
        await asyncio.sleep(0.5)
        return f"{ctx.outputs['a']}+{ctx.outputs['b']}"

    _stall_a_until_its_give_up(monkeypatch)
    wf = _b_then_a_into_join("stalled_arrival", join)
    env: LocalEnvironment = await env_factory([wf], max_deliver=2, ack_wait=1.0)
    handle = await env.client.start("stalled_arrival", {})
    async with asyncio.timeout(20):
        assert await handle.result() == "A+B"
    letters = await env.client.dead_letters("stalled_arrival")
    assert [letter.reason for letter in letters] == ["max_deliveries"]
    status = await handle.status()
    assert status.nodes["join"].status.value == "completed"  # type: ignore[union-attr]
    assert len(calls) == 1


async def test_a_join_poisoned_after_its_owed_report_was_dropped_fails_the_run(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, and then the join's own attempt stalls its worker on every delivery: its give-up's
    report fails the run. (It had the dropped report's message id and was discarded as a duplicate:
    the run hung.)"""
    never = asyncio.Event()
    real_run = NodeActor._run_attempt

    async def join(ctx: NodeContext) -> str:
        await never.wait()
        return "never"

    async def run_attempt(self: Any, msg: Any, attempt: Any) -> None:
        if self.node.name == "join":
            self._held.pop(id(msg), None)  # the join's worker stalls: no heartbeats
        await real_run(self, msg, attempt)

    _stall_a_until_its_give_up(monkeypatch)
    monkeypatch.setattr(NodeActor, "_run_attempt", run_attempt)
    wf = _b_then_a_into_join("poisoned_after_drop", join)
    env: LocalEnvironment = await env_factory([wf], max_deliver=2, ack_wait=1.0, shutdown_grace=0.5)
    handle = await env.client.start("poisoned_after_drop", {})
    try:
        with pytest.raises(RunFailed, match=r"failed at node 'join'.*dead-lettered"):
            async with asyncio.timeout(20):
                await handle.result()
    finally:
        never.set()


@pytest.mark.parametrize("retries", [1, 2])
async def test_an_owed_report_after_the_retry_started_the_join_is_not_sent(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch, retries: int
) -> None:
    """After a retry, the retry's own message for the join finds every upstream completed and starts
    it (claiming it for the retry). a's message from before the retry, whose first delivery stalled
    after publishing a's completion and never recorded the arrival, is then given up (with two
    retries, after the second, which did not reissue the running join): it owes the join nothing,
    so the run completes. (Its report failed the run, for good: every node had completed, so a
    retry had nothing to run. The fix for one retry first looked at the latest retry's claim only.)"""
    x_calls: list[int] = []
    j_started, never, give_up_go, j_release = (asyncio.Event() for _ in range(4))
    calls: list[dict[str, Any]] = []

    async def join(ctx: NodeContext) -> str:
        calls.append(dict(ctx.outputs))
        j_started.set()
        await j_release.wait()
        return f"{ctx.outputs['a']}+{ctx.outputs['b']}"

    wf = _b_then_a_into_join(f"owed_after_start_{retries}", join)

    @wf.node()
    async def x(ctx: NodeContext) -> str:
        x_calls.append(ctx.attempt)
        await asyncio.sleep(0.5)
        if len(x_calls) <= retries:
            raise NonRetryableError(f"x broke ({len(x_calls)})")
        return "X"

    real_give_up = NodeActor.give_up

    async def give_up(self: Any, msg: Any, delivered: int) -> None:
        if self.node.name == "a":  # (heartbeats keep this delivery held meanwhile)
            await asyncio.wait_for(give_up_go.wait(), 40)
        await real_give_up(self, msg, delivered)

    _stall_a_after_its_completion(monkeypatch, never)  # for good
    monkeypatch.setattr(NodeActor, "give_up", give_up)
    env: LocalEnvironment = await env_factory([wf], max_deliver=2, ack_wait=1.0, shutdown_grace=0.5)
    handle = await env.client.start(wf.name, {})
    try:
        with pytest.raises(RunFailed, match="x broke"):
            async with asyncio.timeout(15):
                await handle.result()
        assert sorted(await handle.retry()) == ["join", "x"]
        await asyncio.wait_for(j_started.wait(), 10)
        if retries == 2:  # the run fails again while the join runs: the retry reissues x alone
            with pytest.raises(RunFailed, match=r"x broke \(2\)"):
                async with asyncio.timeout(15):
                    await handle.result()
            assert await handle.retry() == ["x"]
        give_up_go.set()
        await asyncio.sleep(1.5)  # a's give-up has reported what it owes by now
        j_release.set()
        async with asyncio.timeout(15):
            assert await handle.result() == {"join": "A+B", "x": "X"}
        assert calls == [{"a": "A", "b": "B"}]
    finally:
        for event in (never, give_up_go, j_release):
            event.set()


async def test_an_owed_report_the_supervisor_takes_after_the_join_started_is_dropped(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, with a's give-up landing while the retry is under way, before its message for the
    join claimed it: the join is owed a's arrival then, and the report goes out. The supervisor
    takes it only after the retry's message started the join (from the journal): it drops it, and
    the run completes. (It checked for the join's ready event alone, and failed the run for good.)"""
    calls: list[dict[str, Any]] = []
    x_calls: list[int] = []
    j_started, never, reported = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def join(ctx: NodeContext) -> str:
        calls.append(dict(ctx.outputs))
        j_started.set()
        await asyncio.sleep(0.5)
        return f"{ctx.outputs['a']}+{ctx.outputs['b']}"

    wf = _b_then_a_into_join("owed_late_report", join)

    @wf.node()
    async def x(ctx: NodeContext) -> str:
        x_calls.append(ctx.attempt)
        await asyncio.sleep(0.5)
        if len(x_calls) == 1:
            raise NonRetryableError("x broke once")
        return "X"

    real_give_up, real_receive, real_supervise = NodeActor.give_up, NodeActor.receive, SupervisorActor.receive
    retried = asyncio.Event()

    async def give_up(self: Any, msg: Any, delivered: int) -> None:
        if self.node.name == "a":
            await retried.wait()  # (heartbeats keep this delivery held meanwhile)
        await real_give_up(self, msg, delivered)
        if self.node.name == "a":
            reported.set()

    async def receive(self: NodeActor, msg: Any) -> None:
        if self.node.name == "join" and msg.subject.endswith(".retry"):
            await reported.wait()  # the retry's message for the join comes after a's give-up
        await real_receive(self, msg)

    async def supervise(self: SupervisorActor, msg: Any) -> None:
        if b"owed_arrival" in (msg.data or b""):
            await j_started.wait()  # a busy supervisor
        await real_supervise(self, msg)

    _stall_a_after_its_completion(monkeypatch, never)  # for good
    monkeypatch.setattr(NodeActor, "give_up", give_up)
    monkeypatch.setattr(NodeActor, "receive", receive)
    monkeypatch.setattr(SupervisorActor, "receive", supervise)
    env: LocalEnvironment = await env_factory([wf], max_deliver=2, ack_wait=1.0, shutdown_grace=0.5)
    handle = await env.client.start(wf.name, {})
    try:
        with pytest.raises(RunFailed, match="x broke"):
            async with asyncio.timeout(15):
                await handle.result()
        retry = asyncio.ensure_future(handle.retry())
        await eventually(lambda: env.workers[0].system.gate.epoch(handle.run_id) == 1, within=10)
        retried.set()
        assert sorted(await retry) == ["join", "x"]
        async with asyncio.timeout(15):
            assert await handle.result() == {"join": "A+B", "x": "X"}
        journal = await env.client.journal(handle.run_id, wf.name)
        reports = [e["data"] for e in journal if (e["node"], e["kind"]) == ("join", "attempt_failed")]
        assert [report.get("owed_arrival") for report in reports] == [True]  # it was sent, and dropped
        assert calls == [{"a": "A", "b": "B"}]
    finally:
        never.set()


async def test_a_claim_taken_to_report_a_give_up_is_not_a_join_that_went_ahead(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The join's message for c's failure (c continues on error) stalls, and is given up after the
    first retry: to report the join failed, it claims the join for that retry, though the join
    never started. The second retry reissues the join, which waits for a; a's message, whose
    arrival was never recorded, is then given up owing the join. The run fails visibly. (The give-up's
    claim passed for a join that went ahead: nothing was owed, and the run hung.)"""
    wf = Workflow("give_up_claim")
    x_calls: list[int] = []
    a_go, never, c_give_up_go, a_give_up_go = (asyncio.Event() for _ in range(4))

    @wf.node(continue_on_error=True)
    async def c(ctx: NodeContext) -> str:
        raise NonRetryableError("c broke (continue on error)")

    @wf.node()
    async def a(ctx: NodeContext) -> str:
        await a_go.wait()  # running across the failures and retries
        return "A"

    @wf.node(depends_on=["a", "c"])
    async def join(ctx: NodeContext) -> str:
        return f"{ctx.outputs['a']}+{ctx.outputs['c']}"

    @wf.node()
    async def x(ctx: NodeContext) -> str:
        x_calls.append(ctx.attempt)
        await asyncio.sleep(0.5)
        if len(x_calls) == 1:
            raise NonRetryableError("x broke once")
        return "X"

    real_receive, real_give_up = NodeActor.receive, NodeActor.give_up

    async def receive(self: NodeActor, msg: Any) -> None:
        if self.node.name == "join" and msg.subject.endswith(".c.failed") and msg.metadata.num_delivered == 1:
            self._held.pop(id(msg), None)  # the join's worker stalls on c's failure (no heartbeats)
            await never.wait()
        await real_receive(self, msg)

    async def give_up(self: Any, msg: Any, delivered: int) -> None:
        if self.node.name == "join" and msg.subject.endswith(".c.failed"):
            await asyncio.wait_for(c_give_up_go.wait(), 40)  # (heartbeats keep it held)
        if self.node.name == "a":
            await asyncio.wait_for(a_give_up_go.wait(), 40)
        await real_give_up(self, msg, delivered)

    _stall_a_after_its_completion(monkeypatch, never)  # for good
    monkeypatch.setattr(NodeActor, "receive", receive)
    monkeypatch.setattr(NodeActor, "give_up", give_up)
    env: LocalEnvironment = await env_factory([wf], max_deliver=2, ack_wait=1.0, shutdown_grace=0.5)
    handle = await env.client.start(wf.name, {})
    try:
        with pytest.raises(RunFailed, match="x broke"):
            async with asyncio.timeout(15):
                await handle.result()
        assert await handle.retry() == ["x"]
        await eventually(lambda: env.workers[0].system.gate.epoch(handle.run_id) == 1, within=10)
        c_give_up_go.set()
        with pytest.raises(RunFailed, match="node_give_up_claim_join gave up"):
            async with asyncio.timeout(15):
                await handle.result()
        assert await handle.retry() == ["join"]
        await asyncio.sleep(1.0)  # the join's reissue found a unresolved and recorded c's arrival
        a_go.set()  # a completes; its arrival stalls, and its last delivery is given up
        await asyncio.sleep(1.5)
        a_give_up_go.set()
        with pytest.raises(RunFailed, match="node_give_up_claim_a gave up"):
            async with asyncio.timeout(15):
                await handle.result()
    finally:
        for event in (never, a_go, c_give_up_go, a_give_up_go):
            event.set()


async def test_a_give_up_interrupted_by_a_stopping_worker_is_done_again(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arrivals cannot be recorded, nor the join record read, when the upstreams' messages reach
    their last delivery: the give-up tries again in place, and its worker is stopped meanwhile (a
    rolling restart). The server allows one delivery more, so the next worker gives up on the
    message and the run fails visibly. (It was nak'd at its last delivery and never came back: no
    dead letter, no report, the run hung.)"""
    outage = {"on": True}
    real_get, real_owed = _kv.StateStore.get, NodeActor._owed
    giving_up = asyncio.Event()

    async def timing_out(self: Any, key: str, batch: Any, holder: int) -> Any:
        raise nats.errors.TimeoutError

    async def get(self: Any, key: str) -> Any:
        if key.startswith("join.") and outage["on"]:
            raise nats.errors.TimeoutError
        return await real_get(self, key)

    async def owed(self: Any, run_id: str) -> Any:
        giving_up.set()
        return await real_owed(self, run_id)

    monkeypatch.setattr(_join.JoinBook, "_write", timing_out)
    monkeypatch.setattr(_kv.StateStore, "get", get)
    monkeypatch.setattr(NodeActor, "_owed", owed)
    wf = _two_into_one("interrupted_give_up")
    env: LocalEnvironment = await env_factory([wf], max_deliver=3, ack_wait=1.0, shutdown_grace=1.0)
    handle = await env.client.start("interrupted_give_up", {})
    await eventually(giving_up.is_set, within=15)
    await asyncio.sleep(0.5)  # the give-up is trying again in place
    await env.workers.pop(0).stop()
    outage["on"] = False
    await env.add_worker()
    with pytest.raises(RunFailed, match="dead-lettered") as caught:
        async with asyncio.timeout(20):
            await handle.result()
    assert caught.value.status.nodes["join"].status.value == "failed"  # type: ignore[attr-defined]
