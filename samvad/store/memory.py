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
    Retention,
    SessionRecord,
    Snapshot,
    SnapshotInfo,
    StoreCounts,
    UserState,
    WipeReport,
    after_last_silence,
    newest,
)


@dataclass
class _StoredProfile:
    created_us: int
    updated_us: int
    messages: dict[str, Message]
    version: int
    reset_us: int = -1  # appends stamped at or before this were replaced by a restore


class MemoryStore:
    def __init__(self, retention: Retention | None = None) -> None:
        self._retention = retention or Retention()
        self._snapshots: dict[str, Snapshot] = {}
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
            stored = self._profiles.get(user_id)
            fence = max(self._wiped_users.get(user_id, -1), stored.reset_us if stored else -1)
            silence = int(self._retention.profile * 1_000_000)
            fresh = after_last_silence([m for m in messages if m.at_us > fence], silence)
            if not fresh:
                return None
            first, last = min(m.at_us for m in fresh), max(m.at_us for m in fresh)
            if stored is not None and self._retention.expired("profile", stored.updated_us, first):
                stored = None  # expired: what TTL has not deleted yet must not come back
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
            if current is not None and self._retention.expired(
                "session", current.last_activity_us, session.updated_us
            ):
                current = None
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

    async def list_sessions(
        self, user_id: str, limit: int, after: tuple[int, str] | None = None
    ) -> list[SessionRecord]:
        self._check()
        mine = sorted(
            (s for s in self._sessions.values() if s.user_id == user_id),
            key=lambda s: (s.last_activity_us, s.session_id),
            reverse=True,
        )
        if after is not None:
            mine = [s for s in mine if (s.last_activity_us, s.session_id) < after]
        return mine[:limit]

    async def replace_history(
        self, user_id: str, messages: Sequence[Message], at_us: int, cap: int
    ) -> int | None:
        self._check()
        async with self._lock:
            if at_us <= self._wiped_users.get(user_id, -1):
                return None
            stored = self._profiles.get(user_id)
            kept = newest(messages, cap)
            version = (stored.version if stored else 0) + 1
            created = min([m.at_us for m in kept] + ([stored.created_us] if stored else [at_us]))
            self._profiles[user_id] = _StoredProfile(
                created_us=created,
                updated_us=at_us,
                messages={m.id: m for m in kept},
                version=version,
                reset_us=at_us,
            )
            self._log.append(Change("profile", user_id, version))
            return version

    async def put_snapshot(self, snapshot: Snapshot, keep: int) -> list[str]:
        self._check()
        async with self._lock:
            self._snapshots[snapshot.info.snapshot_id] = snapshot
            mine = sorted(
                (
                    s.info
                    for s in self._snapshots.values()
                    if s.info.user_id == snapshot.info.user_id
                ),
                key=lambda i: (i.created_us, i.snapshot_id),
                reverse=True,
            )
            dropped = [i.snapshot_id for i in mine[keep:]]
            for snapshot_id in dropped:
                del self._snapshots[snapshot_id]
            return dropped

    async def list_snapshots(self, user_id: str) -> list[SnapshotInfo]:
        self._check()
        return sorted(
            (s.info for s in self._snapshots.values() if s.info.user_id == user_id),
            key=lambda i: (i.created_us, i.snapshot_id),
            reverse=True,
        )

    async def get_snapshot(self, user_id: str, snapshot_id: str) -> Snapshot | None:
        self._check()
        found = self._snapshots.get(snapshot_id)
        return found if found is not None and found.info.user_id == user_id else None

    async def delete_snapshot(self, user_id: str, snapshot_id: str) -> bool:
        self._check()
        async with self._lock:
            if await self.get_snapshot(user_id, snapshot_id) is None:
                return False
            del self._snapshots[snapshot_id]
            return True

    async def wipe_user(self, user_id: str, at_us: int) -> WipeReport:
        self._check()
        async with self._lock:
            self._wiped_users[user_id] = max(at_us, self._wiped_users.get(user_id, -1))
            had_state = self._states.pop(user_id, None) is not None
            had_profile = self._profiles.pop(user_id, None) is not None
            session_ids = [s.session_id for s in self._sessions.values() if s.user_id == user_id]
            for session_id in session_ids:
                del self._sessions[session_id]
            snapshot_ids = [k for k, v in self._snapshots.items() if v.info.user_id == user_id]
            for snapshot_id in snapshot_ids:
                del self._snapshots[snapshot_id]
            self._log.append(Change("user_wiped", user_id, at_us))
            return WipeReport(had_state, had_profile, session_ids, len(snapshot_ids))

    async def delete_session(self, session_id: str, at_us: int) -> SessionRecord | None:
        self._check()
        async with self._lock:
            fence = self._deleted_sessions.get(session_id, -1)
            self._deleted_sessions[session_id] = max(at_us, fence)
            removed = self._sessions.pop(session_id, None)
            self._log.append(Change("session_deleted", session_id, at_us))
            return removed

    async def counts(self, now_us: int, active_since_us: int) -> StoreCounts:
        self._check()
        active = [
            s
            for s in self._sessions.values()
            if s.is_active and s.last_activity_us >= active_since_us
        ]
        profiles = [
            p
            for p in self._profiles.values()
            if not self._retention.expired("profile", p.updated_us, now_us)
        ]
        return StoreCounts(
            active_sessions=len(active),
            active_users=len({s.user_id for s in active}),
            profiles=len(profiles),
        )

    async def changes_since(self, cursor: Any) -> ChangeBatch:
        self._check()
        start = len(self._log) if cursor is None else int(cursor)
        return ChangeBatch(changes=self._log[start:], cursor=len(self._log))

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        return None
