"""The same engine against NATS in a Docker container (testcontainers), for users with a Docker engine.

Skipped, with the reason, where no Docker engine is reachable (as on the development machine and CI).
What it checks, a diamond workflow with shared data over a JetStream server, is covered without Docker
by ``test_engine.py::test_diamond_joins_once_and_shares_data`` on the embedded nats-server.
"""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from flow_orchestrator.testing import LocalEnvironment
from tests import workflows as wfs

_COVERED = "the same run is covered on the embedded nats-server by test_engine.py"


def _docker_unavailable() -> str | None:
    """Ask the engine's socket for ``/_ping`` (the docker library leaks a socket when it fails)."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None  # a configured TCP engine: let testcontainers use it
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(3)
            conn.connect(host[len("unix://") :])
            conn.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = conn.recv(64)
    except OSError as exc:
        return f"no Docker engine reachable at {host} ({type(exc).__name__}); {_COVERED}"
    if b" 200 " not in reply:
        return f"the Docker engine at {host} did not answer its ping; {_COVERED}"
    return None


_REASON = _docker_unavailable()
pytestmark = [pytest.mark.docker, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


async def test_diamond_on_a_nats_container() -> None:
    from testcontainers.community.nats import NatsContainer

    with NatsContainer("nats:2.12", jetstream=True) as container:
        env: Any = LocalEnvironment([wfs.diamond], nats_url=container.nats_uri())
        async with env:
            result = await env.client.run("diamond", {"order_id": "docker-1", "amount": 3})
    assert result == {"shipped": True, "payment": "pmt-docker-1", "charged": 3}
