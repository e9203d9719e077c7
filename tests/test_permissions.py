"""The per-role users of ``deploy/nats/accounts.conf`` on a real server: a worker runs workflows, a
``trigger`` user starts runs, an ``observer`` reads runs and their journals and cannot start any."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import nats.errors
import pytest
from nats.js.api import ConsumerConfig

from flow_orchestrator import Client, PermissionDenied, RunEvent, Worker
from flow_orchestrator.bus import EmbeddedServer, encode
from flow_orchestrator.runtime._dead_letters import DeadLetter
from flow_orchestrator.testing import eventually
from tests import workflows

ACCOUNTS = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "accounts.conf"
PASSWORDS = {"worker": "w-secret", "trigger": "t-secret", "observer": "o-secret"}
ORDER = {"order_id": "o-1", "amount": 42.0}


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[EmbeddedServer]:
    """A server that loads the example accounts; their passwords come from its environment."""
    for user, password in PASSWORDS.items():
        monkeypatch.setenv(f"FLOW_{user.upper()}_PASSWORD", password)
    shutil.copy(ACCOUNTS, tmp_path / "accounts.conf")
    (tmp_path / "server.conf").write_text('include "./accounts.conf"\n', encoding="utf-8")
    server = EmbeddedServer(store_dir=tmp_path / "store", extra_args=["-c", str(tmp_path / "server.conf")])
    server.start()
    yield server
    server.stop()


def _as(server: EmbeddedServer, user: str) -> str:
    return f"nats://{user}:{PASSWORDS[user]}@127.0.0.1:{server.port}"


async def test_each_role_does_its_part_and_no_more(secured: EmbeddedServer) -> None:
    async with Worker(workflows.diamond, nats_url=_as(secured, "worker")):
        # Neither role may create streams: each binds to what the worker provisioned.
        async with await Client.connect(_as(secured, "trigger")) as trigger:
            handle = await trigger.start("diamond", ORDER)
        async with await Client.connect(_as(secured, "observer")) as observer:
            watched = observer.get_handle(handle.run_id, "diamond")
            assert (await watched.result())["charged"] == 42.0
            snapshot = await observer.snapshot(handle.run_id)
            assert snapshot.status.value == "completed"
            assert {run["run_id"] for run in await observer.list_runs()} == {handle.run_id}
            kinds = {(e["node"], e["kind"]) for e in await observer.journal(handle.run_id, "diamond")}
            assert ("ship", "completed") in kinds
            # The server refuses the publish on the connection, not in a reply: a typed error says so.
            with pytest.raises(PermissionDenied, match=r"flow\.trigger\.diamond.*allowed to start runs"):
                await observer.start("diamond", ORDER)
            with pytest.raises(PermissionDenied, match=r"\._run\.cancel'.*allowed to cancel runs"):
                await watched.cancel("an observer may not")
            await _observer_cannot_touch_the_workers_consumers(observer)
            replayed = [(e.node, e.kind) async for e in observer.events(handle.run_id)]
            assert replayed[-1] == (None, "completed")
            assert replayed.count(("ship", "completed")) == 1
            # Live: the observer follows a run that starts after it began to listen.
            live = asyncio.create_task(_kinds(observer.events("watched-1", "diamond")))
            await asyncio.sleep(0.3)
            async with await Client.connect(_as(secured, "trigger")) as trigger:
                await trigger.start("diamond", ORDER, run_id="watched-1")
            async with asyncio.timeout(20):
                kinds = await live
            assert kinds[0] == (None, "started")
            assert kinds[-1] == (None, "completed")
            assert ("ship", "completed") in kinds
        async with await Client.connect(_as(secured, "trigger")) as trigger:  # a raw publisher's bad input
            subject, bad = trigger.names.trigger("diamond"), encode({"amount": -5})
            await trigger.bus.js.publish(subject, bad, headers={"Nats-Msg-Id": "bad-1"})
        async with await Client.connect(_as(secured, "observer")) as observer:
            letters = await eventually(lambda: _letters(observer), within=20)
            assert [letter.reason for letter in letters] == ["invalid_payload"]
            with pytest.raises(PermissionDenied, match=r"allowed to replay dead letters"):
                await observer.replay_dead_letter(letters[0].id)
        async with await Client.connect(_as(secured, "trigger")) as trigger:
            with pytest.raises(PermissionDenied, match=r"allowed to retry runs"):
                await trigger.get_handle(handle.run_id, "diamond").retry()


async def _kinds(events: AsyncGenerator[RunEvent, None]) -> list[tuple[str | None, str]]:
    return [(event.node, event.kind) async for event in events]


async def _letters(client: Client) -> list[DeadLetter] | None:
    return await client.dead_letters("diamond") or None


async def _observer_cannot_touch_the_workers_consumers(observer: Client) -> None:
    """It reads the events stream without consumers: it can neither pull from a worker's durable
    consumer (which would take its deliveries) nor change one, through the consumer's own subject or
    through the create request without a name in its subject (whose body names the consumer)."""
    js, stream, durable = observer.bus.js, observer.names.events_stream, "node_diamond_validate"
    pull = await js.pull_subscribe_bind(durable, stream=stream)
    with pytest.raises(nats.errors.TimeoutError):
        await pull.fetch(1, timeout=1.0)
    assert observer.bus.refusal(f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}")
    with pytest.raises(nats.errors.TimeoutError):
        await js.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_wait=1.0), timeout=1.0)
    unnamed = f"$JS.API.CONSUMER.CREATE.{stream}"
    body = {"stream_name": stream, "config": {"durable_name": durable, "ack_wait": 1_000_000_000}}
    with pytest.raises(nats.errors.TimeoutError):
        await observer.bus.nc.request(unnamed, json.dumps(body).encode(), timeout=1.0)
    assert observer.bus.refusal(unnamed)
    assert (await js.consumer_info(stream, durable)).config.ack_wait == 30  # the worker's, unchanged
