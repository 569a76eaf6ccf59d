"""Firestore reachability as a circuit breaker, so no request waits on a store known to be down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable

from samvad.clock import monotonic
from samvad.errors import StoreUnavailable

log = logging.getLogger(__name__)


class StoreHealth:
    """Closed (reachable) until a retryable failure; then open until a background probe succeeds.

    While open, callers that need the store fail at once (fast 503s for cold reads) and the
    write-behind keeps its backlog; a prober pings with capped exponential backoff and full
    jitter, so many instances recovering at once do not stampede Firestore.
    """

    def __init__(
        self, ping: Callable[[], Awaitable[None]], retry_base: float, retry_max: float
    ) -> None:
        self._ping = ping
        self.retry_base = retry_base
        self.retry_max = retry_max
        self._reachable = True
        self._failures = 0
        self._since = monotonic()
        self._prober: asyncio.Task[None] | None = None
        self._recovered = asyncio.Event()
        self._recovered.set()
        self.last_error = ""

    @property
    def reachable(self) -> bool:
        return self._reachable

    @property
    def unreachable_for(self) -> float:
        return 0.0 if self._reachable else monotonic() - self._since

    def check(self) -> None:
        if not self._reachable:
            raise StoreUnavailable("storage is unreachable; retry shortly")

    def record_success(self) -> None:
        if not self._reachable:
            log.warning(
                "firestore reachable again",
                extra={"json_fields": {"downSeconds": round(self.unreachable_for, 3)}},
            )
        self._reachable = True
        self._failures = 0
        self._recovered.set()

    def record_failure(self, error: BaseException) -> None:
        self.last_error = str(error)
        if self._reachable:
            log.error("firestore unreachable", extra={"json_fields": {"error": self.last_error}})
            self._reachable = False
            self._since = monotonic()
            self._recovered.clear()
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe())

    def backoff(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        return random.uniform(0, min(self.retry_max, self.retry_base * 2**attempt))

    async def wait_reachable(self) -> None:
        await self._recovered.wait()

    async def _probe(self) -> None:
        while not self._reachable:
            self._failures += 1
            await asyncio.sleep(max(self.backoff(self._failures), self.retry_base / 2))
            try:
                await self._ping()
            except StoreUnavailable as exc:
                self.last_error = str(exc)
                continue
            except Exception as exc:  # an unexpected failure must not kill the prober
                self.last_error = str(exc)
                log.exception("firestore probe failed")
                continue
            self.record_success()

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._prober
