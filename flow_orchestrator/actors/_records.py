"""Pieces of the payloads actors publish, as plain dicts: a failed attempt's error and retry policy."""

from __future__ import annotations

import traceback
from typing import Any

from flow_orchestrator._errors import NonRetryableError, RetryAfter, UnencodableValue
from flow_orchestrator.runtime._retry import RetryPolicy


def error_info(exc: BaseException, policy: RetryPolicy) -> dict[str, Any]:
    """What a failed attempt reports: type, message, whether a retry may help, and a requested delay."""
    name = type(exc).__name__
    # A value that cannot be stored (not encodable, or larger than a message) never will be.
    final = isinstance(exc, NonRetryableError | UnencodableValue)
    retryable = not final and policy.is_retryable(name)
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8)
    return {
        "type": name,
        "message": str(exc)[:2000],
        "retryable": retryable,
        "retry_after": exc.delay if isinstance(exc, RetryAfter) else None,
        "traceback": "".join(tb)[-4000:],
    }


def policy_dict(policy: RetryPolicy) -> dict[str, Any]:
    return {
        "max_attempts": policy.max_attempts,
        "initial": policy.initial,
        "backoff": policy.backoff,
        "max_delay": policy.max_delay,
        "jitter": policy.jitter,
        "non_retryable": list(policy.non_retryable),
    }


def policy_from(data: dict[str, Any]) -> RetryPolicy:
    return RetryPolicy(**{**data, "non_retryable": tuple(data.get("non_retryable", ()))})
