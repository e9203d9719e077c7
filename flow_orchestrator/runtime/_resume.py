"""Re-running a failed run from where it failed (``flowctl retry RUN_ID``).

Completed nodes keep their outputs and the run keeps its data. Each failed node gets a new attempt,
and so does every node that was ready (all upstreams resolved) but never started because fail-fast
stopped the run (workers start nothing for a closed run, so those must be issued again), and every
node waiting for a scheduled retry (it may have come due, and been dropped, while the run was
failed). Joins still record arrivals while a run is failed, so a join also waiting on a failed node
counts the upstreams that completed after the failure.

The steps, in this order:

1. A recent failure is given ``settle`` seconds: by then every attempt that was running when the
   run failed has said so in the journal (workers announce an attempt after 0.1 s) or ended.
2. The run record goes back to running by compare-and-set, with one more entry in ``resumed``: the
   run's *epoch*. A run is resumed once even if two people ask.
3. A ``resumed`` event tells workers the new epoch; half a second later (an attempt a worker
   started just before hearing of it has announced itself) the journal is read: after the record
   changed, so nothing it misses was dropped as closed.
4. The attempts chosen are noted in the entry, a ``retry`` message per node follows, marked with
   the epoch, and the entry is marked done.

Messages from before the retry may still be on their way (an upstream's completion, a scheduled
retry, a redelivery) and would start a node the retry also reissued. So after a retry, whichever of
them and the reissue comes first *claims* the node for the epoch (a create-only key,
``claim.<run>.<node>.<epoch>``); the others start nothing. Messages issued from the retry on carry
its epoch (``Flow-Epoch``) and need no claim, except below a node that a message from before the
retry won: the retry may have read the journal after that node completed and issued the nodes below
it, so those messages carry ``Flow-Claimed`` and claim too. Workers know a run's epoch from the
``resumed`` event (and read past ones at start and after reconnecting), from its record when they
saw it fail, and ask the record for every retry message, and for a redelivery when they know of no
retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from flow_orchestrator._errors import FlowError, StateConflict
from flow_orchestrator.actors._system import end_event, epoch_of_record
from flow_orchestrator.bus._codec import encode
from flow_orchestrator.bus._kv import StateStore, Versioned
from flow_orchestrator.bus._propagation import EPOCH_HEADER
from flow_orchestrator.bus._subjects import Names
from flow_orchestrator.runtime._journal import NodeView, fold_events
from flow_orchestrator.runtime._status import GraphShape, NodeStatus, RunStatus

# Seconds a run must have been failed before it is retried: more than the 0.1 s after which workers
# announce an attempt, so an attempt that was running is seen as running and not issued again.
SETTLE = 1.0
CLOCK_SKEW = 5.0  # seconds the client's and the workers' clocks may disagree by
# A retry message whose upstream outputs would make it larger than this leaves them to the journal.
OUTPUTS_INLINE_BYTES = 256 * 1024
# Seconds between announcing a retry and reading the journal: more than the 0.1 s after which
# workers announce an attempt.
ANNOUNCED_WITHIN = 0.5
# An unfinished retry younger than this is taken to be under way, not stopped halfway.
IN_PROGRESS = 30.0


def _check_failed(run_id: str, current: Versioned | None) -> dict[str, Any]:
    if current is None or current.value.get("status") != RunStatus.FAILED.value:
        status = current.value.get("status") if current else "missing"
        raise RunNotRetryable(f"run {run_id!r} is {status}; only a failed run can be retried")
    return dict(current.value)


async def _refuse_unstorable(store: StateStore, run_id: str) -> None:
    """Refuse a run one of whose sinks' results did not fit its record: no retry could complete it
    (the sink, completed, never runs again)."""
    found = await store.get(Names.unstorable_key(run_id))
    if found is not None and isinstance(found.value, dict):
        raise RunNotRetryable(
            f"run {run_id!r} cannot complete, so it is not retried: the result of its node "
            f"{found.value.get('node')!r} does not fit its record ({found.value.get('message')})"
        )


async def _failed_record(store: StateStore, run_id: str) -> dict[str, Any]:
    return _check_failed(run_id, await store.get(Names.run_key(run_id)))


class RunNotRetryable(FlowError, ValueError):
    """Only a failed run can be retried."""


def nodes_to_resume(shape: GraphShape, views: dict[str, NodeView]) -> list[str]:
    """Failed nodes (not continue-on-error), nodes waiting for a retry, and never-started nodes
    whose upstreams all resolved."""
    resolved = {
        name
        for name, view in views.items()
        if view.status is NodeStatus.COMPLETED
        or (view.status is NodeStatus.FAILED and name in shape.continue_on_error)
    }

    def failed(name: str, view: NodeView | None) -> bool:
        if view is None:
            return False
        if view.status is NodeStatus.RETRYING:
            return True
        if view.status is NodeStatus.RUNNING:  # its last attempt was lost with its worker
            return view.attempts in view.lost
        return view.status is NodeStatus.FAILED and name not in shape.continue_on_error

    def ready_but_never_started(name: str, view: NodeView | None) -> bool:
        never_started = view is None or view.status is None
        return never_started and all(up in resolved for up in shape.upstreams[name])

    return [n for n in shape.order if failed(n, views.get(n)) or ready_but_never_started(n, views.get(n))]


async def resume_failed_run(
    store: StateStore,
    js: Any,
    names: Names,
    run_id: str,
    *,
    shape: GraphShape,
    read_journal: Callable[[], Awaitable[list[dict[str, Any]]]],
    settle: float = SETTLE,
) -> list[str]:
    """Reopen the run record and publish a new attempt for each node to resume; return their names.
    See the module docstring for the order of the steps and why. A retry that stopped halfway (its
    journal read or a publish failed, or it was interrupted) left the run running with its entry
    unfinished: asking again finishes it, under the same epoch."""
    key = Names.run_key(run_id)
    current = await store.get(key)
    unfinished = _unfinished_retry(current)
    if unfinished is not None and not _interrupted(current) and _retry_age(current) < IN_PROGRESS:
        raise RunNotRetryable(
            f"a retry of run {run_id!r} is under way (it began {_retry_age(current):.0f} s ago); "
            "if it does not finish, retry again in a moment"
        )
    if unfinished is not None:
        assert current is not None  # _unfinished_retry saw it
        record, epoch = dict(current.value), unfinished
    else:
        record, epoch = await _reopen(store, run_id, settle)
    try:
        chosen = await _issue(store, js, names, run_id, record, epoch, shape, read_journal)
    except RunNotRetryable:
        raise  # the run changed under the retry, or has nothing to run again
    except Exception as exc:  # (a cancelled one leaves the same state: retrying again finishes it)
        with contextlib.suppress(Exception):  # say so, so that retrying again need not wait
            await store.mutate(key, _retry_entry(run_id, epoch, lambda last: {**last, "interrupted": True}))
        raise RetryInterrupted(
            f"the retry of run {run_id!r} stopped before it issued every node ({exc!r}); "
            f"retry it again to finish (`flowctl retry {run_id}`)"
        ) from exc
    return chosen


Change = Callable[[dict[str, Any] | None], dict[str, Any] | None]


def _last_retry(record: dict[str, Any] | None) -> dict[str, Any]:
    """The run's latest ``resumed`` entry ({} if none)."""
    resumed = (record or {}).get("resumed") or [{}]
    last = resumed[-1]
    return last if isinstance(last, dict) else {}


