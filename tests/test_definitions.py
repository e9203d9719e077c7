"""Pure logic, no server: definitions and DAG validation, builder parity, names, retry maths, codec."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import flow_orchestrator
from flow_orchestrator import (
    CycleError,
    DuplicateNodeError,
    EmptyWorkflowError,
    InvalidNameError,
    MalformedMessage,
    NodeContext,
    PayloadTooLarge,
    RetryPolicy,
    UnknownDependencyError,
    Worker,
    Workflow,
    WorkflowBuilder,
)
from flow_orchestrator.bus import decode, decode_trigger, encode
from flow_orchestrator.bus._codec import decode_event
from flow_orchestrator.runtime._dag import find_cycle, topological_order, validate_graph


async def noop(ctx: NodeContext) -> None:
    return None


def test_public_api_is_pinned() -> None:
    assert flow_orchestrator.__all__ == sorted(flow_orchestrator.__all__)
    assert set(flow_orchestrator.__all__) == {
        "Client",
        "CycleError",
        "DataKeyNotFound",
        "DataTypeError",
        "DuplicateNodeError",
        "EmptyWorkflowError",
        "ExecuteNodeInput",
        "FlowError",
        "Interceptor",
        "InvalidNameError",
        "InvalidPayload",
        "InvalidRunId",
        "KVWorkflowStore",
        "LoggingInterceptor",
        "MetricsInterceptor",
        "MalformedMessage",
        "MessageError",
        "NodeCall",
        "NodeContext",
        "NodeStatus",
        "NodeTimeout",
        "NonRetryableError",
        "PayloadTooLarge",
        "PayloadValidationInterceptor",
        "PermissionDenied",
        "PublishCall",
        "PublishInput",
        "RetryAfter",
        "RetryInterceptor",
        "RetryPolicy",
        "RunCancelled",
        "RunEvent",
        "RunFailed",
        "RunHandle",
        "RunNotFound",
        "RunSnapshot",
        "RunStatus",
        "StateConflict",
        "StorageSettings",
        "TimeoutInterceptor",
        "TracingInterceptor",
        "TriggerCall",
        "TriggerInput",
        "UnencodableValue",
        "UnknownDependencyError",
        "UnknownWorkflow",
        "Worker",
        "Workflow",
        "WorkflowBuilder",
        "WorkflowData",
        "WorkflowDefinition",
        "WorkflowDefinitionError",
        "WorkflowStore",
        "configure_telemetry",
    }


def test_cycle_is_reported_with_its_path() -> None:
    builder = (
        WorkflowBuilder("loop")
        .add_node("a", noop)
        .depends_on("c")
        .add_node("b", noop)
        .depends_on("a")
        .add_node("c", noop)
        .depends_on("b")
    )
    with pytest.raises(CycleError) as caught:
        builder.build()
    cycle = caught.value.cycle
    assert cycle[0] == cycle[-1]
    assert set(cycle) == {"a", "b", "c"}
    assert " -> ".join(cycle) in str(caught.value)


def test_self_dependency_is_a_cycle() -> None:
    with pytest.raises(CycleError, match="a -> a"):
        WorkflowBuilder("selfish").add_node("a", noop).depends_on("a").build()


def test_unknown_dependency_names_both_nodes() -> None:
    with pytest.raises(UnknownDependencyError, match=r"'b'.*'ghost'"):
        WorkflowBuilder("w").add_node("a", noop).add_node("b", noop).depends_on("ghost").build()


def test_duplicate_node_is_rejected_by_both_apis() -> None:
    with pytest.raises(DuplicateNodeError, match="'a'"):
        WorkflowBuilder("w").add_node("a", noop).add_node("a", noop).build()
    wf = Workflow("w")
    wf.node("a")(noop)
    with pytest.raises(DuplicateNodeError):
        wf.node("a")(noop)


def test_empty_workflow_is_rejected() -> None:
    with pytest.raises(EmptyWorkflowError):
        _ = Workflow("nothing").definition


@pytest.mark.parametrize("name", ["has.dot", "has space", "star*", "gt>", "", "x" * 65, "_private"])
def test_unsafe_names_are_rejected(name: str) -> None:
    with pytest.raises(InvalidNameError):
        WorkflowBuilder("w").add_node(name, noop).build()


def test_unsafe_workflow_name_is_rejected() -> None:
    with pytest.raises(InvalidNameError, match="subject-token safe"):
        Workflow("orders.v2")


def test_builder_and_decorator_build_the_same_definition() -> None:
    async def a(ctx: NodeContext) -> int:
        return 1

    def b(ctx: NodeContext) -> int:
        return 2

    policy = RetryPolicy(max_attempts=3)
    decorated = Workflow("same")
    decorated.node()(a)
    decorated.node(depends_on=[a], retry=policy, timeout=2.0)(b)
    built = (
        WorkflowBuilder("same")
        .add_node("a", a)
        .add_node("b", b, retry=policy, timeout=2.0)
        .depends_on("a")
        .build()
    )
    assert decorated.definition.describe() == built.definition.describe()
    assert decorated.definition.nodes == built.definition.nodes
    assert built.definition.nodes["b"].is_async is False
    assert built.definition.nodes["a"].is_async is True


def test_go_style_action_objects_are_accepted() -> None:
    class Charge:
        async def execute(self, ctx: NodeContext) -> dict[str, bool]:
            return {"ok": True}

    wf = WorkflowBuilder("go").add_node("charge", Charge()).build()
    assert wf.definition.nodes["charge"].is_async


def test_definition_is_frozen_once_built() -> None:
    wf = Workflow("frozen")
    wf.node("a")(noop)
    _ = wf.definition
    with pytest.raises(flow_orchestrator.WorkflowDefinitionError, match="already built"):
        wf.node("b")(noop)


@st.composite
def random_dags(draw: Any) -> dict[str, list[str]]:
    n = draw(st.integers(min_value=1, max_value=25))
    names = [f"n{i}" for i in range(n)]
    upstreams: dict[str, list[str]] = {}
    for i, name in enumerate(names):
        upstreams[name] = draw(st.lists(st.sampled_from(names[:i]), unique=True)) if i else []
    order = draw(st.permutations(names))
    return {name: upstreams[name] for name in order}


@given(random_dags())
@settings(max_examples=200, deadline=None)
def test_topological_order_respects_every_dependency(upstreams: dict[str, list[str]]) -> None:
    order = validate_graph("w", list(upstreams), upstreams)
    assert sorted(order) == sorted(upstreams)
    position = {name: i for i, name in enumerate(order)}
    for node, deps in upstreams.items():
        for dep in deps:
            assert position[dep] < position[node]


@given(random_dags(), st.data())
@settings(max_examples=200, deadline=None)
def test_any_back_edge_is_found_as_a_cycle(upstreams: dict[str, list[str]], data: Any) -> None:
    order = topological_order(upstreams)
    if len(order) < 2:
        return
    i = data.draw(st.integers(0, len(order) - 2))
    j = data.draw(st.integers(i + 1, len(order) - 1))
    # order[j] comes after order[i]; if order[j] reaches order[i] through deps, adding i->j closes a loop.
    broken = {k: list(v) for k, v in upstreams.items()}
    broken[order[i]].append(order[j])
    cycle = find_cycle(broken)
    reachable = _reaches(upstreams, order[j], order[i])
    assert (cycle is not None) == reachable
    if cycle is not None:
        assert cycle[0] == cycle[-1]
        for node, dep in itertools.pairwise(cycle):
            assert dep in broken[node]


def _reaches(upstreams: dict[str, list[str]], start: str, target: str) -> bool:
    stack, seen = [start], set()
    while stack:
        node = stack.pop()
        if node == target:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(upstreams[node])
    return False


def test_deep_chain_does_not_hit_recursion_limit() -> None:
    upstreams = {f"n{i}": [f"n{i - 1}"] if i else [] for i in range(5000)}
    assert len(validate_graph("deep", list(upstreams), upstreams)) == 5000


@given(
    max_attempts=st.integers(1, 10),
    initial=st.floats(0, 10),
    backoff=st.floats(1, 4),
    max_delay=st.floats(0, 100),
    jitter=st.floats(0, 1),
    attempt=st.integers(1, 200),
    seed=st.integers(0, 2**32),
)
def test_backoff_is_exponential_capped_and_jitter_bounded(
    *,
    max_attempts: int,
    initial: float,
    backoff: float,
    max_delay: float,
    jitter: float,
    attempt: int,
    seed: int,
) -> None:
    policy = RetryPolicy(
        max_attempts=max_attempts, initial=initial, backoff=backoff, max_delay=max_delay, jitter=jitter
    )
    base = policy.base_delay(attempt)
    assert base == pytest.approx(min(initial * backoff ** (attempt - 1), max_delay)) or base == max_delay
    delay = policy.delay(attempt, random.Random(seed))
    assert 0 <= delay <= max_delay
    assert abs(delay - base) <= base * jitter + 1e-9
    assert policy.allows_another(attempt) == (attempt < max_attempts)


def test_backoff_sequence_doubles() -> None:
    policy = RetryPolicy(max_attempts=5, initial=0.2, backoff=2.0, max_delay=1.0, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.2, 0.4, 0.8, 1.0, 1.0]


@pytest.mark.parametrize("kwargs", [{"max_attempts": 0}, {"backoff": 0.5}, {"jitter": 2.0}, {"initial": -1}])
def test_invalid_policies_are_rejected(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)


def test_codec_round_trip_and_trigger_formats() -> None:
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": b"bytes"}}
    assert decode(encode(value)) == value
    assert decode_trigger(b'{"a": 1}', {"Content-Type": "application/json"}) == {"a": 1}
    assert decode_trigger(encode({"a": 1}), {}) == {"a": 1}
    assert decode_trigger(b"", None) is None
    with pytest.raises(MalformedMessage):
        decode_trigger(b"{nope", {"Content-Type": "application/json; charset=utf-8"})
    with pytest.raises(MalformedMessage):
        decode(b"\xc1")
    json_type = {"Content-Type": "application/json"}
    with pytest.raises(MalformedMessage):  # valid JSON that Python's parser cannot take
        decode_trigger(b"[" * 100_000 + b"]" * 100_000, json_type)
    with pytest.raises(MalformedMessage):
        decode_trigger(b"1" * 5_000, json_type)
    with pytest.raises(MalformedMessage, match="expected a map"):
        decode_event(encode(42), "p.evt.wf.r._run.started")
    assert decode_event(b"", "p.evt.wf.r.a.completed", empty_ok=True) == {}
    with pytest.raises(PayloadTooLarge, match="above the 10-byte limit"):
        decode_trigger(b"x" * 11, None, max_size=10)
    with pytest.raises(TypeError, match="cannot encode"):
        encode({"x": object()})


@pytest.mark.parametrize(
    "option",
    [
        {"concurrency": 0},
        {"max_in_flight": -1},
        {"max_deliver": 0},  # JetStream's "unlimited": a message must not be redelivered forever
        {"ack_wait": 0},
        {"ack_wait": float("nan")},
        {"announce_starts_after": -1},
        {"announce_starts_after": float("inf")},  # a timer that never fires (and uvloop cannot arm)
    ],
)
def test_worker_options_out_of_range_are_refused_when_it_is_made(option: dict[str, float]) -> None:
    wf = Workflow("bounded")
    wf.node()(noop)
    with pytest.raises(ValueError, match=next(iter(option))):
        Worker(wf, **option)  # type: ignore[arg-type]
