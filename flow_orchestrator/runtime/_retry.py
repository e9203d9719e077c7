"""Retry policies: how many attempts a node gets and how long to wait between them.

The maths is pure so it can be tested without a server; the supervisor turns the delay into a
durable scheduled message, so a worker restart never loses a pending retry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter and a cap.

    ``max_attempts`` counts the first attempt: ``RetryPolicy(max_attempts=3)`` runs a node at most
    three times. The delay before attempt ``n + 1`` is ``initial * backoff ** (n - 1)``, capped at
    ``max_delay``, then spread by ``± jitter`` (a fraction of the delay). Errors whose type name is in
    ``non_retryable`` fail the node at once, as does any :class:`NonRetryableError`.
    """

    max_attempts: int = 1
    initial: float = 1.0
    backoff: float = 2.0
    max_delay: float = 60.0
    jitter: float = 0.1
    non_retryable: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"RetryPolicy.max_attempts must be >= 1, got {self.max_attempts}")
        if self.initial < 0 or self.max_delay < 0:
            raise ValueError("RetryPolicy delays must be >= 0")
        if self.backoff < 1.0:
            raise ValueError(f"RetryPolicy.backoff must be >= 1.0, got {self.backoff}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"RetryPolicy.jitter must be within [0, 1], got {self.jitter}")

    def base_delay(self, attempt: int) -> float:
        """The delay, without jitter, after failed attempt number ``attempt`` (1-based)."""
        if attempt < 1:
            raise ValueError(f"attempt numbers start at 1, got {attempt}")
        # Cap the exponent before computing so huge attempt numbers cannot overflow.
        exponent = min(attempt - 1, 1024)
        try:
            delay = self.initial * self.backoff**exponent
        except OverflowError:
            delay = self.max_delay
        return min(delay, self.max_delay)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """The delay after failed attempt ``attempt``, with jitter; never negative nor above the cap."""
        base = self.base_delay(attempt)
        if self.jitter == 0.0 or base == 0.0:
            return base
        spread = base * self.jitter
        value = base + (rng or random).uniform(-spread, spread)
        return max(0.0, min(value, self.max_delay))

    def allows_another(self, attempt: int) -> bool:
        """Whether failed attempt ``attempt`` may be followed by another."""
        return attempt < self.max_attempts

    def is_retryable(self, error_type: str) -> bool:
        """Whether an error of type name ``error_type`` may be retried under this policy."""
        return error_type not in self.non_retryable


NO_RETRY = RetryPolicy()
