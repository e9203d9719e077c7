"""End-to-end behaviour of the engine against a real nats-server: shapes, data, failures, triggers."""

from __future__ import annotations

import asyncio
import io
import json
from typing import Any

import pytest
from rich.console import Console

from flow_orchestrator import (
    InvalidNameError,
    InvalidPayload,
    InvalidRunId,
    NodeContext,
    NodeStatus,
    PayloadTooLarge,
    RetryPolicy,
    RunFailed,
    RunNotFound,
    RunStatus,
    StorageSettings,
    UnknownWorkflow,
    Workflow,
)
from flow_orchestrator.bus import decode, encode
from flow_orchestrator.runtime._view import watch_run
from flow_orchestrator.testing import LocalEnvironment, eventually
from tests import workflows as wfs


async def test_linear_chain_passes_outputs_down(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.chain(20)])
    result = await env.client.run("chain", {})
    assert result == {"k": 19, "acc": 20}


async def test_a_result_comes_from_the_terminal_event_and_wait_from_the_record(
    env_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``result()`` reads the run record once, before the run ends (in case it already had); the
    terminal event then carries the output, so no second read sits on every run's last hop.
    ``wait()`` returns the whole record, read after the event. ``run()`` reads nothing."""
    env: LocalEnvironment = await env_factory([wfs.chain(3)])
    client = env.client
    reads: list[str] = []
    read = client._run_record

    async def counted(run_id: str) -> dict[str, Any] | None:
        found = await read(run_id)
        reads.append("ended" if found and found.get("status") == "completed" else "running")
        return found

    monkeypatch.setattr(client, "_run_record", counted)
    handle = await client.start("chain", {})
    assert await handle.result() == {"k": 2, "acc": 3}
    assert reads in (["running"], ["ended"])  # "ended": the run was over before result() looked
    assert (await handle.wait())["status"] == "completed"  # an ended run: its record, at once
    handle = await client.start("chain", {})
    reads.clear()
    record = await handle.wait()
    assert record["status"] == "completed"
    assert record["workflow"] == "chain"
    assert reads in (["running", "ended"], ["ended"])
    reads.clear()
    assert await client.run("chain", {}) == {"k": 2, "acc": 3}
    assert reads == []  # run() listened before it published the trigger: nothing to look for first


async def test_diamond_joins_once_and_shares_data(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond])
    handle = await env.client.start("diamond", {"order_id": "o-1", "amount": 12.5})
    assert await handle.result() == {"shipped": True, "payment": "pmt-o-1", "charged": 12.5}
    snapshot = await handle.status()
    assert snapshot.status is RunStatus.COMPLETED
    assert {n: s.status for n, s in snapshot.nodes.items()} == dict.fromkeys(
        ["validate", "reserve", "charge", "ship"], NodeStatus.COMPLETED
    )
    assert all(s.attempts == 1 for s in snapshot.nodes.values())
    data_keys = await _data_keys(env, handle.run_id)
    assert data_keys == {"order_id": "o-1", "payment_id": "pmt-o-1"}


async def _data_keys(env: LocalEnvironment, run_id: str) -> dict[str, Any]:
    from flow_orchestrator.runtime import WorkflowData

    data = WorkflowData(env.client.store, run_id)
    return await data.to_dict()


async def test_fan_out_fan_in_1_20_1(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.fan(20)])
    results = await asyncio.gather(*(env.client.run("fan", {}) for _ in range(3)))
    assert results == [{"sum": sum(range(20)), "count": 20}] * 3


async def test_retry_then_success_takes_three_attempts(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.failing])
    handle = await env.client.start("failing", {"mode": "flaky"})
    assert await handle.result() == {"end": True}
    snapshot = await handle.status()
    assert snapshot.nodes["flaky"].attempts == 3
    assert snapshot.nodes["flaky"].output == {"attempt": 3}
    journal = await env.client.journal(handle.run_id, "failing")
    retries = [e for e in journal if e["node"] == "flaky" and e["kind"] == "retrying"]
    assert [e["data"]["next_attempt"] for e in retries] == [2, 3]


async def test_fail_fast_skips_blocked_nodes(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.failing])
    handle = await env.client.start("failing", {"mode": "always"})
    with pytest.raises(RunFailed, match="flaky") as caught:
        await handle.result()
    snapshot = caught.value.status
    assert snapshot is not None
    statuses = {n: s.status for n, s in snapshot.nodes.items()}  # type: ignore[attr-defined]
    assert statuses["start"] is NodeStatus.COMPLETED
    assert statuses["flaky"] is NodeStatus.FAILED
    assert statuses["after"] is NodeStatus.SKIPPED
    assert statuses["end"] is NodeStatus.SKIPPED
    assert snapshot.nodes["flaky"].attempts == 3  # type: ignore[attr-defined]
    assert "still broken" in snapshot.nodes["flaky"].error["message"]  # type: ignore[attr-defined]
    # side runs in parallel; fail-fast does not wait for it, so it is Completed, Running or Pending.
    assert statuses["side"] in {NodeStatus.COMPLETED, NodeStatus.RUNNING, NodeStatus.PENDING}


async def test_non_retryable_error_fails_at_once(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.failing])
    handle = await env.client.start("failing", {"mode": "fatal"})
    with pytest.raises(RunFailed, match="card declined"):
        await handle.result()
    snapshot = await handle.status()
    assert snapshot.nodes["flaky"].attempts == 1
    assert snapshot.nodes["flaky"].status is NodeStatus.FAILED
    assert snapshot.nodes["flaky"].error is not None
    assert snapshot.nodes["flaky"].error["type"] == "NonRetryableError"


async def test_timeout_cancels_attempt_and_counts_as_failure(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.failing])
    handle = await env.client.start("failing", {"mode": "slow"})
    with pytest.raises(RunFailed, match="timed out"):
        await handle.result()
    snapshot = await handle.status()
    assert snapshot.nodes["flaky"].attempts == 3
    assert snapshot.nodes["flaky"].error is not None
    assert snapshot.nodes["flaky"].error["type"] == "NodeTimeout"
    assert snapshot.nodes["after"].status is NodeStatus.SKIPPED


async def test_continue_on_error_lets_downstream_run(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.tolerant])
    handle = await env.client.start("tolerant", {})
    assert await handle.result() == {"optional": None, "required": {"required": True}}
    snapshot = await handle.status()
    assert snapshot.status is RunStatus.COMPLETED
    assert snapshot.nodes["optional"].status is NodeStatus.FAILED
    assert snapshot.nodes["combine"].status is NodeStatus.COMPLETED


async def test_sync_action_runs_off_the_event_loop(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond])
    loop_ticks = 0

    async def ticker() -> None:
        nonlocal loop_ticks
        while True:
            loop_ticks += 1
            await asyncio.sleep(0.001)

    task = asyncio.create_task(ticker())
    try:
        result = await env.client.run("diamond", {"order_id": "o-2", "amount": 1})
    finally:
        task.cancel()
    assert result["shipped"] is True
    assert loop_ticks > 5  # the loop kept turning while reserve slept in its thread


async def test_trigger_by_raw_msgpack_publish(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond])
    ack = await env.client.bus.js.publish(
        env.names.trigger("diamond"),
        encode({"order_id": "raw-1", "amount": 3}),
        headers={"Nats-Msg-Id": "raw-msgpack-1"},
    )
    assert not ack.duplicate
    handle = env.client.get_handle("raw-msgpack-1", "diamond")
    assert (await handle.result())["payment"] == "pmt-raw-1"


async def test_trigger_by_raw_json_publish(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond])
    await env.client.bus.nc.publish(
        env.names.trigger("diamond"),
        json.dumps({"order_id": "raw-2", "amount": 4}).encode(),
        headers={"Nats-Msg-Id": "raw-json-1", "Content-Type": "application/json"},
    )
    handle = env.client.get_handle("raw-json-1", "diamond")
    assert (await handle.result())["charged"] == 4


async def test_trigger_without_msg_id_gets_a_generated_run_id(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.chain(2)])
    await env.client.bus.js.publish(env.names.trigger("chain"), encode({}))

    async def completed_runs() -> list[dict[str, Any]]:
        runs = await env.client.list_runs(workflow="chain")
        return [r for r in runs if r["status"] == "completed"]

    runs = await eventually(completed_runs, within=20)
    assert len(runs) == 1
    assert runs[0]["run_id"].startswith("r")


async def test_repeated_msg_id_starts_one_run(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.chain(3)], announce_starts_after=0)  # every start
    first = await env.client.start("chain", {}, run_id="same-key")
    second = await env.client.start("chain", {}, run_id="same-key")
    assert first.run_id == second.run_id == "same-key"
    await first.result()
    journal = await env.client.journal("same-key", "chain")
    assert [e["kind"] for e in journal if e["node"] == "_run"].count("started") == 1
    assert [e["kind"] for e in journal if e["node"] == "s0"].count("started") == 1


async def test_repeated_msg_id_beyond_dedup_window_still_one_run(env_factory: Any) -> None:
    # The stream's duplicate window is the first line of defence; the run record's create-only write
    # is the second. Purging the trigger stream makes the stream forget the id, as an expired window would.
    env: LocalEnvironment = await env_factory([wfs.chain(2)])
    await env.client.run("chain", {}, run_id="late-dup")
    await env.client.bus.js.purge_stream(env.names.triggers_stream)  # forget the dedup window too
    await env.client.bus.js.publish(
        env.names.trigger("chain"), encode({}), headers={"Nats-Msg-Id": "late-dup"}
    )

    async def trigger_consumed() -> bool:
        info = await env.client.bus.js.consumer_info(env.names.triggers_stream, "trigger_chain")
        return info.num_pending == 0 and info.num_ack_pending == 0

    await eventually(trigger_consumed, within=20)
    journal = await env.client.journal("late-dup", "chain")
    assert [e["kind"] for e in journal if e["node"] == "_run"].count("started") == 1


async def _read(env: LocalEnvironment, subject: str, count: int) -> list[dict[str, Any]]:
    """The first ``count`` messages on ``subject`` (from the stream's start), decoded."""
    sub = await env.client.bus.js.subscribe(subject, ordered_consumer=True)
    found: list[dict[str, Any]] = []
    try:
        while len(found) < count:
            msg = await sub.next_msg(timeout=20)
            found.append(decode(msg.data))
    finally:
        await sub.unsubscribe()
    return found


async def _dead_letters(env: LocalEnvironment, count: int) -> list[dict[str, Any]]:
    return await _read(env, f"{env.prefix}.dlq.>", count)


async def _rejections(env: LocalEnvironment, workflow: str, count: int) -> list[dict[str, Any]]:
    return await _read(env, f"{env.prefix}.evt.{workflow}.*._trigger.rejected", count)


async def test_malformed_and_invalid_triggers_are_dead_lettered(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond], max_trigger_bytes=1024)
    js = env.client.bus.js
    subject = env.names.trigger("diamond")
    await js.publish(subject, b"\xc1\xc1 not msgpack", headers={"Nats-Msg-Id": "bad-1"})
    await js.publish(
        subject, b"{not json", headers={"Nats-Msg-Id": "bad-2", "Content-Type": "application/json"}
    )
    await js.publish(subject, encode({"order_id": "x", "amount": -5}), headers={"Nats-Msg-Id": "bad-3"})
    await js.publish(subject, encode({"order_id": "x" * 4000, "amount": 1}), headers={"Nats-Msg-Id": "bad-4"})
    await js.publish(subject, encode({"order_id": "x", "amount": 1}), headers={"Nats-Msg-Id": "bad id!"})
    records = await _dead_letters(env, 5)
    by_reason = {r["reason"]: r for r in records}
    assert set(by_reason) == {"malformed", "invalid_payload", "oversized", "invalid_run_id"}
    assert sum(r["reason"] == "malformed" for r in records) == 2
    assert by_reason["invalid_payload"]["error_type"] == "InvalidPayload"
    assert "amount" in by_reason["invalid_payload"]["error"]
    assert by_reason["oversized"]["size"] > 1024
    assert by_reason["invalid_run_id"]["headers"]["Nats-Msg-Id"] == "bad id!"
    assert all(r["subject"] == subject for r in records)
    rejected = await _rejections(env, "diamond", 5)
    assert {r["reason"] for r in rejected} == set(by_reason)
    # Whoever waits on a rejected run gets the typed error instead of waiting forever.
    with pytest.raises(InvalidPayload, match="bad-3"):
        await env.client.get_handle("bad-3", "diamond").result()
    with pytest.raises(PayloadTooLarge):
        await env.client.get_handle("bad-4", "diamond").result()
    with pytest.raises(InvalidPayload, match="amount"):  # run() listens first: the rejection reaches it
        await env.client.run("diamond", {"order_id": "x", "amount": -5})
    # Looked up by its id, a rejected run says why it has no record.
    with pytest.raises(RunNotFound, match=r"bad-3': its trigger was rejected \(invalid_payload"):
        await env.client.snapshot("bad-3")
    with pytest.raises(InvalidNameError):  # not a wildcard: a cancel there would reach no run
        env.client.get_handle("bad-3", "*")
    # The worker survived all of it and still runs good triggers.
    assert (await env.client.run("diamond", {"order_id": "ok", "amount": 2}))["charged"] == 2
    # Nothing is left for redelivery.
    info = await js.consumer_info(env.names.triggers_stream, "trigger_diamond")
    assert info.num_ack_pending == 0
    assert info.num_redelivered == 0


async def test_a_run_id_reused_after_its_trigger_was_rejected(env_factory: Any) -> None:
    window = 5.0  # the triggers stream's deduplication window (room for a loaded machine's rejection)
    env: LocalEnvironment = await env_factory([wfs.diamond], storage=StorageSettings(duplicate_window=window))
    # A raw publisher's invalid trigger (Client.start with the Workflow would refuse it first).
    headers = {"Nats-Msg-Id": "reused-1"}
    await env.client.bus.js.publish(env.names.trigger("diamond"), encode({"amount": -5}), headers=headers)
    with pytest.raises(InvalidPayload, match="amount"):
        await env.client.get_handle("reused-1", "diamond").result()
    good = {"order_id": "x", "amount": 3}
    # Inside the window the corrected trigger is dropped as a repeat of the rejected one: say so, in
    # the API and in the live view (flowctl run).
    with pytest.raises(InvalidPayload, match="start with a new run id"):
        await env.client.run("diamond", good, run_id="reused-1")
    repeat = await env.client.start("diamond", good, run_id="reused-1")
    with pytest.raises(InvalidPayload, match="start with a new run id"):
        await watch_run(env.client, repeat, Console(file=io.StringIO()))
    # Past it, a run starts, and neither its waiter nor its live view answers with the earlier
    # trigger's rejection (still in the run's journal).
    await asyncio.sleep(window + 1.0)
    handle = await env.client.start("diamond", good, run_id="reused-1")
    assert (await watch_run(env.client, handle, Console(file=io.StringIO()))).status is RunStatus.COMPLETED
    assert (await handle.result())["charged"] == 3


async def test_an_input_larger_than_the_server_takes_is_a_typed_error(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond])
    with pytest.raises(PayloadTooLarge, match="larger than the NATS server accepts"):
        await env.client.start("diamond", {"order_id": "x" * 2_000_000, "amount": 1})


