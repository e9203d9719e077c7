"""The pure status rules (design invariant 6): worked examples, then properties over random DAGs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flow_orchestrator.runtime._status import (
    ALLOWED_TRANSITIONS,
    TERMINAL_NODE_STATUSES,
    GraphShape,
    InvalidTransition,
    NodeStatus,
    RunStatus,
    can_transition,
    check_transition,
    derive_node_statuses,
    derive_run_status,
    is_terminal,
)

S = NodeStatus
NON_TERMINAL = frozenset(NodeStatus) - TERMINAL_NODE_STATUSES


def shape_of(
    upstreams: Mapping[str, tuple[str, ...]], continue_on_error: frozenset[str] = frozenset()
) -> GraphShape:
    """A shape whose order is the mapping's insertion order."""
    return GraphShape(order=tuple(upstreams), upstreams=dict(upstreams), continue_on_error=continue_on_error)


# a -> b -> c -> d is the main chain; a -> e -> f is a branch beside it.
CHAIN_WITH_BRANCH = {"a": (), "b": ("a",), "c": ("b",), "d": ("c",), "e": ("a",), "f": ("e",)}
DIAMOND = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}


# --- Examples ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_status", [RunStatus.RUNNING, RunStatus.FAILED])
def test_failure_skips_its_downstream_and_leaves_the_unreached_branch_pending(run_status: RunStatus) -> None:
    shape = shape_of(CHAIN_WITH_BRANCH)
    derived = derive_node_statuses(shape, {"a": S.COMPLETED, "b": S.FAILED}, run_status)

    assert derived == {
        "a": S.COMPLETED,
        "b": S.FAILED,
        "c": S.SKIPPED,
        "d": S.SKIPPED,
        "e": S.PENDING,
        "f": S.PENDING,
    }
    assert derive_run_status(shape, derived) is RunStatus.FAILED


def test_failure_fails_the_run_while_other_nodes_still_run() -> None:
    shape = shape_of(CHAIN_WITH_BRANCH)
    derived = derive_node_statuses(
        shape, {"a": S.COMPLETED, "b": S.FAILED, "e": S.RUNNING}, RunStatus.RUNNING
    )

    assert derived["e"] is S.RUNNING
    assert derive_run_status(shape, derived) is RunStatus.FAILED


def test_continue_on_error_failure_lets_downstream_run() -> None:
    shape = shape_of(CHAIN_WITH_BRANCH, continue_on_error=frozenset({"b"}))

    not_started = derive_node_statuses(shape, {"a": S.COMPLETED, "b": S.FAILED}, RunStatus.RUNNING)
    assert not_started["c"] is S.PENDING
    assert not_started["d"] is S.PENDING
    assert derive_run_status(shape, not_started) is None

    recorded = {"a": S.COMPLETED, "b": S.FAILED, "c": S.RUNNING}
    assert derive_node_statuses(shape, recorded, RunStatus.RUNNING)["c"] is S.RUNNING

    done = dict.fromkeys(CHAIN_WITH_BRANCH, S.COMPLETED) | {"b": S.FAILED}
    assert (
        derive_run_status(shape, derive_node_statuses(shape, done, RunStatus.RUNNING)) is RunStatus.COMPLETED
    )


@pytest.mark.parametrize("taken", [S.COMPLETED, S.COMPENSATED])
def test_a_taken_branch_wins_the_diamond(taken: NodeStatus) -> None:
    shape = shape_of(DIAMOND)
    derived = derive_node_statuses(shape, {"a": S.COMPLETED, "b": S.BYPASSED, "c": taken}, RunStatus.RUNNING)

    assert derived["d"] is S.PENDING


def test_a_continue_on_error_failure_is_a_taken_branch_too() -> None:
    shape = shape_of(DIAMOND, continue_on_error=frozenset({"c"}))
    derived = derive_node_statuses(
        shape, {"a": S.COMPLETED, "b": S.BYPASSED, "c": S.FAILED}, RunStatus.RUNNING
    )

    assert derived["d"] is S.PENDING


