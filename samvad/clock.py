"""Time, injectable so that tests control it."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Protocol


class Clock(Protocol):
    def now(self) -> datetime:
        """Wall-clock time, timezone-aware UTC."""
        ...


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def micros_of(clock: Clock) -> Callable[[], int]:
    """Microseconds since the epoch by `clock`: by the system clock without a datetime, which
    every write and every expiry check would otherwise build."""
    if isinstance(clock, SystemClock):
        return lambda: time.time_ns() // 1000
    return lambda: to_micros(clock.now())


class MonotonicIds:
    """Strictly increasing UTC timestamps, so that two writes of one instance never tie."""

    def __init__(self, clock: Clock) -> None:
        self._now_us = micros_of(clock)
        self._last_us = 0

    def next_micros(self) -> int:
        us = self._now_us()
        if us <= self._last_us:
            us = self._last_us + 1
        self._last_us = us
        return us


def from_micros(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1_000_000, UTC)


def to_micros(at: datetime) -> int:
    return int(at.timestamp() * 1_000_000)


def iso(at: datetime) -> str:
    """ISO 8601 in UTC with millisecond precision and a Z, as the design note shows."""
    return at.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_us(us: int) -> str:
    """`iso(from_micros(us))` without building a datetime: every message shown is stamped."""
    seconds, micros = divmod(us, 1_000_000)
    return f"{_iso_second(seconds)}.{micros // 1000:03d}Z"


@lru_cache(maxsize=256)
def _iso_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


monotonic = time.monotonic