async def test_results_and_failure_reports_too_large_to_store_end_the_run(env_factory: Any) -> None:
    """Every event fits a message, but what a run accumulates may not: the run still ends, failed."""
    big = "z" * 600_000
    results = Workflow("bigresults")  # two sinks: the run record would hold both outputs

    @results.node()
    async def left(ctx: NodeContext) -> str:
        return big

    @results.node()
    async def right(ctx: NodeContext) -> str:
        return big

    report = Workflow("bigreport")  # a join that fails: its report would carry both inputs

    @report.node()
    async def one(ctx: NodeContext) -> str:
        return big

    @report.node()
    async def two(ctx: NodeContext) -> str:
        return big

    @report.node(depends_on=[one, two], retry=RetryPolicy(max_attempts=3, initial=0.0))
    async def both(ctx: NodeContext) -> int:
        raise RuntimeError("both inputs arrived, and this fails")

    env: LocalEnvironment = await env_factory([results, report])
    async with asyncio.timeout(30):  # each used to leave its run running for good
        with pytest.raises(RunFailed, match="results cannot be stored"):
            await env.client.run("bigresults", {})
        handle = await env.client.start("bigreport", {})
        with pytest.raises(RunFailed, match=r"this fails.*not retried: its report was too large"):
            await handle.result()
    assert (await handle.status()).nodes["both"].attempts == 1


