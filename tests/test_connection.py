"""Connection and provisioning behaviour against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from typing import Any

import nats.errors
import pytest
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from flow_orchestrator import Client, NodeContext, StorageSettings, Workflow
from flow_orchestrator.bus import EmbeddedServer, Names, connect, provision
from flow_orchestrator.bus._pull import EARLY_REQUESTS, Capacity, PullFeed
from flow_orchestrator.testing import LocalEnvironment, eventually


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_first_connection_to_a_dead_server_fails_instead_of_hanging() -> None:
    with pytest.raises(nats.errors.NoServersError):
        await Client.connect(f"nats://127.0.0.1:{_free_port()}")


async def test_clients_never_rewrite_a_deployments_stream_settings(nats_url: str) -> None:
    prefix = f"cfg{uuid.uuid4().hex[:6]}"
    names = Names(prefix)
    bus = await connect(nats_url)
    try:
        await provision(bus.js, names, StorageSettings(events_max_age=3600.0))
        client = await Client.connect(nats_url, prefix=prefix)  # default settings differ
        await client.close()
        info = await bus.js.stream_info(names.events_stream)
        assert info.config.max_age == 3600.0
        # A worker's provisioning does apply its settings (the deployment follows its workers).
        await provision(bus.js, names, StorageSettings(events_max_age=7200.0))
        info = await bus.js.stream_info(names.events_stream)
        assert info.config.max_age == 7200.0
    finally:
        await bus.close()


def test_a_stopped_server_leaves_no_temporary_directory_behind() -> None:
    server = EmbeddedServer()
    server.start()
    server.restart()  # a restart keeps the store and finds its new port
    store, ports = server.store_dir, server._ports_dir
    assert store.is_dir()
    assert ports.is_dir()
    server.stop()
    assert not store.exists()
    assert not ports.exists()


async def test_pull_feeds_ask_again_as_soon_as_the_connection_comes_back() -> None:
    """A killed and restarted server forgot every pull request. The reconnection itself must renew them: with
    requests that live ten minutes and a heartbeat check every minute, nothing else would for over
    two minutes, longer than this test waits."""
    with EmbeddedServer() as server:
        bus = await connect(server.url)
        received: asyncio.Queue[bytes] = asyncio.Queue()
        feed: PullFeed | None = None

        async def handle(msg: Msg) -> None:
            await msg.ack()
            await received.put(msg.data)
            assert feed is not None
            feed.done()

        try:
            await bus.js.add_stream(name="FEED", subjects=["feed.>"])
            await bus.js.add_consumer("FEED", ConsumerConfig(durable_name="c", ack_policy=AckPolicy.EXPLICIT))
            feed = PullFeed(
                bus.nc,
                api_prefix="$JS.API",
                stream="FEED",
                consumer="c",
                handle=handle,
                capacity=Capacity(10),
                batch=10,
                expires=600.0,
                heartbeat=60.0,
            )
            bus.reconnected.add(feed.forget_requests)
            await feed.start()
            # Past its first, short-lived requests: from now on each lives ten minutes.
            await eventually(lambda: feed is not None and feed._requests > EARLY_REQUESTS, within=30)
            await bus.js.publish("feed.a", b"before")
            assert await asyncio.wait_for(received.get(), 10) == b"before"

            # Killed: a server stopped gently ends its waiting requests (409), which renews them anyway.
            server.stop(kill=True)
            server.start()

            async def stream_back() -> bool:
                with contextlib.suppress(nats.errors.Error):
                    await bus.js.stream_info("FEED")
                    return True
                return False

            await eventually(stream_back, within=30)
            await bus.js.publish("feed.a", b"after")

            async def after() -> list[bytes]:
                # A SIGKILL can lose the server's record of the ack of "before" (consumer state is
                # flushed to disk a moment later), so "before" may come again first: at least once.
                seen = [await received.get()]
                while seen[-1] != b"after":
                    seen.append(await received.get())
                return seen

            seen = await asyncio.wait_for(after(), 30)
            assert set(seen) <= {b"before", b"after"}, seen
        finally:
            if feed is not None:
                await feed.stop()
            await bus.close()


async def test_a_pull_request_the_server_ended_is_forgotten_and_a_refusal_pauses_the_feed() -> None:
    """The server ends requests with a status: whatever it is, the feed must not keep counting on the
    messages that request promised. Expiry and a leadership change are renewed at once; a refusal
    (no leader yet, a limit, a bad request) is asked again only after a pause, not in a tight loop."""
    feed = PullFeed(None, api_prefix="$JS.API", stream="S", consumer="c", handle=_never, capacity=Capacity(4))  # type: ignore[arg-type]

    async def status(headers: dict[str, str]) -> None:
        await feed._on_message(Msg(None, subject="_INBOX.x", headers=headers))  # type: ignore[arg-type]

    for code, description, refused in (
        ("408", "Request Timeout", False),
        ("409", "Leadership Change", False),
        ("400", "Bad Request", True),
        ("409", "Exceeded MaxWaiting", True),
        ("503", "", True),
    ):
        feed._outstanding, feed._refused_until = 64, 0.0
        await status({"Status": code, "Description": description})
        assert feed._outstanding == 0, (code, description)
        assert (feed._refused_until > 0) is refused, (code, description)
    feed._outstanding = 64
    await status({"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "10"})
    assert feed._outstanding == 54  # the rest of it was delivered or is still promised by others
    await status({"Status": "408", "Description": "Request Timeout", "Nats-Pending-Messages": "0"})
    assert feed._outstanding == 54  # fully delivered: nothing more to forget
    await status({"Status": "100", "Description": "Idle Heartbeat"})
    assert feed._outstanding == 54  # a heartbeat ends nothing


async def _never(msg: Msg) -> None:
    raise AssertionError("no message was sent")


class _CuttableLink:
    """A loopback TCP forwarder to the server: ``cut()`` drops every connection through it and
    refuses new ones, ``restore()`` listens again on the same port. A real link going down."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._link, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        self._writers.clear()
        await self._server.wait_closed()

    async def restore(self) -> None:
        await self.start()


async def test_a_run_that_ends_while_the_client_is_cut_off_still_returns(env_factory: Any) -> None:
    """A core subscription misses what is published while its connection is down: the run's
    terminal event among it. After reconnecting, the waiting client looks the run up instead."""
    entered, gate = asyncio.Event(), asyncio.Event()
    wf = Workflow("held")

    @wf.node()
    async def hold(ctx: NodeContext) -> int:
        entered.set()
        await gate.wait()
        return 7

    env: LocalEnvironment = await env_factory([wf])
    link = _CuttableLink(int(env.url.rsplit(":", 1)[1]))
    await link.start()
    client = await Client.connect(f"nats://127.0.0.1:{link.port}", prefix=env.prefix)
    try:
        waiting = asyncio.create_task(client.run("held", {}))
        await asyncio.wait_for(entered.wait(), 30)
        await link.cut()
        await eventually(lambda: not client.bus.nc.is_connected, within=10)
        announced: asyncio.Queue[Msg] = asyncio.Queue()
        sub = await env.client.bus.nc.subscribe(
            env.names.run_event("held", "*", "completed"), cb=announced.put
        )
        gate.set()  # the run ends, and its terminal event goes out, while the client is cut off
        await asyncio.wait_for(announced.get(), 15)
        await sub.unsubscribe()
        assert not waiting.done()  # the client did miss it
        await link.restore()
        async with asyncio.timeout(15):
            assert await waiting == 7
    finally:
        await client.close()
        await link.cut()
