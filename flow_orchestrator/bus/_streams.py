"""Provisioning of the streams and the KV bucket every worker and client relies on.

Idempotent: creating what exists with the same settings is a no-op, changed settings are updated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import nats.js.errors as js_errors
from nats.js import JetStreamContext
from nats.js.api import (
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from flow_orchestrator.bus._kv import StateStore
from flow_orchestrator.bus._subjects import Names

_STREAM_IN_USE = 10058
DAY = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class StorageSettings:
    """Replica count and retention; ``replicas=3`` for a NATS cluster, 1 for one server.

    Retention bounds everything: run journals and triggers expire after ``events_max_age`` and
    ``triggers_max_age``, run records, join records and run data ``state_ttl`` after their last
    write, dead letters after ``dlq_max_age``. Keep them above your longest run. Workers refresh
    their workflows' registry records, so a deployment never forgets a workflow it still serves.
    """

    replicas: int = 1
    memory: bool = False
    events_max_age: float = 7 * DAY
    triggers_max_age: float = 7 * DAY
    state_ttl: float = 7 * DAY
    dlq_max_age: float = 30 * DAY
    duplicate_window: float = 120.0

    @classmethod
    def retained_for(cls, seconds: float, **options: Any) -> StorageSettings:
        """One retention for runs (journal, triggers, state); dead letters keep their longer default."""
        return cls(events_max_age=seconds, triggers_max_age=seconds, state_ttl=seconds, **options)


async def _ensure_stream(js: JetStreamContext, config: StreamConfig, *, update: bool) -> None:
    try:
        await js.add_stream(config)
    except js_errors.BadRequestError as exc:
        if exc.err_code != _STREAM_IN_USE:
            raise
        if update:
            await js.update_stream(config)


async def bind(js: JetStreamContext, names: Names) -> StateStore | None:
    """The state bucket when workers have provisioned the deployment (:func:`provision` creates it
    after the streams), else None. One stream-info request: a client whose user may read but not
    create streams (``deploy/nats/accounts.conf``) connects with it."""
    try:
        return StateStore(await js.key_value(names.state_bucket))
    except js_errors.BucketNotFoundError:
        return None


async def provision(
    js: JetStreamContext, names: Names, settings: StorageSettings, *, update: bool = True
) -> StateStore:
    """Create the triggers, events and dead-letter streams and the state bucket where missing.

    Workers pass ``update=True`` so a deployment's settings (replicas, retention) follow its
    workers' configuration; clients pass ``update=False`` and never change what exists.
    """
    storage = StorageType.MEMORY if settings.memory else StorageType.FILE
    common = {"num_replicas": settings.replicas, "storage": storage, "retention": RetentionPolicy.LIMITS}
    await _ensure_stream(
        js,
        StreamConfig(
            name=names.triggers_stream,
            subjects=[f"{names.prefix}.trigger.>"],
            max_age=settings.triggers_max_age,
            duplicate_window=min(settings.duplicate_window, settings.triggers_max_age),
            allow_direct=True,
            **common,  # type: ignore[arg-type]
        ),
        update=update,
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=names.events_stream,
            subjects=[f"{names.prefix}.evt.>", f"{names.prefix}.sched.>"],
            max_age=settings.events_max_age,
            duplicate_window=min(settings.duplicate_window, settings.events_max_age),
            allow_direct=True,
            allow_msg_schedules=True,
            allow_msg_ttl=True,
            **common,  # type: ignore[arg-type]
        ),
        update=update,
    )
    await _ensure_stream(
        js,
        StreamConfig(
            name=names.dlq_stream,
            subjects=[f"{names.prefix}.dlq.>"],
            max_age=settings.dlq_max_age,
            discard=DiscardPolicy.OLD,
            allow_direct=True,
            **common,  # type: ignore[arg-type]
        ),
        update=update,
    )
    try:
        kv = await js.key_value(names.state_bucket)
    except js_errors.BucketNotFoundError:
        kv = await js.create_key_value(
            KeyValueConfig(
                bucket=names.state_bucket,
                history=1,
                ttl=settings.state_ttl,
                replicas=settings.replicas,
                storage=storage,
                # Direct gets may be answered by a lagging replica: on a cluster, read from the leader
                # so data an upstream wrote is always visible downstream.
                direct=settings.replicas == 1,
            )
        )
    else:
        if update and await _update_bucket_retention(js, f"KV_{names.state_bucket}", settings):
            kv = await js.key_value(names.state_bucket)  # it reads direct-get support at binding
    return StateStore(kv)


async def _update_bucket_retention(js: JetStreamContext, stream: str, settings: StorageSettings) -> bool:
    """Apply a changed state retention (or replica count) to an existing bucket's stream; return
    whether anything changed."""
    info = await js.stream_info(stream)
    config = info.config
    direct = settings.replicas == 1
    wanted = (settings.state_ttl, settings.replicas, direct)
    if (config.max_age, config.num_replicas, config.allow_direct) == wanted:
        return False
    config.max_age = settings.state_ttl
    config.num_replicas = settings.replicas
    config.allow_direct = direct
    config.duplicate_window = min(config.duplicate_window or settings.state_ttl, settings.state_ttl)
    await js.update_stream(config)
    return True
