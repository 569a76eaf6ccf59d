"""The service's read cache: entries expire a fixed time after being set; it stays bounded."""

from __future__ import annotations

import pytest

from samvad.cache import ReadCache

MISS = object()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_entry_is_returned_until_its_ttl_has_passed_since_it_was_set() -> None:
    clock = Clock()
    cache: ReadCache[str, str | None] = ReadCache(10, ttl=30, timer=clock)
    cache["a"] = "first"
    cache["absent"] = None  # "known absent" is a value like any other
    clock.now += 29.9
    assert cache["a"] == "first"
    assert cache.get("absent", MISS) is None
    cache["a"] = "second"  # set anew: its 30 s start again
    clock.now += 0.1
    assert cache.get("absent", MISS) is MISS
    assert cache.pop("absent", MISS) is MISS
    assert cache.get("a", MISS) == "second"
    clock.now += 29.9
    assert cache.get("a", MISS) is MISS
    with pytest.raises(KeyError):
        cache["a"]
    assert list(cache.items()) == []


def test_it_holds_at_most_maxsize_dropping_the_entry_set_longest_ago() -> None:
    clock = Clock()
    cache: ReadCache[str, int] = ReadCache(3, ttl=60, timer=clock)
    for n, key in enumerate("abc"):
        cache[key] = n
        clock.now += 1
    cache["a"] = 10  # a is now the newest: b goes first
    cache["d"] = 3
    assert len(cache) == 3
    assert cache.get("b", MISS) is MISS
    assert dict(cache.items()) == {"c": 2, "a": 10, "d": 3}


def test_writes_drop_expired_entries_so_memory_follows_what_is_live() -> None:
    clock = Clock()
    cache: ReadCache[int, int] = ReadCache(1000, ttl=10, timer=clock)
    for key in range(100):
        cache[key] = key
    clock.now += 11  # all expired, none read since
    for key in range(100, 300):
        cache[key] = key
    # each write dropped at least one expired entry from the front, so none of them is left
    assert len(cache) == 200
    assert cache.get(0, MISS) is MISS


def test_pop_and_delete() -> None:
    cache: ReadCache[str, int] = ReadCache(10, ttl=60)
    cache["a"] = 1
    cache["b"] = 2
    assert cache.pop("a", MISS) == 1
    assert cache.pop("a", MISS) is MISS
    del cache["b"]
    with pytest.raises(KeyError):
        del cache["b"]
    assert len(cache) == 0


def test_it_refuses_a_size_or_ttl_that_cannot_hold_anything() -> None:
    with pytest.raises(ValueError):
        ReadCache(0, ttl=10)
    with pytest.raises(ValueError):
        ReadCache(10, ttl=0)
