"""Write-behind: acknowledged writes wait here, coalesced per document, until they land.

Each key (one Firestore document, or one user's history) holds at most one pending value,
merged from every write since the last flush, so a burst of appends becomes one document write.
A key is flushed at most once per `flush_interval` (Firestore's ~1 write/s/document guidance),
one flush at a time per key, in the order keys first became dirty. A retryable failure opens
the StoreHealth circuit: nothing is dropped, nothing is flushed until Firestore answers again.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from cachetools import TTLCache

from samvad.clock import monotonic
from samvad.errors import BacklogFull, ShuttingDown, StoreContention, StoreUnavailable
from samvad.health import StoreHealth

log = logging.getLogger(__name__)

V = TypeVar("V")
Key = tuple[str, str]  # (kind, document id)
# Told of every flush attempt: (kind, seconds it took, whether it landed). Metrics, never logic.
FlushHook = Callable[[str, float, bool], None]


class Coalescer(Protocol[V]):
    def merge(self, pending: V | None, pending_size: int, new: V) -> tuple[V, int]:
        """The pending value after `new` is written on top of `pending` (of `pending_size`
        bytes), and its size: given the size so far, an append need not count it all again."""
        ...

    def remaining(self, pending: V, flushed: V) -> V | None:
        """What of `pending` is still unwritten once `flushed` has landed."""
        ...

    def keep_after(self, pending: V, at_us: int) -> V | None:
        """`pending` without what was stamped at or before a wipe at `at_us`."""
        ...

    def size(self, value: V) -> int: ...


@dataclass
class _Entry(Generic[V]):
    kind: str
    value: V
    nbytes: int
    dirty_since: float
    due: float
    generation: int = 0
    attempts: int = 0
    waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)


@dataclass(frozen=True)
class _Kind(Generic[V]):
    coalescer: Coalescer[V]
    flush: Callable[[str, V], Awaitable[V]]


@dataclass(frozen=True)
class BacklogStats:
    entries: int
    bytes: int
    oldest_age: float
    in_flight: int
    flushes: int
    failures: int


class WriteBehind:
    def __init__(
        self,
        health: StoreHealth,
        *,
        flush_delay: float,
        flush_interval: float,
        concurrency: int,
        max_bytes: int,
        on_flush: FlushHook | None = None,
    ) -> None:
        self.on_flush = on_flush
        self._health = health
        self._delay = flush_delay
        self._interval = flush_interval
        self._max_bytes = max_bytes
        self._kinds: dict[str, _Kind[Any]] = {}
        self._entries: dict[Key, _Entry[Any]] = {}
        self._heap: list[tuple[float, int, Key]] = []
        self._seq = itertools.count()
        self._last_flush: TTLCache[Key, float] = TTLCache(
            maxsize=1_000_000, ttl=max(flush_interval, 0.001)
        )
        self._locks: dict[Key, asyncio.Lock] = {}
        self._held: dict[Key, int] = {}
        self._in_flight: set[Key] = set()
        self._slots = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._bytes = 0
        self._refusing = False
        self._flushes = 0
        self._failures = 0
        self._accepting = True
        self._task: asyncio.Task[None] | None = None
        self._flush_tasks: set[asyncio.Task[None]] = set()

    def register(
        self, kind: str, coalescer: Coalescer[V], flush: Callable[[str, V], Awaitable[V]]
    ) -> None:
        """`flush(id, pending)` writes `pending`, or a prefix of it, and returns what it wrote."""
        self._kinds[kind] = _Kind(coalescer, flush)

    # ---- what the service calls -------------------------------------------------------------

    def pending(self, key: Key) -> Any | None:
        entry = self._entries.get(key)
        return entry.value if entry else None

    def pending_of(self, kind: str) -> Iterable[tuple[str, Any]]:
        return [(k[1], e.value) for k, e in self._entries.items() if k[0] == kind]

    def submit(self, key: Key, value: Any, durable: bool = False) -> asyncio.Future[None] | None:
        """Take a write. It is visible through `pending` at once; with `durable`, the returned
        future completes when it is in the store."""
        if not self._accepting:
            raise ShuttingDown()
        coalescer = self._kinds[key[0]].coalescer
        entry = self._entries.get(key)
        pending_size = entry.nbytes if entry else 0
        merged, nbytes = coalescer.merge(entry.value if entry else None, pending_size, value)
        grow = nbytes - pending_size
        if grow > 0 and self._bytes + grow > self._max_bytes:
            self._refusing = True
            raise BacklogFull(retry_after=self._retry_after())
        now = monotonic()
        if entry is None:
            last = self._last_flush.get(key)
            due = (
                now + self._delay if last is None else max(now + self._delay, last + self._interval)
            )
            entry = _Entry(kind=key[0], value=merged, nbytes=nbytes, dirty_since=now, due=due)
            self._entries[key] = entry
            self._idle.clear()
            self._schedule(key, due)
        else:
            entry.value = merged
            entry.nbytes = nbytes
        entry.generation += 1
        self._bytes += grow
        if not durable:
            return None
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.waiters.append((entry.generation, waiter))
        if entry.due > now:
            entry.due = now
            self._schedule(key, now)
        return waiter

    @asynccontextmanager
    async def hold(self, keys: Iterable[Key]) -> AsyncIterator[None]:
        """No flush of `keys` runs while held; waits for the ones in flight to finish."""
        ordered = sorted(set(keys))
        for key in ordered:
            self._held[key] = self._held.get(key, 0) + 1
        acquired: list[asyncio.Lock] = []
        try:
            for key in ordered:
                lock = self._locks.setdefault(key, asyncio.Lock())
                await lock.acquire()
                acquired.append(lock)
            yield
        finally:
            for lock in acquired:
                lock.release()
            for key in ordered:
                self._held[key] -= 1
                if not self._held[key]:
                    del self._held[key]
                    if key in self._entries:
                        self._schedule(key, self._entries[key].due)

    def discard_before(self, key: Key, at_us: int) -> None:
        """Drop what a wipe at `at_us` removed; what was written after it stays pending."""
        entry = self._entries.get(key)
        if entry is None:
            return
        kept = self._kinds[key[0]].coalescer.keep_after(entry.value, at_us)
        if kept is None:
            self._remove(key, entry)
        else:
            self._resize(entry, kept)

    def stats(self) -> BacklogStats:
        now = monotonic()
        oldest = min((e.dirty_since for e in self._entries.values()), default=now)
        return BacklogStats(
            entries=len(self._entries),
            bytes=self._bytes,
            oldest_age=now - oldest,
            in_flight=len(self._in_flight),
            flushes=self._flushes,
            failures=self._failures,
        )

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def full(self) -> bool:
        """A write was refused for room, and nothing has drained since."""
        return self._refusing

    # ---- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="write-behind")

    async def drain(self, budget: float) -> bool:
        """Stop taking writes and flush everything now. True if nothing is left pending."""
        self._accepting = False
        self._health.retry_max = min(self._health.retry_max, 0.5)
        now = monotonic()
        for key, entry in self._entries.items():
            if entry.attempts == 0:  # what is backing off after a failure keeps its backoff
                entry.due = now
                self._schedule(key, now)
        self._wake.set()
        try:
            async with asyncio.timeout(budget):
                await self._idle.wait()
        except TimeoutError:
            pass
        left = self.stats()
        if left.entries:
            log.critical(
                "shutdown flush budget exhausted: pending writes are lost",
                extra={"json_fields": {"entries": left.entries, "bytes": left.bytes}},
            )
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for task in [*self._flush_tasks, *([self._task] if self._task else [])]:
            task.cancel()
        await asyncio.gather(*self._flush_tasks, return_exceptions=True)

    # ---- the background loop ------------------------------------------------------------------

    def _schedule(self, key: Key, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), key))
        self._wake.set()

    def _retry_after(self) -> float:
        return max(1.0, min(30.0, self._interval * 2 + self._health.unreachable_for / 4))

    async def _run(self) -> None:
        while True:
            if not self._health.reachable:
                await self._health.wait_reachable()
            self._wake.clear()
            now = monotonic()
            while self._heap and self._health.reachable:
                due, _, key = self._heap[0]
                entry = self._entries.get(key)
                if entry is None or due != entry.due or key in self._in_flight:
                    heapq.heappop(self._heap)  # stale: rescheduled, flushed, or running
                    continue
                if key in self._held:
                    heapq.heappop(self._heap)  # re-pushed when the hold ends
                    continue
                if due > now:
                    break
                heapq.heappop(self._heap)
                await self._slots.acquire()
                self._in_flight.add(key)
                task = asyncio.get_running_loop().create_task(self._flush(key))
                self._flush_tasks.add(task)
                task.add_done_callback(self._flush_tasks.discard)
            # Not kept while idle: it would keep the last entry's data alive, a wiped user's too.
            entry = None
            timeout = None
            if self._heap:
                timeout = max(0.0, self._heap[0][0] - monotonic())
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _flush(self, key: Key) -> None:
        kind = self._kinds[key[0]]
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                entry = self._entries.get(key)
                if entry is None:
                    return
                snapshot, generation = entry.value, entry.generation
                started = monotonic()
                landed = False
                try:
                    written = await kind.flush(key[1], snapshot)
                    landed = True
                except StoreUnavailable as exc:
                    self._failures += 1
                    self._health.record_failure(exc)
                    self._reschedule(key, monotonic())
                    return
                except StoreContention:
                    self._failures += 1
                    entry.attempts += 1
                    self._reschedule(key, monotonic() + self._health.backoff(entry.attempts))
                    return
                except Exception:
                    self._failures += 1
                    entry.attempts += 1
                    log.exception(
                        "flush failed; kept for retry", extra={"json_fields": {"kind": key[0]}}
                    )
                    self._reschedule(key, monotonic() + self._health.retry_max)
                    return
                finally:
                    if self.on_flush is not None:
                        self.on_flush(key[0], monotonic() - started, landed)
                self._health.record_success()
                self._flushes += 1
                entry.attempts = 0
                self._last_flush[key] = monotonic()
                current = self._entries.get(key)
                if current is not entry:
                    return  # discarded by a wipe while we wrote: its waiters are settled
                left = kind.coalescer.remaining(entry.value, written)
                if written is snapshot:
                    for _, waiter in [w for w in entry.waiters if w[0] <= generation]:
                        if not waiter.done():
                            waiter.set_result(None)
                    entry.waiters = [w for w in entry.waiters if w[0] > generation]
                if left is None:
                    self._remove(key, entry)
                else:
                    self._resize(entry, left)
                    # Coalescing serves running traffic; a shutdown flush takes the rest at once.
                    now = monotonic()
                    due = (
                        max(now + self._delay, started + self._interval) if self._accepting else now
                    )
                    self._reschedule(key, due)
        finally:
            self._in_flight.discard(key)
            self._slots.release()
            self._wake.set()

    def _reschedule(self, key: Key, due: float) -> None:
        entry = self._entries.get(key)
        if entry is not None:
            entry.due = due
            self._schedule(key, due)

    def _resize(self, entry: _Entry[Any], value: Any) -> None:
        nbytes = self._kinds[entry.kind].coalescer.size(value)
        self._shrink(entry.nbytes - nbytes)
        entry.value, entry.nbytes = value, nbytes

    def _shrink(self, freed: int) -> None:
        self._bytes -= freed
        if freed > 0:
            self._refusing = False

    def _remove(self, key: Key, entry: _Entry[Any]) -> None:
        del self._entries[key]
        self._shrink(entry.nbytes)
        for _, waiter in entry.waiters:
            if not waiter.done():
                waiter.set_result(None)
        if not self._entries:
            self._idle.set()
