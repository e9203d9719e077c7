"""Join bookkeeping for nodes with several upstreams, coalesced inside each worker.

Every arrival must be recorded durably (a KV compare-and-set on ``join.<run>.<node>``) and exactly
one message must win the join. Done one arrival at a time, a fan-in of 100 upstreams has 100 tasks
racing on one key: each round one write wins and the rest re-read and retry, thousands of round
trips. Here the arrivals waiting in this worker are written together by whichever of them holds the
key's lock, so the only races left are between workers.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Set
from typing import Any

from flow_orchestrator._bounded import remember
from flow_orchestrator._errors import FlowError
from flow_orchestrator.bus._kv import StateStore, Versioned

WRITTEN_KEYS = 4096  # undecided join keys whose last write this worker remembers
# ... for this long. Another worker may decide a join this one wrote to, and nothing tells this
# one: without an age limit each such record stayed until 4,096 newer ones pushed it out. An
# arrival this much later than the worker's last write to its join guesses it absent (a failed
# create and its read: two round trips more).
WRITTEN_FOR = 10.0  # seconds
# An upstream output whose completion event is at most this big rides in the join record, when all
# of a join's upstreams together fit in INLINE_RECORD_BYTES; the others are read from the journal.
INLINE_OUTPUT_BYTES = 1024
INLINE_RECORD_BYTES = 256 * 1024
NOT_INLINE: Any = object()


class JoinNotRecorded(FlowError):
    """An arrival's batched write failed; its message is handed back to be delivered again."""


class JoinBook:
    """Arrivals at one node's joins. :meth:`arrive` returns the join record once this arrival is
    durable; the message whose sequence is the record's ``holder`` runs the node."""

    def __init__(self, store: StateStore, needed: Set[str]) -> None:
        self._store = store
        self._needed = frozenset(needed)
        # key -> {upstream: (message seq, its output or NOT_INLINE)} not yet written
        self._waiting: dict[str, dict[str, tuple[int, Any]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._latest: dict[str, dict[str, Any] | None] = {}
        self._users: dict[str, int] = {}
        # What this worker last wrote to each undecided join key: the next write's compare-and-set
        # starts from it instead of reading the key first (one round trip less when no other worker
        # wrote in between). A key never seen is guessed absent: most joins start with a create.
        self._written: OrderedDict[str, tuple[Versioned, float]] = OrderedDict()  # and when

    @property
    def inlines_outputs(self) -> bool:
        """Whether small upstream outputs ride in the join record (the winner then reads none of
        them back): only when all of them together stay small."""
        return len(self._needed) * INLINE_OUTPUT_BYTES <= INLINE_RECORD_BYTES

    async def arrive(
        self, key: str, source: str, seq: int, output: Any = NOT_INLINE
    ) -> dict[str, Any] | None:
        """Record ``source``'s arrival (its message ``seq``; its ``output`` when small enough to
        ride in the record) and return the record that holds it."""
        self._waiting.setdefault(key, {}).setdefault(source, (seq, output))
        self._users[key] = self._users.get(key, 0) + 1
        lock = self._locks.setdefault(key, asyncio.Lock())
        try:
            async with lock:
                batch = self._waiting.pop(key, None)
                if batch:
                    try:
                        self._latest[key] = await self._write(key, batch, holder=seq)
                    except BaseException:
                        # Give the batch back to the next writer: it carried other messages' arrivals.
                        waiting = self._waiting.setdefault(key, {})
                        for upstream, arrival in batch.items():
                            waiting.setdefault(upstream, arrival)
                        raise
                # else an earlier holder of the lock wrote this arrival with its own batch.
                record = self._latest.get(key)
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                for book in (self._users, self._locks, self._latest, self._waiting):
                    book.pop(key, None)
        if record is None or source not in record.get("arrived", ()):
            # The write that carried this arrival failed: do not acknowledge; the message returns.
            raise JoinNotRecorded(f"the arrival of {source!r} at {key!r} was not recorded yet")
        return record

    async def _write(self, key: str, batch: dict[str, tuple[int, Any]], holder: int) -> dict[str, Any] | None:
        """Add the batch's arrivals; if they complete the set, ``holder`` (the writer's own message,
        still unacknowledged) wins the join."""

        def add(current: dict[str, Any] | None) -> dict[str, Any] | None:
            current = current or {"arrived": [], "holder": None}
            new = [source for source in batch if source not in current["arrived"]]
            if not new:
                return None
            arrived = [*current["arrived"], *new]
            winner = current.get("holder")
            if winner is None and self._needed.issubset(arrived):
                winner = holder
            outputs = dict(current.get("outputs") or {})
            outputs.update((s, batch[s][1]) for s in new if batch[s][1] is not NOT_INLINE)
            return {"arrived": arrived, "holder": winner, "outputs": outputs}

        written, revision = await self._store.mutate(key, add, guess=self._last_written(key))
        if written is not None and revision is not None:
            if written["holder"] is None:
                remember(self._written, key, (Versioned(written, revision), time.monotonic()), WRITTEN_KEYS)
            else:
                # Decided: no arrival will write it again (a redelivery reads it), so keeping it
                # would only hold its outputs: 28 KB a fan100 run, 110 MB a worker after 5,000.
                self._written.pop(key, None)
            return written
        current = await self._store.get(key)  # nothing new: a redelivery; report what is recorded
        return current.value if current is not None else None

    def _last_written(self, key: str) -> Versioned | None:
        """What this worker last wrote to ``key`` (None: guess absent), once older entries are gone."""
        now = time.monotonic()
        while self._written:
            oldest = next(iter(self._written.values()))
            if now - oldest[1] < WRITTEN_FOR:
                break
            self._written.popitem(last=False)
        found = self._written.get(key)
        return found[0] if found is not None else None
