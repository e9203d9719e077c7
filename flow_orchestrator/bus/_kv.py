"""Workflow state in JetStream KV: every write is a compare-and-set on the key's revision.

One helper turns the server's "wrong last sequence" answer (error code 10071 on one replica, 10164 on
some clustered paths) into our own :class:`StateConflict`, so callers never see nats-py's errors.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats.errors
import nats.js.errors as js_errors
from nats.js.api import DeliverPolicy
from nats.js.kv import KeyValue

from flow_orchestrator._errors import StateConflict, UnencodableValue
from flow_orchestrator.bus._codec import decode, encode

_CONFLICT_CODES = (10071, 10164)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Versioned:
    """A decoded value and the revision it was read at (the token for the next compare-and-set)."""

    value: Any
    revision: int


class Unknown:
    """No guess at a key's current value: read it."""


UNKNOWN = Unknown()


class KeyTaken(StateConflict):
    """A create found the key holding a value; :attr:`current` is that value, read on the way."""

    def __init__(self, message: str, current: Versioned) -> None:
        super().__init__(message)
        self.current = current


def _is_conflict(exc: BaseException) -> bool:
    if isinstance(exc, js_errors.KeyWrongLastSequenceError):
        return True
    return isinstance(exc, js_errors.APIError) and exc.err_code in _CONFLICT_CODES


def _too_large(key: str, data: bytes) -> UnencodableValue:
    """A value the server will never take: not a transient failure, so it is not retried."""
    return UnencodableValue(
        f"state key {key!r}: {len(data)} bytes, more than the NATS server takes in one message; "
        "keep large data elsewhere and store a reference"
    )


class StateStore:
    """Compare-and-set access to one KV bucket, values encoded with msgpack."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @property
    def bucket(self) -> KeyValue:
        return self._kv

    async def get(self, key: str) -> Versioned | None:
        """The current value and revision, or ``None`` when the key does not exist (or was deleted)."""
        try:
            entry = await self._kv.get(key, validate_keys=False)
        except js_errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return Versioned(decode(entry.value), entry.revision)

    async def create(self, key: str, value: Any) -> int:
        """Write ``value`` only if ``key`` has none (or only a delete marker); raise
        :class:`StateConflict` otherwise (:class:`KeyTaken`, with the value found, when it has one).

        nats-py's ``create`` probes for a delete marker on conflict and, on a cluster, a lagging
        replica can answer that probe "not found": that must read as the conflict it is.
        """
        data = encode(value)
        try:
            return await self._kv.update(key, data, last=0, validate_keys=False)
        except nats.errors.MaxPayloadError:
            raise _too_large(key, data) from None
        except js_errors.APIError as exc:
            if not _is_conflict(exc):
                raise
        try:
            entry = await self._kv.get(key, validate_keys=False)
        except js_errors.KeyNotFoundError as missing:
            marker = getattr(missing, "entry", None)
            if marker is not None and marker.revision:  # deleted: recreate over the marker
                return await self.update(key, value, marker.revision)
        else:
            if entry.value is not None and entry.revision is not None:
                found = Versioned(decode(entry.value), entry.revision)
                raise KeyTaken(f"state key {key!r} already exists", found)
        raise StateConflict(f"state key {key!r} already exists")

    async def update(self, key: str, value: Any, revision: int) -> int:
        """Write ``value`` only if ``key`` is still at ``revision``, else raise :class:`StateConflict`."""
        data = encode(value)
        try:
            return await self._kv.update(key, data, last=revision, validate_keys=False)
        except nats.errors.MaxPayloadError:
            raise _too_large(key, data) from None
        except js_errors.APIError as exc:
            if _is_conflict(exc):
                raise StateConflict(f"state key {key!r} changed since revision {revision}") from exc
            raise

    async def write(self, key: str, value: Any, revision: int | None) -> int:
        """Compare-and-set: create when ``revision`` is ``None``, update otherwise."""
        if revision is None:
            return await self.create(key, value)
        return await self.update(key, value, revision)

    async def mutate(
        self,
        key: str,
        change: Callable[[Any | None], Awaitable[T | None]] | Callable[[Any | None], T | None],
        *,
        attempts: int = 50,
        guess: Versioned | Unknown | None = UNKNOWN,
    ) -> tuple[T | None, int | None]:
        """Read-modify-write with retries on conflict.

        ``change`` receives the current value (``None`` if absent) and returns the new value, or
        ``None`` to leave the key alone. Returns the value written (or ``None``) and its revision.
        ``guess`` (what the caller last wrote, or ``None``: absent) saves the first read; a wrong
        guess costs a conflict, after which the key is read (a failed create has read it already).
        """
        known = guess
        for attempt in range(attempts):
            current = await self.get(key) if isinstance(known, Unknown) else known
            known = UNKNOWN
            result = change(current.value if current else None)
            new = await result if isinstance(result, Awaitable) else result
            if new is None:
                return None, current.revision if current else None
            try:
                revision = await self.write(key, new, current.revision if current else None)
            except StateConflict as conflict:
                if isinstance(conflict, KeyTaken):
                    known = conflict.current  # read while finding out: no second read
                # The first retry goes again at once (the read itself staggers two racing writers);
                # later ones back off a little, at random, so writers stop colliding in lockstep.
                if attempt:
                    await asyncio.sleep(random.uniform(0, 0.001 * attempt))
                continue
            return new, revision
        raise StateConflict(f"state key {key!r} kept changing; gave up after {attempts} attempts")

    async def delete(self, key: str) -> None:
        await self._kv.delete(key, validate_keys=False)

    async def keys(self, pattern: str) -> list[str]:
        """Keys matching a subject-style pattern (``run.*``); an empty list when none match.

        Read through an ordered consumer of each matching key's last entry, headers only, until the
        server says none is pending. (nats-py's watcher decides that a bucket is empty when the
        server has delivered everything and its own callback has not seen it yet: on a loaded
        machine it answered an empty list for a bucket with keys.)"""
        kv = self._kv
        prefix: str = kv._pre  # "$KV.<bucket>." (nats-py keeps these private)
        sub = await kv._js.subscribe(
            prefix + pattern,
            stream=kv._stream,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            headers_only=True,
        )
        keys: list[str] = []
        try:
            info = await sub.consumer_info()
            if not info.num_pending and not (info.delivered and info.delivered.consumer_seq):
                return keys  # nothing matches, and nothing was delivered before the question
            while True:
                msg = await sub.next_msg(timeout=5.0)
                if (msg.headers or {}).get("KV-Operation") not in ("DEL", "PURGE"):
                    keys.append(msg.subject[len(prefix) :])
                if not msg.metadata.num_pending:
                    return keys
        finally:
            await sub.unsubscribe()
