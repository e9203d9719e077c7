"""``WorkflowData``: a run's shared key-value data, held in JetStream KV, every write a compare-and-set.

Also the ``WorkflowStore`` protocol of the original library (save/load a run's data) and its KV
implementation.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar, cast

from pydantic import BaseModel, ValidationError

from flow_orchestrator._errors import DataKeyNotFound, DataTypeError, StateConflict
from flow_orchestrator.bus._kv import StateStore
from flow_orchestrator.bus._subjects import Names, check_data_key

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
_MISSING: Any = object()


class WorkflowData:
    """The data of one run. Reads are async; writes are compare-and-set against the last revision seen.

    ``set`` is last-writer-wins between nodes but never loses a concurrent write silently: it retries
    its compare-and-set on the newest revision. Use :meth:`update` for read-modify-write.
    """

    def __init__(
        self,
        store: StateStore,
        run_id: str,
        *,
        outputs: Callable[[str], Awaitable[Any]] | None = None,
    ) -> None:
        self._store = store
        self._run_id = run_id
        self._revisions: dict[str, int] = {}
        self._outputs = outputs

    @property
    def run_id(self) -> str:
        return self._run_id

    def _key(self, key: str) -> str:
        return Names.data_key(self._run_id, check_data_key(key))

    async def get(self, key: str, default: Any = _MISSING) -> Any:
        found = await self._store.get(self._key(key))
        if found is None:
            if default is _MISSING:
                raise DataKeyNotFound(f"run {self._run_id!r} has no data key {key!r}")
            return default
        self._revisions[key] = found.revision
        return found.value

    async def _typed(
        self,
        key: str,
        kinds: tuple[type, ...],
        label: str,
        default: Any,
        convert: Callable[[Any], Any] | None,
    ) -> Any:
        """The value of ``key`` if it is one of ``kinds`` (through ``convert``), else ``default`` as
        given when ``key`` has none (``None`` included)."""
        value = await self.get(key, default)
        if value is default and default is not _MISSING:
            return value
        # bool is an int subclass; a typed getter for int must not accept True.
        if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
            raise DataTypeError(
                f"run {self._run_id!r} data key {key!r} holds {type(value).__name__} {value!r}, not {label}"
            )
        return convert(value) if convert is not None else value

    async def get_int(self, key: str, default: Any = _MISSING) -> int:
        return cast(int, await self._typed(key, (int,), "an int", default, None))

    async def get_float(self, key: str, default: Any = _MISSING) -> float:
        return cast(float, await self._typed(key, (int, float), "a float", default, float))

    async def get_str(self, key: str, default: Any = _MISSING) -> str:
        return cast(str, await self._typed(key, (str,), "a str", default, None))

    async def get_bool(self, key: str, default: Any = _MISSING) -> bool:
        return cast(bool, await self._typed(key, (bool,), "a bool", default, None))

    async def get_list(self, key: str, default: Any = _MISSING) -> list[Any]:
        return cast(list[Any], await self._typed(key, (list,), "a list", default, list))

    async def get_dict(self, key: str, default: Any = _MISSING) -> dict[str, Any]:
        return cast(dict[str, Any], await self._typed(key, (dict,), "a dict", default, dict))

    async def get_model(self, key: str, model: type[M]) -> M:
        value = await self.get(key)
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise DataTypeError(
                f"run {self._run_id!r} data key {key!r} does not validate as {model.__name__}: {exc}"
            ) from exc

    async def set(self, key: str, value: Any) -> int:
        """Store ``value`` (JSON-like data or a pydantic model); returns the new revision."""
        full = self._key(key)
        revision = self._revisions.get(key)
        for _ in range(50):
            try:
                new_revision = await self._store.write(full, value, revision)
            except StateConflict:
                current = await self._store.get(full)
                revision = current.revision if current else None
                continue
            self._revisions[key] = new_revision
            return new_revision
        raise StateConflict(f"run {self._run_id!r} data key {key!r} kept changing; gave up writing it")

    async def update(self, key: str, change: Callable[[Any], Any], default: Any = None) -> Any:
        """Atomically replace the value with ``change(current)`` (``default`` when absent)."""
        written, revision = await self._store.mutate(
            self._key(key), lambda current: change(default if current is None else current)
        )
        if revision is not None:
            self._revisions[key] = revision
        return written

    async def delete(self, key: str) -> None:
        self._revisions.pop(key, None)
        await self._store.delete(self._key(key))

    async def keys(self) -> list[str]:
        prefix = Names.data_key(self._run_id, "")
        return sorted(k[len(prefix) :] for k in await self._store.keys(prefix + "*"))

    async def output(self, node: str) -> Any:
        """The output of any completed node of this run (read from the run journal)."""
        if self._outputs is None:
            raise DataKeyNotFound(f"node outputs are not available here (run {self._run_id!r})")
        return await self._outputs(node)

    async def to_dict(self) -> dict[str, Any]:
        return {key: await self.get(key) for key in await self.keys()}


class KVWorkflowStore:
    """The JetStream KV implementation of :class:`~flow_orchestrator.runtime.types.WorkflowStore`."""

    def __init__(self, store: StateStore) -> None:
        self._store = store

    async def save(self, run_id: str, data: Mapping[str, Any]) -> None:
        target = WorkflowData(self._store, run_id)
        for key, value in data.items():
            await target.set(key, value)

    async def load(self, run_id: str) -> dict[str, Any]:
        return await WorkflowData(self._store, run_id).to_dict()
