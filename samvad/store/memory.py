"""An in-memory Store with Firestore's semantics, for tests and for running without Firestore.

One MemoryStore may be shared by several services to play several instances over one database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from samvad.errors import StoreUnavailable
from samvad.store.base import (
    Change,
    ChangeBatch,
    Message,
    Profile,
    SessionRecord,
    StoreCounts,
    UserState,
    WipeReport,
    newest,
)


@dataclass
class _StoredProfile:
    created_us: int
    updated_us: int
    messages: dict[str, Message]
    version: int


class MemoryStore:
    def __init__(self) -> None:
        self._states: dict[str, UserState] = {}
        self._profiles: dict[str, _StoredProfile] = {}
        self._sessions: dict[str, SessionRecord] = {}
        self._wiped_users: dict[str, int] = {}
        self._deleted_sessions: dict[str, int] = {}
        self._log: list[Change] = []
        self._lock = asyncio.Lock()
        self.available = True  # tests flip this to play an outage

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("memory store switched off")

    async def get_state(self, user_id: str) -> UserState | None:
        self._check()
        return self._states.get(user_id)

    async def put_state(self, state: UserState) -> int | None:
        self._check()
        async with self._lock:
            current = self._states.get(state.user_id)
            if state.updated_us <= self._wiped_users.get(state.user_id, -1):
                return None
            if current is not None and current.updated_us >= state.updated_us:
                return None
            version = (current.version if current else 0) + 1
            self._states[state.user_id] = replace(state, version=version)
            self._log.append(Change("state", state.user_id, version))
            return version

    async def get_profile(self, user_id: str, cap: int) -> Profile | None:
        self._check()
        stored = self._profiles.get(user_id)
        if stored is None:
            return None
        return Profile(
            user_id=user_id,
            created_us=stored.created_us,
            updated_us=stored.updated_us,
            messages=newest(list(stored.messages.values()), cap),
            version=stored.version,
        )

    async def append_messages(
        self, user_id: str, messages: Sequence[Message], cap: int
    ) -> int | None:
        self._check()
        async with self._lock:
            wiped_at = self._wiped_users.get(user_id, -1)
            fresh = [m for m in messages if m.at_us > wiped_at]
            stored = self._profiles.get(user_id)
            if not fresh:
                return None
            first, last = min(m.at_us for m in fresh), max(m.at_us for m in fresh)
            if stored is None:
                stored = _StoredProfile(first, last, {}, 0)
                self._profiles[user_id] = stored
            stored.messages.update((m.id, m) for m in fresh)
            stored.messages = {m.id: m for m in newest(list(stored.messages.values()), cap)}
            stored.created_us = min(stored.created_us, first)
            stored.updated_us = max(stored.updated_us, last)
            stored.version += 1
            self._log.append(Change("profile", user_id, stored.version))
            return stored.version

    async def get_session(self, session_id: str) -> SessionRecord | None:
        self._check()
        return self._sessions.get(session_id)

    async def put_session(self, session: SessionRecord) -> int | None:
        self._check()
        async with self._lock:
            current = self._sessions.get(session.session_id)
            fence = max(
                self._wiped_users.get(session.user_id, -1),
                self._deleted_sessions.get(session.session_id, -1),
            )
            if session.updated_us <= fence:
                return None
            if current is not None and (
                current.updated_us >= session.updated_us or current.user_id != session.user_id
            ):
                return None
            version = (current.version if current else 0) + 1
            created = min(current.created_us, session.created_us) if current else session.created_us
            self._sessions[session.session_id] = replace(
                session, created_us=created, version=version
            )
            self._log.append(Change("session", session.session_id, version))
            return version

    async def active_sessions(self, user_id: str) -> list[SessionRecord]:
        self._check()
        return [s for s in self._sessions.values() if s.user_id == user_id and s.is_active]

    async def wipe_user(self, user_id: str, at_us: int) -> WipeReport:
        self._check()
        async with self._lock:
            self._wiped_users[user_id] = max(at_us, self._wiped_users.get(user_id, -1))
            had_state = self._states.pop(user_id, None) is not None
            had_profile = self._profiles.pop(user_id, None) is not None
            session_ids = [s.session_id for s in self._sessions.values() if s.user_id == user_id]
            for session_id in session_ids:
                del self._sessions[session_id]
            self._log.append(Change("user_wiped", user_id, at_us))
            return WipeReport(had_state, had_profile, session_ids)

    async def delete_session(self, session_id: str, at_us: int) -> SessionRecord | None:
        self._check()
        async with self._lock:
            fence = self._deleted_sessions.get(session_id, -1)
            self._deleted_sessions[session_id] = max(at_us, fence)
            removed = self._sessions.pop(session_id, None)
            self._log.append(Change("session_deleted", session_id, at_us))
            return removed

    async def counts(self) -> StoreCounts:
        self._check()
        active = [s for s in self._sessions.values() if s.is_active]
        return StoreCounts(
            active_sessions=len(active),
            active_users=len({s.user_id for s in active}),
            profiles=len(self._profiles),
        )

    async def changes_since(self, cursor: Any) -> ChangeBatch:
        self._check()
        start = len(self._log) if cursor is None else int(cursor)
        return ChangeBatch(changes=self._log[start:], cursor=len(self._log))

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        return None