def _retry_entry(run_id: str, epoch: int, update: Callable[[dict[str, Any]], dict[str, Any]]) -> Change:
    """A record change applying ``update`` to the ``epoch``-th retry's entry while the run runs (no
    change if a later retry came; :class:`RunNotRetryable` if it was cancelled or failed meanwhile)."""

    def change(current: dict[str, Any] | None) -> dict[str, Any] | None:
        if current is None or _last_retry(current).get("epoch") != epoch:
            return None
        if current.get("status") != RunStatus.RUNNING.value:
            raise RunNotRetryable(f"run {run_id!r} is {current.get('status')} again; its retry stopped")
        resumed = list(current["resumed"])
        resumed[-1] = update(resumed[-1])
        return {**current, "resumed": resumed}

    return change


def _interrupted(current: Versioned | None) -> bool:
    return bool(_last_retry(current.value if current else None).get("interrupted"))


def _retry_age(current: Versioned | None) -> float:
    return time.time() - float(_last_retry(current.value if current else None).get("at") or 0)


class RetryInterrupted(RunNotRetryable):
    """A retry reopened the run but stopped before issuing every node: retrying again finishes it."""


def _unfinished_retry(current: Versioned | None) -> int | None:
    """The epoch of a retry that reopened this run and did not finish issuing, if any."""
    if current is None or current.value.get("status") != RunStatus.RUNNING.value:
        return None
    last = _last_retry(current.value)
    # Only an entry that says it is not done: one from before entries said so counts as finished.
    if last.get("done") is not False or "epoch" not in last:
        return None
    return int(last["epoch"])