def test_a_node_blocked_only_by_not_taken_branches_is_bypassed_and_so_is_its_downstream() -> None:
    shape = shape_of(DIAMOND | {"e": ("d",)})
    derived = derive_node_statuses(
        shape, {"a": S.COMPLETED, "b": S.BYPASSED, "c": S.BYPASSED}, RunStatus.RUNNING
    )

    assert derived["d"] is S.BYPASSED
    assert derived["e"] is S.BYPASSED
    assert derive_run_status(shape, derived) is RunStatus.COMPLETED


def test_a_skipped_upstream_beats_a_bypassed_one() -> None:
    shape = shape_of({"a": (), "b": ("a",), "c": ("a",), "x": (), "d": ("b", "c", "x")})
    recorded = {"a": S.COMPLETED, "b": S.BYPASSED, "c": S.BYPASSED, "x": S.FAILED}

    assert derive_node_statuses(shape, recorded, RunStatus.RUNNING)["d"] is S.SKIPPED


def test_a_bypassed_upstream_next_to_an_unfinished_one_leaves_the_node_pending() -> None:
    shape = shape_of(DIAMOND)
    derived = derive_node_statuses(
        shape, {"a": S.COMPLETED, "b": S.BYPASSED, "c": S.RUNNING}, RunStatus.RUNNING
    )

    assert derived["d"] is S.PENDING


@pytest.mark.parametrize("blocking", [S.CANCELLED, S.COMPENSATION_FAILED, S.SKIPPED])
def test_other_blocking_statuses_skip_downstream_even_with_continue_on_error(blocking: NodeStatus) -> None:
    shape = shape_of({"a": (), "b": ("a",)}, continue_on_error=frozenset({"a"}))

    assert derive_node_statuses(shape, {"a": blocking}, RunStatus.RUNNING)["b"] is S.SKIPPED


def test_a_cancelled_run_cancels_every_unfinished_node_and_keeps_finished_ones() -> None:
    shape = shape_of(CHAIN_WITH_BRANCH)
    recorded = {"a": S.COMPLETED, "b": S.RUNNING, "e": S.WAITING, "f": S.PENDING}
    derived = derive_node_statuses(shape, recorded, RunStatus.CANCELLED)

    assert derived == {
        "a": S.COMPLETED,
        "b": S.CANCELLED,
        "c": S.CANCELLED,
        "d": S.CANCELLED,
        "e": S.CANCELLED,
        "f": S.CANCELLED,
    }
    assert derive_run_status(shape, derived) is RunStatus.CANCELLED


def test_a_cancelled_run_keeps_failures_and_their_skipped_downstream() -> None:
    shape = shape_of(CHAIN_WITH_BRANCH)
    recorded = {"a": S.COMPLETED, "b": S.FAILED, "c": S.SKIPPED, "e": S.RUNNING}
    derived = derive_node_statuses(shape, recorded, RunStatus.CANCELLED)

    assert derived["b"] is S.FAILED
    assert derived["c"] is S.SKIPPED
    assert derived["d"] is S.CANCELLED
    assert derived["e"] is S.CANCELLED


def test_waiting_is_kept_and_keeps_the_run_in_progress() -> None:
    shape = shape_of({"approve": (), "ship": ("approve",)})
    derived = derive_node_statuses(shape, {"approve": S.WAITING}, RunStatus.RUNNING)

    assert derived == {"approve": S.WAITING, "ship": S.PENDING}
    assert not is_terminal(S.WAITING)
    assert derive_run_status(shape, derived) is None


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ({"a": S.COMPLETED, "b": S.COMPLETED}, RunStatus.COMPLETED),
        ({"a": S.COMPLETED, "b": S.COMPENSATED}, RunStatus.COMPLETED),
        ({"a": S.COMPLETED, "b": S.COMPENSATION_FAILED}, RunStatus.FAILED),
        ({"a": S.COMPLETED}, None),
        ({"a": S.RUNNING, "b": S.PENDING}, None),
        ({"a": S.COMPLETED, "b": S.SKIPPED}, RunStatus.FAILED),
        ({"a": S.CANCELLED, "b": S.SKIPPED}, RunStatus.CANCELLED),
    ],
)
def test_run_status_examples(statuses: dict[str, NodeStatus], expected: RunStatus | None) -> None:
    shape = shape_of({"a": (), "b": ("a",)})

    assert derive_run_status(shape, statuses) is expected


