"""A bounded, insertion-ordered memory (oldest out first), for caches kept per run or per key."""

from __future__ import annotations

from collections import OrderedDict
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")


def remember(book: OrderedDict[K, V], key: K, value: V, capacity: int) -> None:
    """Put ``key`` in ``book`` as its newest entry, dropping the oldest beyond ``capacity``."""
    book[key] = value
    book.move_to_end(key)
    while len(book) > capacity:
        book.popitem(last=False)
