"""Interruption (barge-in) context: in memory only, by design, for zero-lag access."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Interruption:
    data: dict[str, Any]
    at_us: int


class InterruptionContextManager:
    """The newest `keep` interruptions of each session, and whose session it is.

    Nothing here awaits: a push is a deque append, so an agent's barge-in never waits on I/O.
    """

    def __init__(self, keep: int = 3) -> None:
        self._keep = keep
        self._by_session: dict[str, deque[Interruption]] = {}
        self._owner: dict[str, str] = {}
        self._sessions_of: dict[str, set[str]] = {}
        self._held = 0

    def push(self, session_id: str, user_id: str, data: dict[str, Any], at_us: int) -> Interruption:
        stack = self._by_session.get(session_id)
        if stack is None:
            stack = self._by_session[session_id] = deque(maxlen=self._keep)
            self._owner[session_id] = user_id
            self._sessions_of.setdefault(user_id, set()).add(session_id)
        if len(stack) < self._keep:
            self._held += 1
        item = Interruption(data=data, at_us=at_us)
        stack.append(item)
        return item

    def recent(self, session_id: str) -> list[Interruption]:
        """Oldest first."""
        return list(self._by_session.get(session_id, ()))

    def clear_session(self, session_id: str, before_us: int | None = None) -> int:
        """Drop the session's interruptions (only those stamped at or before `before_us`)."""
        stack = self._by_session.get(session_id)
        if stack is None:
            return 0
        kept = [i for i in stack if before_us is not None and i.at_us > before_us]
        removed = len(stack) - len(kept)
        self._held -= removed
        if kept:
            stack.clear()
            stack.extend(kept)
            return removed
        del self._by_session[session_id]
        owner = self._owner.pop(session_id)
        sessions = self._sessions_of.get(owner)
        if sessions is not None:
            sessions.discard(session_id)
            if not sessions:
                del self._sessions_of[owner]
        return removed

    def clear_user(self, user_id: str, before_us: int | None = None) -> int:
        sessions = list(self._sessions_of.get(user_id, ()))
        return sum(self.clear_session(s, before_us) for s in sessions)

    def of_user(self, user_id: str) -> dict[str, list[Interruption]]:
        return {sid: self.recent(sid) for sid in sorted(self._sessions_of.get(user_id, ()))}

    @property
    def total(self) -> int:
        return self._held