async def _reopen(store: StateStore, run_id: str, settle: float) -> tuple[dict[str, Any], int]:
    """Wait for a recent failure to settle, then set the failed run running again, one epoch on."""
    key = Names.run_key(run_id)
    record = await _failed_record(store, run_id)
    await _refuse_unstorable(store, run_id)
    failed_at = record.get("finished_at")
    # The failure time is a worker's clock, now is ours: a recent failure (allowing for some skew
    # between the two) waits the whole ``settle``.
    if isinstance(failed_at, int | float) and time.time() - failed_at < settle + CLOCK_SKEW:
        await asyncio.sleep(settle)
    current = await store.get(key)  # again: the record may have changed meanwhile (a sink's result)
    record = _check_failed(run_id, current)
    # Again too. A mark written after this read comes before the failure the supervisor then writes:
    # that write changes the record (the update below fails), or fails the run this reopens.
    await _refuse_unstorable(store, run_id)
    epoch = epoch_of_record(record) + 1
    reopened = {
        **record,
        "status": RunStatus.RUNNING.value,
        "error": None,
        "finished_at": None,
        "resumed": [
            *record.get("resumed", []),
            {"at": time.time(), "after": record.get("error"), "epoch": epoch, "done": False},
        ],
    }
    assert current is not None  # _check_failed saw it
    try:
        await store.update(key, reopened, current.revision)
    except StateConflict as exc:
        raise RunNotRetryable(f"run {run_id!r} changed while retrying it; look at it again") from exc
    return reopened, epoch


