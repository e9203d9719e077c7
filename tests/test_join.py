"""Join bookkeeping against real KV: coalesced arrivals, and a failed batched write losing nothing."""

from __future__ import annotations

import asyncio
from typing import Any

import nats.errors
import pytest

from flow_orchestrator.actors._join import JoinBook, JoinNotRecorded
from flow_orchestrator.testing import LocalEnvironment


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
    assert results[0] == {"arrived": ["a"], "holder": None}
    assert isinstance(results[1], nats.errors.TimeoutError)  # b is not acknowledged: it comes back
    # c's arrival rode in b's failed batch: it was handed back and written by c, with b's, so c's
    # message completes the set and wins the join.
    assert results[2] == {"arrived": ["a", "c", "b"], "holder": 3} or results[2] == {
        "arrived": ["a", "b", "c"],
        "holder": 3,
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
    latest = {"arrived": ["a"], "holder": None}

    async def stale_mutate(key: str, change: Any, **options: Any) -> Any:
        return latest, 1  # a write that does not include this arrival (it must not be trusted)

    monkeypatch.setattr(store, "mutate", stale_mutate)
    with pytest.raises(JoinNotRecorded):
        await book.arrive("join.r2.n", "b", 7)
