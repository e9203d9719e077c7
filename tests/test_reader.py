"""Reading a stream without consumers (``bus/_reader.py``), against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import pytest
from nats.js.api import StreamConfig

from flow_orchestrator.bus import EmbeddedServer, _reader
from flow_orchestrator.bus._reader import follow_stored, read_stored


@pytest.fixture
async def stream(nats_url: str) -> AsyncIterator[tuple[Any, Any, str, str]]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    name = f"R{uuid.uuid4().hex[:8]}"
    prefix = name.lower()
    await js.add_stream(StreamConfig(name=name, subjects=[f"{prefix}.>"], allow_direct=True))
    try:
        yield nc, js, name, prefix
    finally:
        await js.delete_stream(name)
        await nc.close()


async def test_a_read_returns_every_message_of_the_subject_in_order_with_its_metadata(
    stream: tuple[Any, Any, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    nc, js, name, prefix = stream
    monkeypatch.setattr(_reader, "BATCH", 7)  # several batches
    for i in range(30):
        await js.publish(f"{prefix}.{'a' if i % 3 else 'b'}.{i}", str(i).encode(), headers={"k": str(i)})
    found = await read_stored(nc, js, name, f"{prefix}.a.>")
    assert [m.data for m in found] == [str(i).encode() for i in range(30) if i % 3]
    assert [m.seq for m in found] == sorted(m.seq for m in found)
    assert all(m.headers == {"k": m.data.decode()} for m in found)  # a direct get's own headers dropped
    assert all(m.at is not None for m in found)
    assert await read_stored(nc, js, name, f"{prefix}.none.>") == []


async def test_a_read_fills_in_what_a_lagging_replica_did_not_have_from_the_leader(
    stream: tuple[Any, Any, str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica answering direct gets may lag behind the leader: the read still ends complete."""
    nc, js, name, prefix = stream
    for i in range(5):
        await js.publish(f"{prefix}.run.{i}", str(i).encode())
    batch = _reader.read_batch

    async def lagging(*args: Any, **kwargs: Any) -> tuple[list[Any], int]:
        found, _ = await batch(*args, **kwargs)
        return [m for m in found if m.seq <= 3], 0  # as if it had stored only the first three

    monkeypatch.setattr(_reader, "read_batch", lagging)
    found = await read_stored(nc, js, name, f"{prefix}.run.>")
    assert [m.data for m in found] == [b"0", b"1", b"2", b"3", b"4"]


async def test_following_yields_what_is_stored_after_it_started_and_only_that(
    stream: tuple[Any, Any, str, str],
) -> None:
    nc, js, name, prefix = stream
    await js.publish(f"{prefix}.x.old", b"old")
    follower = follow_stored(nc, js, name, f"{prefix}.x.>", from_start=False)
    async with contextlib.aclosing(follower):
        first = asyncio.ensure_future(anext(follower))
        async with asyncio.timeout(20):
            # Once it yields a probe, it is surely following (however slow its start was).
            while not first.done():
                await js.publish(f"{prefix}.x.probe", b"probe")
                await asyncio.wait([first], timeout=0.2)
        assert first.result().data == b"probe"  # not b"old": it started from the stream's end
        await js.publish(f"{prefix}.x.new", b"new", headers={"Nats-Msg-Id": "once"})
        await js.publish(f"{prefix}.x.new", b"again", headers={"Nats-Msg-Id": "once"})  # a duplicate
        await nc.publish(f"{prefix}.x.core", b"core only")  # reaches the stream too
        seen = []
        async with asyncio.timeout(10):
            while len(seen) < 2:
                data = (await anext(follower)).data
                if data != b"probe":  # those published before the first was yielded
                    seen.append(data)
        assert seen == [b"new", b"core only"]
        # The duplicate was published (a core subscriber saw it), never stored: never yielded.
        nothing = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(1.5)
        assert not nothing.done()
        nothing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await nothing


async def test_following_outlives_a_server_outage_longer_than_a_read_waits(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """A read that gets no answer (the server is down) is tried again, not raised: `flowctl watch`
    used to die with a traceback after an outage longer than a read's wait."""
    server = EmbeddedServer(store_dir=tmp_path / "store")
    await asyncio.to_thread(server.start)
    batch = _reader.read_batch

    async def impatient(*args: Any, **kwargs: Any) -> tuple[list[Any], int]:
        return await batch(*args, **{**kwargs, "wait": 0.3})

    monkeypatch.setattr(_reader, "read_batch", impatient)
    nc = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="OUT", subjects=["out.>"], allow_direct=True))
        await js.publish("out.a", b"0")
        follower = follow_stored(nc, js, "OUT", "out.>", from_start=True)
        async with contextlib.aclosing(follower):
            async with asyncio.timeout(30):
                assert (await anext(follower)).data == b"0"
            second = asyncio.ensure_future(anext(follower))
            await asyncio.to_thread(server.stop)
            await asyncio.sleep(1.5)  # several reads time out meanwhile
            await asyncio.to_thread(server.start)
            async with asyncio.timeout(30):
                while True:
                    with contextlib.suppress(nats.errors.Error):
                        await js.publish("out.a", b"1", timeout=1)
                        break
                    await asyncio.sleep(0.2)
                assert (await second).data == b"1"
    finally:
        await nc.close()
        await asyncio.to_thread(server.stop)


async def test_following_ends_when_its_connection_is_closed(nats_url: str) -> None:
    admin, nc = await nats.connect(nats_url), await nats.connect(nats_url)
    name = f"C{uuid.uuid4().hex[:8]}"
    await admin.jetstream().add_stream(
        StreamConfig(name=name, subjects=[f"{name.lower()}.>"], allow_direct=True)
    )
    try:
        follower = follow_stored(nc, nc.jetstream(), name, f"{name.lower()}.>", from_start=True)
        waiting = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0.3)
        await nc.close()
        async with asyncio.timeout(10):  # it used to look again every second, for ever
            with pytest.raises(StopAsyncIteration):
                await waiting
    finally:
        await admin.jetstream().delete_stream(name)
        await admin.close()
