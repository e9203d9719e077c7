"""WorkflowData against real JetStream KV: typed getters, models, CAS writes, keys, outputs, the store."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import BaseModel

from flow_orchestrator import (
    DataKeyNotFound,
    DataTypeError,
    InvalidNameError,
    KVWorkflowStore,
    NodeContext,
    UnencodableValue,
    Workflow,
    WorkflowData,
)
from flow_orchestrator.testing import LocalEnvironment


class Address(BaseModel):
    city: str
    zip: str


@pytest.fixture
async def data(env_factory: Any) -> WorkflowData:
    env: LocalEnvironment = await env_factory([])
    return WorkflowData(env.client.store, "run-data-1")


async def test_typed_getters_and_wrong_types(data: WorkflowData) -> None:
    await data.set("count", 3)
    await data.set("name", "ada")
    await data.set("ratio", 0.5)
    await data.set("flag", True)
    await data.set("items", [1, 2])
    await data.set("meta", {"a": 1})
    assert await data.get_int("count") == 3
    assert await data.get_str("name") == "ada"
    assert await data.get_float("ratio") == 0.5
    assert await data.get_float("count") == 3.0
    assert await data.get_bool("flag") is True
    assert await data.get_list("items") == [1, 2]
    assert await data.get_dict("meta") == {"a": 1}
    with pytest.raises(DataTypeError, match=r"'name' holds str 'ada', not an int"):
        await data.get_int("name")
    with pytest.raises(DataTypeError, match="not an int"):
        await data.get_int("flag")  # a bool is not an int here
    with pytest.raises(DataKeyNotFound, match="no data key 'missing'"):
        await data.get("missing")
    assert await data.get_int("missing", 7) == 7
    # A missing key gives the default as given, None included (not int(None), nor the str 'None').
    getters = (data.get_int, data.get_float, data.get_str, data.get_bool, data.get_list, data.get_dict)
    assert [await get("missing", None) for get in getters] == [None] * 6


async def test_a_value_larger_than_the_server_takes_is_a_typed_error(data: WorkflowData) -> None:
    with pytest.raises(UnencodableValue, match="more than the NATS server takes"):
        await data.set("blob", "z" * 2_000_000)


async def test_pydantic_models_as_values(data: WorkflowData) -> None:
    await data.set("address", Address(city="Lyon", zip="69001"))
    assert await data.get("address") == {"city": "Lyon", "zip": "69001"}
    assert await data.get_model("address", Address) == Address(city="Lyon", zip="69001")
    await data.set("not-address", {"city": 1})
    with pytest.raises(DataTypeError, match="does not validate as Address"):
        await data.get_model("not-address", Address)


async def test_keys_delete_and_bad_keys(data: WorkflowData) -> None:
    await data.set("a", 1)
    await data.set("b/c", 2)
    assert await data.keys() == ["a", "b/c"]
    await data.delete("a")
    assert await data.keys() == ["b/c"]
    with pytest.raises(DataKeyNotFound):
        await data.get("a")
    with pytest.raises(InvalidNameError):
        await data.set("has.dot", 1)


async def test_concurrent_updates_are_not_lost(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([])
    writers = [WorkflowData(env.client.store, "run-cas") for _ in range(8)]
    await asyncio.gather(*(w.update("total", lambda v: v + 1, default=0) for w in writers for _ in range(5)))
    assert await writers[0].get_int("total") == 40


async def test_set_after_a_stale_read_still_writes(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([])
    first, second = WorkflowData(env.client.store, "run-stale"), WorkflowData(env.client.store, "run-stale")
    await first.set("k", 1)
    assert await second.get("k") == 1
    await first.set("k", 2)  # second's revision is now stale
    await second.set("k", 3)
    assert await first.get("k") == 3


async def test_workflow_store_save_and_load(env_factory: Any) -> None:
    env: LocalEnvironment = await env_factory([])
    store = KVWorkflowStore(env.client.store)
    await store.save("run-store", {"x": 1, "y": {"z": [1, 2]}})
    assert await store.load("run-store") == {"x": 1, "y": {"z": [1, 2]}}
    assert await store.load("run-empty") == {}


async def test_nodes_share_data_and_read_any_output(env_factory: Any) -> None:
    wf = Workflow("sharing")

    @wf.node()
    async def first(ctx: NodeContext) -> dict[str, int]:
        await ctx.data.set("from_first", 10)
        return {"v": 1}

    @wf.node(depends_on=[first])
    async def second(ctx: NodeContext) -> dict[str, int]:
        return {"v": ctx.output("first")["v"] + await ctx.data.get_int("from_first")}

    @wf.node(depends_on=[second])
    async def third(ctx: NodeContext) -> dict[str, Any]:
        earlier = await ctx.data.output("first")  # not a direct upstream: read from the journal
        with pytest.raises(DataKeyNotFound):
            await ctx.data.output("nope")
        return {"first": earlier, "second": ctx.output("second"), "keys": await ctx.data.keys()}

    env: LocalEnvironment = await env_factory([wf])
    assert await env.client.run("sharing", {}) == {
        "first": {"v": 1},
        "second": {"v": 11},
        "keys": ["from_first"],
    }


async def test_run_node_in_isolation(env_factory: Any) -> None:
    wf = Workflow("isolated")

    @wf.node()
    async def price(ctx: NodeContext) -> dict[str, float]:
        rate = await ctx.data.get_float("rate")
        return {"total": ctx.input["amount"] * rate}

    env: LocalEnvironment = await env_factory([])
    result = await env.run_node(wf, "price", input={"amount": 10}, data={"rate": 1.2})
    assert result == {"total": pytest.approx(12.0)}
