"""Connection and provisioning behaviour against a real server."""

from __future__ import annotations

import socket
import uuid

import nats.errors
import pytest

from flow_orchestrator import Client, StorageSettings
from flow_orchestrator.bus import EmbeddedServer, Names, connect, provision


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