def test_an_empty_graph_is_complete() -> None:
    shape = shape_of({})

    assert derive_node_statuses(shape, {}, RunStatus.RUNNING) == {}
    assert derive_run_status(shape, {}) is RunStatus.COMPLETED


def test_shape_rejects_an_order_that_is_not_topological() -> None:
    with pytest.raises(ValueError, match=r"'b'.*'c'.*topological"):
        GraphShape(order=("a", "b", "c"), upstreams={"b": ("c",)}, continue_on_error=frozenset())


def test_shape_rejects_a_node_named_twice() -> None:
    with pytest.raises(ValueError, match="twice"):
        GraphShape(order=("a", "a"), upstreams={}, continue_on_error=frozenset())


# --- Transitions ------------------------------------------------------------------------------------

EXPECTED_TRANSITIONS = {
    S.PENDING: {S.RUNNING, S.WAITING, S.SKIPPED, S.BYPASSED, S.CANCELLED},
    S.RUNNING: {S.COMPLETED, S.FAILED, S.RETRYING, S.WAITING, S.CANCELLED, S.RUNNING},
    S.RETRYING: {S.RUNNING, S.FAILED, S.CANCELLED},
    S.WAITING: {S.RUNNING, S.COMPLETED, S.FAILED, S.CANCELLED},
    S.COMPLETED: {S.COMPENSATED, S.COMPENSATION_FAILED},
}


def test_transition_table_is_pinned() -> None:
    assert set(ALLOWED_TRANSITIONS) == set(NodeStatus)
    for current in NodeStatus:
        assert ALLOWED_TRANSITIONS[current] == EXPECTED_TRANSITIONS.get(current, set()), current
    assert is_terminal(S.COMPLETED)
    assert {S.PENDING, S.RUNNING, S.RETRYING, S.WAITING} == NON_TERMINAL


def test_transition_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        ALLOWED_TRANSITIONS[S.FAILED] = frozenset({S.RUNNING})  # type: ignore[index]


@pytest.mark.parametrize("final", sorted(TERMINAL_NODE_STATUSES - {S.COMPLETED}))
def test_terminal_statuses_other_than_completed_have_no_way_out(final: NodeStatus) -> None:
    assert not any(can_transition(final, new) for new in NodeStatus)


@pytest.mark.parametrize("compensation", [S.COMPENSATED, S.COMPENSATION_FAILED])
def test_compensation_comes_only_from_completed(compensation: NodeStatus) -> None:
    assert {current for current in NodeStatus if can_transition(current, compensation)} == {S.COMPLETED}
    with pytest.raises(InvalidTransition):
        check_transition(S.FAILED, compensation, node="charge")


def test_check_transition_accepts_allowed_moves() -> None:
    check_transition(S.PENDING, S.RUNNING, node="charge")
    check_transition(S.RUNNING, S.RUNNING, node="charge")
    check_transition(S.COMPLETED, S.COMPENSATED, node="charge")


def test_invalid_transition_names_the_node_and_both_statuses() -> None:
    with pytest.raises(InvalidTransition) as caught:
        check_transition(S.COMPLETED, S.RUNNING, node="charge-card")

    error = caught.value
    assert isinstance(error, ValueError)
    assert (error.node, error.current, error.new) == ("charge-card", S.COMPLETED, S.RUNNING)
    message = str(error)
    assert "'charge-card'" in message
    assert "from completed to running" in message


# --- Properties over random DAGs ---------------------------------------------------------------------


@st.composite
def shapes(draw: st.DrawFn) -> GraphShape:
    """A DAG on n0..n{k-1}; edges only go from a lower to a higher index, so it is acyclic."""
    count = draw(st.integers(min_value=1, max_value=12))
    nodes = tuple(f"n{index}" for index in range(count))
    upstreams = {
        node: tuple(nodes[up] for up in sorted(draw(st.sets(st.integers(0, index - 1))))) if index else ()
        for index, node in enumerate(nodes)
    }
    continue_on_error = frozenset(draw(st.sets(st.sampled_from(nodes))))
    return GraphShape(order=nodes, upstreams=upstreams, continue_on_error=continue_on_error)