async def _issue(  # noqa: PLR0917 (one call site, each argument named there)
    store: StateStore,
    js: Any,
    names: Names,
    run_id: str,
    record: dict[str, Any],
    epoch: int,
    shape: GraphShape,
    read_journal: Callable[[], Awaitable[list[dict[str, Any]]]],
) -> list[str]:
    """Read the journal, note and publish the attempts of the ``epoch``-th retry, mark it done.

    Finishing a retry that noted its attempts already publishes exactly those again (some may have
    gone out, and their nodes moved on since: choosing anew could issue a node that a message of
    this epoch, which claims nothing, starts too). Repeats are dropped by their message ids, or
    lose the node's claim to the first."""
    key = Names.run_key(run_id)
    workflow = record["workflow"]
    trace = {**dict(record.get("trace") or {}), EPOCH_HEADER: str(epoch)}
    # Tell workers of the epoch first: from then on a message from before the retry claims what it
    # starts. One a worker started just before hearing of it (a worker started after the failure
    # knows nothing of the run) has announced itself by the time the journal is read.
    await js.publish(
        names.run_event(workflow, run_id, "resumed"),
        encode({"epoch": epoch}),
        headers={**trace, "Nats-Msg-Id": f"{run_id}.run.resumed.{epoch}"},
    )
    await asyncio.sleep(ANNOUNCED_WITHIN)
    views = fold_events(await read_journal())
    outputs = {name: view.output for name, view in views.items() if view.status is NodeStatus.COMPLETED}
    last = _last_retry(record)
    noted = last.get("attempts") if last.get("epoch") == epoch else None
    if isinstance(noted, dict):
        attempts = {str(node): int(attempt) for node, attempt in noted.items()}
    else:
        chosen = nodes_to_resume(shape, views)
        attempts = {node: (views[node].attempts if node in views else 0) + 1 for node in chosen}
    chosen = list(attempts)  # (empty: nothing to run again)

    if not chosen:
        failed = await _fail_again(store, run_id, record, epoch)
        await _announce_failed_again(js, names, run_id, workflow, failed, trace)
        raise RunNotRetryable(
            f"run {run_id!r} has no node to run again (its nodes completed): it failed because "
            f"{last.get('after') or 'of an error after its nodes'}"
        )
    # The retry's entry names the attempts it issues: a failure reported by an older attempt of one
    # of them, which the supervisor may take late, must not fail the run again.
    if not isinstance(noted, dict):
        # Noted once: another retry finishing this one must not overwrite what went out, and what
        # is noted is what goes out.
        chosen_now = attempts

        def noted_once(entry: dict[str, Any]) -> dict[str, Any]:
            return {**entry, "attempts": entry.get("attempts") or chosen_now}

        written, _ = await store.mutate(key, _retry_entry(run_id, epoch, noted_once))
        in_record = _last_retry(written).get("attempts") or chosen_now
        attempts = {str(node): int(attempt) for node, attempt in in_record.items()}
    for node, attempt in attempts.items():
        body: dict[str, Any] = {
            "attempt": attempt,
            "input": record.get("input"),
            "outputs": {up: outputs.get(up) for up in shape.upstreams[node]},
            "resume": epoch,
        }
        if len(encode(body)) > OUTPUTS_INLINE_BYTES:  # the worker reads them from the journal
            body.update(outputs=None, outputs_in_journal=True)
        await js.publish(
            names.event(workflow, run_id, node, "retry"),
            encode(body),
            headers={**trace, "Nats-Msg-Id": f"{run_id}.{node}.{attempt}.resume.{epoch}"},
        )
    await store.mutate(key, _retry_entry(run_id, epoch, lambda entry: {**entry, "done": True}))
    return list(attempts)


async def _fail_again(store: StateStore, run_id: str, record: dict[str, Any], epoch: int) -> dict[str, Any]:
    """Put back the failure a retry with nothing to run reopened, marking the retry done in the same
    write (two writes left the run running for good when the second failed: a done retry is not
    finished again, and a running run is not retried). The record so failed."""
    after = _last_retry(record).get("after")

    def fail(current: dict[str, Any] | None) -> dict[str, Any] | None:
        if current is None or current.get("status") != RunStatus.RUNNING.value:
            status = current.get("status") if current else "missing"
            raise RunNotRetryable(f"run {run_id!r} is {status} again; its retry stopped")
        if epoch_of_record(current) != epoch:
            raise RunNotRetryable(f"run {run_id!r} was retried again meanwhile")
        resumed = list(current["resumed"])
        resumed[-1] = {**resumed[-1], "done": True}
        return {
            **current,
            "resumed": resumed,
            "status": RunStatus.FAILED.value,
            "error": after,
            "finished_at": time.time(),
        }

    written, _ = await store.mutate(Names.run_key(run_id), fail)
    assert written is not None  # fail() writes or raises
    return written


async def _announce_failed_again(  # noqa: PLR0917 (one call site, each argument named there)
    js: Any, names: Names, run_id: str, workflow: str, record: dict[str, Any], trace: dict[str, str]
) -> None:
    """Publish the failed event of a run a retry put back to failed: a client that began waiting on
    it while it was reopened learns that it failed again. Nothing would publish it later, so a
    failing publish is tried again before the retry reports it."""
    event, msg_id = end_event(run_id, record)
    subject = names.run_event(workflow, run_id, RunStatus.FAILED.value)
    for delay in (0.2, 0.5, None):
        try:
            await js.publish(subject, encode(event), headers={**trace, "Nats-Msg-Id": msg_id})
            return
        except Exception as exc:  # a timeout, a lost connection
            if delay is None:
                raise RunNotRetryable(
                    f"run {run_id!r} has no node to run again and is failed again, but its failed "
                    f"event could not be published ({exc!r}): a client waiting on the run sees the "
                    "failure once it looks again"
                ) from exc
            await asyncio.sleep(delay)