async def test_results_that_fit_the_run_record_but_not_its_end_event_still_reach_the_client(
    env_factory: Any,
) -> None:
    """The end event carries the results with its own fields and a message id naming the run; when
    that is just too large while the record is not, the event says the results are in the record."""
    wf = Workflow("nearlimit")
    size: dict[str, int] = {}

    @wf.node()
    async def sink(ctx: NodeContext) -> str:
        return "z" * size["output"]

    env: LocalEnvironment = await env_factory([wf])
    run_id = "r" * 128  # the end event's message id is the longest part its headers add
    limit = env.client.bus.nc.max_payload
    end = {"created_at": 0.0, "finished_at": 0.0, "attempts_lost": 0, "results": {"sink": ""}}
    end_headers = len(f"NATS/1.0\r\nNats-Msg-Id: {run_id}.run.completed\r\n\r\n")
    size["output"] = limit - len(encode(end)) - end_headers + 16  # the end event is 16 bytes too large
    handle = await env.client.start("nearlimit", {}, run_id=run_id)
    async with asyncio.timeout(30):  # it used to wait for ever: the end event never went out
        assert len(await handle.result()) == size["output"]
    journal = await env.client.journal(run_id, "nearlimit")
    [ended] = [e for e in journal if e["node"] == "_run" and e["kind"] == "completed"]
    assert ended["data"]["results_in_record"] is True
    assert "results" not in ended["data"]