@st.composite
def arbitrary_records(draw: st.DrawFn) -> tuple[GraphShape, dict[str, NodeStatus]]:
    """Any status recorded for any subset of nodes, consistent or not: the rules must stay total."""
    shape = draw(shapes())
    recorded = draw(st.dictionaries(st.sampled_from(shape.order), st.sampled_from(NodeStatus)))
    return shape, recorded


@dataclass(frozen=True)
class Execution:
    shape: GraphShape
    recorded: dict[str, NodeStatus]
    truth: dict[str, NodeStatus]
    """What each node really is, including the statuses nobody recorded."""
    finished: bool


def _blocks(shape: GraphShape, node: str, status: NodeStatus) -> bool:
    if status is S.FAILED:
        return node not in shape.continue_on_error
    return status in {S.SKIPPED, S.CANCELLED, S.COMPENSATION_FAILED}


@st.composite
def executions(draw: st.DrawFn) -> Execution:
    """Play a run in topological order the way an engine would, recording only some statuses.

    A node starts only once its upstreams are resolved; a blocked node may or may not have had its
    Skipped/Bypassed written down. In a finished run every startable node ran to an end.
    """
    shape = draw(shapes())
    finished = draw(st.booleans())
    outcomes = [S.COMPLETED, S.FAILED, S.BYPASSED]
    if not finished:
        outcomes += [S.PENDING, S.RUNNING, S.RETRYING, S.WAITING]
    recorded: dict[str, NodeStatus] = {}
    truth: dict[str, NodeStatus] = {}
    for node in shape.order:
        ups = [(up, truth[up]) for up in shape.upstreams[node]]
        if any(_blocks(shape, up, status) for up, status in ups):
            truth[node] = S.SKIPPED
        elif ups and all(status is S.BYPASSED for _, status in ups):
            truth[node] = S.BYPASSED
        elif all(status in {S.COMPLETED, S.FAILED, S.BYPASSED} for _, status in ups):
            reached = draw(st.booleans()) or finished
            truth[node] = draw(st.sampled_from(outcomes)) if reached else S.PENDING
            if reached:
                recorded[node] = truth[node]
            continue
        else:
            truth[node] = S.PENDING
            continue
        if draw(st.booleans()):
            recorded[node] = truth[node]
    return Execution(shape, recorded, truth, finished)


run_statuses = st.sampled_from(RunStatus)


def _ancestors(shape: GraphShape, node: str) -> set[str]:
    found: set[str] = set()
    stack = list(shape.upstreams.get(node, ()))
    while stack:
        up = stack.pop()
        if up not in found:
            found.add(up)
            stack.extend(shape.upstreams.get(up, ()))
    return found


@given(arbitrary_records(), run_statuses)
def test_derivation_is_total(case: tuple[GraphShape, dict[str, NodeStatus]], run_status: RunStatus) -> None:
    shape, recorded = case
    derived = derive_node_statuses(shape, recorded, run_status)

    assert list(derived) == list(shape.order)
    assert all(isinstance(status, NodeStatus) for status in derived.values())


@given(arbitrary_records(), run_statuses)
def test_recorded_terminal_status_is_preserved(
    case: tuple[GraphShape, dict[str, NodeStatus]], run_status: RunStatus
) -> None:
    shape, recorded = case
    derived = derive_node_statuses(shape, recorded, run_status)

    for node, status in recorded.items():
        if is_terminal(status):
            assert derived[node] is status


@given(arbitrary_records(), run_statuses)
def test_derivation_is_idempotent(
    case: tuple[GraphShape, dict[str, NodeStatus]], run_status: RunStatus
) -> None:
    shape, recorded = case
    derived = derive_node_statuses(shape, recorded, run_status)

    assert derive_node_statuses(shape, derived, run_status) == derived


@given(arbitrary_records())
def test_a_cancelled_run_has_no_unfinished_node(case: tuple[GraphShape, dict[str, NodeStatus]]) -> None:
    shape, recorded = case
    derived = derive_node_statuses(shape, recorded, RunStatus.CANCELLED)

    for node, status in derived.items():
        assert is_terminal(status)
        was = recorded.get(node)
        assert status is (was if was is not None and is_terminal(was) else S.CANCELLED)


