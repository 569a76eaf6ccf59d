"""Per-user events of this instance (a message appended, the state changed, the user wiped).

Listeners are plain callables that must not block: a websocket connection puts the event on
its own bounded queue. Publishing never awaits, so a slow listener cannot slow a writer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Event:
    user_id: str
    kind: str  # "message" | "state" | "wiped" | "session" | "interruption"
    data: dict[str, Any] = field(default_factory=dict)
    origin: str | None = None  # the connection that caused it, so it is not echoed back


Listener = Callable[[Event], None]


class EventHub:
    def __init__(self) -> None:
        self._listeners: dict[str, set[Listener]] = {}

    def subscribe(self, user_id: str, listener: Listener) -> Callable[[], None]:
        self._listeners.setdefault(user_id, set()).add(listener)

        def unsubscribe() -> None:
            listeners = self._listeners.get(user_id)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[user_id]

        return unsubscribe

    def publish(self, event: Event) -> None:
        for listener in list(self._listeners.get(event.user_id, ())):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    def listened(self, user_id: str) -> bool:
        return user_id in self._listeners

    def listeners(self, user_id: str) -> int:
        return len(self._listeners.get(user_id, ()))
