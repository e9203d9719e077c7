"""The wire codec: msgpack everywhere, JSON accepted on trigger subjects for polyglot publishers."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import msgpack
from pydantic import BaseModel

from flow_orchestrator._errors import MalformedMessage, PayloadTooLarge, UnencodableValue

CONTENT_TYPE = "Content-Type"
JSON_TYPE = "application/json"
MSGPACK_TYPE = "application/msgpack"
DEFAULT_MAX_PAYLOAD = 512 * 1024


def _default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    raise TypeError(
        f"cannot encode a value of type {type(value).__name__}; use JSON-like data or a pydantic model"
    )


_packer_options: dict[str, Any] = {"default": _default, "use_bin_type": True}


def encode(value: Any) -> bytes:
    """Encode a JSON-like value (pydantic models, sets and datetimes are converted) as msgpack;
    raise :class:`UnencodableValue` for anything else."""
    try:
        return msgpack.packb(value, **_packer_options)
    except (TypeError, ValueError, OverflowError) as exc:
        raise UnencodableValue(str(exc)) from exc


def decode(data: bytes) -> Any:
    """Decode msgpack bytes; raise :class:`MalformedMessage` on anything else."""
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise MalformedMessage(f"payload is not valid msgpack: {exc or type(exc).__name__}") from exc


def decode_event(data: bytes, subject: str, *, empty_ok: bool = False) -> dict[str, Any]:
    """Decode an engine event, a msgpack map (with ``empty_ok``, no payload reads as an empty one);
    raise :class:`MalformedMessage` for anything else, so that a stray message is dead-lettered at
    once instead of failing ten times on a missing field."""
    payload = decode(data) if data or not empty_ok else {}
    if type(payload) is not dict:
        raise MalformedMessage(f"{subject}: expected a map of event fields, got {type(payload).__name__}")
    return payload


def decode_trigger(
    data: bytes, headers: Mapping[str, str] | None, max_size: int = DEFAULT_MAX_PAYLOAD
) -> Any:
    """Decode a trigger payload: JSON when ``Content-Type`` says so, msgpack otherwise."""
    if len(data) > max_size:
        raise PayloadTooLarge(f"trigger payload is {len(data)} bytes, above the {max_size}-byte limit")
    content_type = (headers or {}).get(CONTENT_TYPE, "")
    if content_type.split(";")[0].strip().lower() == JSON_TYPE:
        try:
            return json.loads(data) if data else None
        except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, a 5,000-digit number, deep nesting
            raise MalformedMessage(f"payload is not valid JSON: {exc}") from exc
    if not data:
        return None
    return decode(data)
