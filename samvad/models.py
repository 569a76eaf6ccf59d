"""Request and response bodies: pydantic models, camelCase on the wire (the design note's API)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", strict=True
    )


# ---- requests ---------------------------------------------------------------------------------


class AppendMessageRequest(WireModel):
    role: Literal["user", "assistant", "system"]
    content: str = Field(min_length=1)


class CreateSessionRequest(WireModel):
    session_id: str | None = None
    user_id: str
    language: str | None = Field(default=None, max_length=64)
    metadata: dict[str, Any] | None = None


class RefreshRequest(WireModel):
    user_id: str


# ---- responses --------------------------------------------------------------------------------


class Ok(WireModel):
    success: Literal[True] = True
    message: str | None = None
    durable: bool | None = Field(
        default=None, description="present when ?durable=true was asked: false if not yet stored"
    )


class ErrorResponse(WireModel):
    success: Literal[False] = False
    error: str


class StateSaved(Ok):
    user_id: str


class StateResponse(Ok):
    user_id: str
    state: dict[str, Any] = Field(
        description="the stored object, plus the server-set updatedAt and isActive"
    )


class MessageOut(WireModel):
    role: str
    content: str
    timestamp: str


class ProfileOut(WireModel):
    user_id: str
    conversation_history: list[MessageOut]
    preferences: dict[str, Any]
    history_length: int
    created_at: str
    last_updated: str


class ProfileResponse(Ok):
    user_id: str
    profile: ProfileOut


class MessageAppended(Ok):
    user_id: str
    timestamp: str


class SessionOut(WireModel):
    id: str
    user_id: str
    language: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    is_active: bool
    created_at: str
    last_activity: str
    ended_at: str | None = None


class SessionSaved(Ok):
    session_id: str
    user_id: str
    language: str | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    created: bool


class SessionResponse(Ok):
    session: SessionOut


class SessionEnded(Ok):
    session_id: str
    ended_at: str


class ActiveSessions(Ok):
    user_id: str
    count: int
    sessions: list[SessionOut]


class UserCleared(WireModel):
    user_state: bool
    user_profile: bool
    sessions: int
    interruptions: int


class UserRefreshed(Ok):
    user_id: str
    cleared: UserCleared


class SessionCleared(WireModel):
    session: bool
    interruptions: int


class SessionDeleted(Ok):
    session_id: str
    cleared: SessionCleared


class BacklogOut(WireModel):
    entries: int
    bytes: int
    oldest_age_seconds: float


class StatsOut(WireModel):
    active_users: int | None = Field(description="null: Firestore unreachable, never counted")
    active_sessions: int | None
    total_profiles: int | None
    total_interruptions: int = Field(description="held in memory on this instance")
    backlog: BacklogOut
    firestore_reachable: bool
    age_seconds: float | None = Field(description="how old the Firestore counts are")


class StatsResponse(Ok):
    stats: StatsOut


class ReadyOut(WireModel):
    ready: bool
    firestore_reachable: bool
    backlog: BacklogOut
    accepting_writes: bool