async def test_an_input_that_fits_a_trigger_but_not_a_run_record_is_oversized(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.chain(1)])
    # 500 KB of JSON floats (4 bytes each) is 1.1 MB of msgpack (9 bytes each) in the run record.
    text = json.dumps([0.5] * 125_000, separators=(",", ":")).encode()
    headers = {"Nats-Msg-Id": "floats-1", "Content-Type": "application/json"}
    await env.client.bus.js.publish(env.names.trigger("chain"), text, headers=headers)
    with pytest.raises(PayloadTooLarge, match="cannot be stored"):
        await env.client.get_handle("floats-1", "chain").result()
    [record] = await _dead_letters(env, 1)
    assert record["reason"] == "oversized"


async def test_an_event_that_is_not_a_map_is_dead_lettered_at_once(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond])
    js = env.client.bus.js
    await js.publish(env.names.run_event("diamond", "stray-1", "started"), encode(42))  # to node actors
    await js.publish(env.names.event("diamond", "stray-2", "validate", "attempt_failed"), encode([1, 2]))
    records = await _dead_letters(env, 2)
    assert {r["reason"] for r in records} == {"malformed"}
    assert all("expected a map of event fields" in r["error"] for r in records)
    for consumer in ("node_diamond_validate", "supervisor_diamond"):  # first delivery, no retries
        info = await js.consumer_info(env.names.events_stream, consumer)
        assert (info.num_ack_pending, info.num_redelivered) == (0, 0)


