"""The per-role users of ``deploy/nats/accounts.conf`` on a real server: a worker runs workflows, a
``trigger`` user starts runs, an ``observer`` reads runs and their journals and cannot start any."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from flow_orchestrator import Client, PermissionDenied, Worker
from flow_orchestrator.bus import EmbeddedServer
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
            assert await observer.dead_letters("diamond") == []
            # The server refuses the publish on the connection, not in a reply: a typed error says so.
            with pytest.raises(PermissionDenied, match=r"flow\.trigger\.diamond"):
                await observer.start("diamond", ORDER)