@given(arbitrary_records(), run_statuses)
def test_a_node_is_skipped_only_because_of_a_blocking_record_at_or_above_it(
    case: tuple[GraphShape, dict[str, NodeStatus]], run_status: RunStatus
) -> None:
    shape, recorded = case
    derived = derive_node_statuses(shape, recorded, run_status)

    for node, status in derived.items():
        if status is S.SKIPPED:
            causes = _ancestors(shape, node) | {node}
            assert any(_blocks(shape, cause, recorded[cause]) for cause in causes if cause in recorded), node


@given(arbitrary_records(), st.sampled_from([RunStatus.RUNNING, RunStatus.FAILED, RunStatus.COMPLETED]))
def test_a_node_is_pending_exactly_when_unreached_and_unblocked(
    case: tuple[GraphShape, dict[str, NodeStatus]], run_status: RunStatus
) -> None:
    shape, recorded = case
    derived = derive_node_statuses(shape, recorded, run_status)

    for node in shape.order:
        ups = [(up, derived[up]) for up in shape.upstreams[node]]
        unreached = recorded.get(node, S.PENDING) is S.PENDING
        blocked = any(_blocks(shape, up, status) for up, status in ups)
        bypassed = bool(ups) and all(status is S.BYPASSED for _, status in ups)
        assert (derived[node] is S.PENDING) == (unreached and not blocked and not bypassed), node


@given(arbitrary_records(), run_statuses)
def test_run_status_follows_the_node_statuses(
    case: tuple[GraphShape, dict[str, NodeStatus]], run_status: RunStatus
) -> None:
    shape, recorded = case
    derived = derive_node_statuses(shape, recorded, run_status)
    result = derive_run_status(shape, derived)

    failed = any(
        status is S.COMPENSATION_FAILED or (status is S.FAILED and node not in shape.continue_on_error)
        for node, status in derived.items()
    )
    all_terminal = all(is_terminal(status) for status in derived.values())
    unsuccessful = failed or any(status in {S.SKIPPED, S.CANCELLED} for status in derived.values())
    assert (result is RunStatus.COMPLETED) == (all_terminal and not unsuccessful)
    assert (result is None) == (not all_terminal and not failed)
    if failed:
        assert result is RunStatus.FAILED


@given(executions())
def test_consistent_execution_is_recovered_from_its_records(execution: Execution) -> None:
    derived = derive_node_statuses(execution.shape, execution.recorded, RunStatus.RUNNING)

    assert derived == execution.truth


@given(executions(), run_statuses)
def test_derived_statuses_are_reachable_from_the_recorded_ones(
    execution: Execution, run_status: RunStatus
) -> None:
    derived = derive_node_statuses(execution.shape, execution.recorded, run_status)

    for node, status in derived.items():
        was = execution.recorded.get(node, S.PENDING)
        assert status is was or can_transition(was, status), (node, was, status)


@given(executions())
def test_skipped_nodes_in_a_consistent_execution_descend_from_a_blocking_failure(
    execution: Execution,
) -> None:
    shape = execution.shape
    derived = derive_node_statuses(shape, execution.recorded, RunStatus.RUNNING)

    for node, status in derived.items():
        if status is S.SKIPPED:
            assert any(
                derived[up] is S.FAILED and up not in shape.continue_on_error
                for up in _ancestors(shape, node)
            ), node


@given(executions())
def test_a_finished_execution_is_fully_terminal_and_decided(execution: Execution) -> None:
    shape = execution.shape
    derived = derive_node_statuses(shape, execution.recorded, RunStatus.RUNNING)
    blocking_failure = any(
        status is S.FAILED and node not in shape.continue_on_error for node, status in derived.items()
    )

    if execution.finished:
        assert all(is_terminal(status) for status in derived.values())
        expected = RunStatus.FAILED if blocking_failure else RunStatus.COMPLETED
        assert derive_run_status(shape, derived) is expected
    elif not blocking_failure and not all(is_terminal(status) for status in derived.values()):
        assert derive_run_status(shape, derived) is None