async def test_unknown_workflow_trigger_is_dead_lettered(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.chain(1)], unknown_workflow_grace=0.3)
    await env.client.bus.js.publish(env.names.trigger("nosuch"), encode({}), headers={"Nats-Msg-Id": "u-1"})
    [record] = await _dead_letters(env, 1)
    assert record["reason"] == "unknown_workflow"
    assert record["error_type"] == "UnknownWorkflow"
    assert "nosuch" in record["error"]
    [event] = await _rejections(env, "nosuch", 1)
    assert event["reason"] == "unknown_workflow"
    with pytest.raises(UnknownWorkflow):
        await env.client.start("nosuch", {})


async def test_a_trigger_subject_of_several_tokens_is_dead_lettered_at_once(env_factory: Any) -> None:
    """No workflow name has a dot: such a trigger is not kept waiting for a worker that could never
    register its workflow."""
    env: LocalEnvironment = await env_factory([wfs.chain(1)], unknown_workflow_grace=60.0)
    subject = env.names.trigger("chain1") + ".extra"
    await env.client.bus.js.publish(subject, encode({}), headers={"Nats-Msg-Id": "x-1"})
    async with asyncio.timeout(15):  # well inside the 60 s grace
        [record] = await _dead_letters(env, 1)
    assert record["reason"] == "unknown_workflow"
    assert "names no workflow" in record["error"]
    assert repr(subject) in record["error"]


