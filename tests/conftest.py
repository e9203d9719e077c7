"""Fixtures: one real nats-server (JetStream, random port, temp store) per session; every test gets its
own subject prefix, streams and bucket, so tests never see each other's messages."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from flow_orchestrator.bus import EmbeddedServer
from flow_orchestrator.testing import LocalEnvironment

if TYPE_CHECKING:
    from tests._otlp import Receiver

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedServer]:
    server = EmbeddedServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats_url(nats_server: EmbeddedServer) -> str:
    return nats_server.url


@pytest.fixture
def subprocess_env(nats_url: str) -> dict[str, str]:
    """Environment for child processes (CLI, workers): the test server and the repo on the path."""
    env = dict(os.environ)
    env["NATS_URL"] = nats_url
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture
async def env_factory(nats_url: str) -> AsyncIterator[object]:
    started: list[LocalEnvironment] = []

    async def start(*args: object, **kwargs: object) -> LocalEnvironment:
        kwargs.setdefault("nats_url", nats_url)
        env = LocalEnvironment(*args, **kwargs)  # type: ignore[arg-type]
        await env.start()
        started.append(env)
        return env

    yield start
    for env in started:
        await env.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """An OTLP/HTTP trace receiver on 127.0.0.1 (tests/_otlp.py), serving from its own thread."""
    from tests._otlp import Receiver  # here: the repo root is on sys.path only below the imports

    server = Receiver()
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()
