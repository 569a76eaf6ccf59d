"""The service's read caches: bounded maps whose entries last a fixed time from when they were set.

cachetools' TTLCache does this with four Python calls on every hit (its timer's context, its link
list, its LRU touch, the base class's lookup); a cached read is the hottest path of the service,
so a hit here is one dict lookup and one clock read.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
D = TypeVar("D")


class ReadCache(Generic[K, V]):
    """At most `maxsize` entries, each for `ttl` seconds after it was last set.

    The ttl is the same for every entry, so the order in which entries were set is the order in
    which they expire. A write drops the expired ones from the front and, when full, the entry
    set longest ago (not the least recently read, as TTLCache would). An expired entry is never
    returned.
    """

    __slots__ = ("_entries", "_maxsize", "_timer", "_ttl")

    def __init__(
        self, maxsize: int, ttl: float, timer: Callable[[], float] = time.monotonic
    ) -> None:
        if maxsize < 1 or ttl <= 0:
            raise ValueError("a ReadCache needs room for an entry and a positive ttl")
        self._maxsize = maxsize
        self._ttl = ttl
        self._timer = timer
        self._entries: dict[K, tuple[V, float]] = {}  # key -> (value, expires at), oldest first

    def __getitem__(self, key: K) -> V:
        value, expires = self._entries[key]
        if expires <= self._timer():
            del self._entries[key]
            raise KeyError(key)
        return value

    def get(self, key: K, default: D) -> V | D:
        try:
            return self[key]
        except KeyError:
            return default

    def __setitem__(self, key: K, value: V) -> None:
        entries = self._entries
        now = self._timer()
        entries.pop(key, None)  # set anew, it goes to the end: the last to expire
        entries[key] = (value, now + self._ttl)
        # Each entry is dropped once: a write costs O(1) amortized. The loop ends at the latest
        # at the entry just set (unexpired, and maxsize >= 1).
        while True:
            oldest = next(iter(entries))
            if entries[oldest][1] > now and len(entries) <= self._maxsize:
                return
            del entries[oldest]

    def __delitem__(self, key: K) -> None:
        del self._entries[key]

    def pop(self, key: K, default: D) -> V | D:
        entry = self._entries.pop(key, None)
        if entry is None or entry[1] <= self._timer():
            return default
        return entry[0]

    def items(self) -> Iterator[tuple[K, V]]:
        """The unexpired entries, oldest first (a copy: the cache may change meanwhile)."""
        now = self._timer()
        live = [(key, value) for key, (value, expires) in self._entries.items() if expires > now]
        return iter(live)

    def __len__(self) -> int:
        """Entries held, expired ones not yet dropped included: what the cache costs in memory."""
        return len(self._entries)