async def test_run_id_errors_are_typed_and_name_their_source(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond])
    with pytest.raises(InvalidRunId, match="not subject-token safe"):
        await env.client.start(wfs.diamond, {"order_id": "o", "amount": 1}, run_id="bad id")
    headers = {"Flow-Run-Id": "also bad!", "Nats-Msg-Id": "fine-1"}
    await env.client.bus.js.publish(env.names.trigger("diamond"), encode({}), headers=headers)
    [record] = await _dead_letters(env, 1)
    assert record["reason"] == "invalid_run_id"
    assert "(Flow-Run-Id) 'also bad!'" in record["error"]


async def test_client_validates_input_before_publishing(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.diamond])
    with pytest.raises(InvalidPayload, match="amount"):
        await env.client.start(wfs.diamond, {"order_id": "o", "amount": 0})


async def test_trigger_published_before_any_worker_runs_when_one_comes(env_factory: Any) -> None:
    wf = wfs.chain(3, name="latecomer")
    first: LocalEnvironment = await env_factory([wf])  # registers the workflow, as a past deployment would
    for worker in first.workers:
        await worker.stop()
    first.workers.clear()
    handle = await first.client.start("latecomer", {}, run_id="waiting-run")
    # No worker is up: the trigger waits in its stream and no run record appears.
    info = await first.client.bus.js.stream_info(first.names.triggers_stream)
    assert info.state.messages == 1
    assert not await _has_record(first, "waiting-run")
    await first.add_worker()
    assert await handle.result() == {"k": 2, "acc": 3}


async def _has_record(env: LocalEnvironment, run_id: str) -> bool:
    from flow_orchestrator.bus import Names

    return await env.client.store.get(Names.run_key(run_id)) is not None


async def test_cancel_stops_a_running_run(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([wfs.failing])
    handle = await env.client.start("failing", {"mode": "slow"})

    async def flaky_running() -> bool:
        try:
            return (await handle.status()).nodes["flaky"].status is NodeStatus.RUNNING
        except RunNotFound:
            return False

    await eventually(flaky_running, within=20)
    await handle.cancel("test")
    record = await handle.wait()
    assert record["status"] == "cancelled"
    snapshot = await eventually(lambda: _settled(handle), within=20)
    assert snapshot.nodes["flaky"].status is NodeStatus.CANCELLED
    assert snapshot.nodes["after"].status is NodeStatus.CANCELLED
    assert snapshot.nodes["start"].status is NodeStatus.COMPLETED


async def _settled(handle: Any) -> Any:
    snapshot = await handle.status()
    return snapshot if snapshot.nodes["flaky"].attempts == 1 else None


@pytest.mark.parametrize(
    "output",
    [{"value": object()}, "z" * 2_000_000],  # not encodable; larger than the server's 1 MiB messages
    ids=["unencodable", "too-large"],
)
async def test_an_output_that_cannot_be_stored_fails_the_node_without_retry(
    env_factory: Any, output: Any
) -> None:
    wf = Workflow("unstorable")

    @wf.node(retry=RetryPolicy(max_attempts=3, initial=0.0))
    async def odd(ctx: NodeContext) -> Any:
        return output

    env: LocalEnvironment = await env_factory([wf])
    handle = await env.client.start("unstorable", {})
    with pytest.raises(RunFailed, match="cannot be stored"):
        await handle.result()
    snapshot = await handle.status()
    assert snapshot.nodes["odd"].attempts == 1
    assert snapshot.nodes["odd"].error is not None
    assert snapshot.nodes["odd"].error["type"] == "NonRetryableError"
