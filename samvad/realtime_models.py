"""Wire models of the agent websocket (/ws) and of the interruption endpoints, camelCase.

Client frames are validated with these on the server; server frames are built with them on the
server and parsed with them in samvad.client, so both ends share one definition of the protocol.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    TypeAdapter,
    model_serializer,
)

from samvad.models import MessageOut, Ok, WireModel

# A frame id is the client's own correlation token: echoed, never interpreted.
FrameId = Annotated[str, Field(max_length=128)] | int

# ---- interruptions --------------------------------------------------------------------------

_OPTIONAL_INTERRUPTION_FIELDS = frozenset({"content", "heard", "reason"})


class InterruptionIn(WireModel):
    """What an agent says about a barge-in. Other JSON fields are kept as they are."""

    model_config = ConfigDict(extra="allow")

    content: str | None = Field(default=None, description="what the user said when interrupting")
    heard: str | None = Field(default=None, description="what the user heard before interrupting")
    reason: str | None = None


class InterruptionOut(InterruptionIn):
    timestamp: str = Field(description="set by the server when the interruption was taken")

    @model_serializer(mode="wrap")
    def _only_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # The pushed fields are echoed as pushed: no null for a field that was never sent.
        data: dict[str, Any] = handler(self)
        return {
            k: v
            for k, v in data.items()
            if k not in _OPTIONAL_INTERRUPTION_FIELDS or k in self.model_fields_set
        }


class InterruptionPushed(Ok):
    session_id: str
    interruption: InterruptionOut


class InterruptionList(Ok):
    session_id: str
    count: int
    interruptions: list[InterruptionOut] = Field(description="the newest ones, oldest first")


# ---- client frames --------------------------------------------------------------------------


class ClientFrame(WireModel):
    id: FrameId | None = None


class MessageFrame(ClientFrame):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system"]
    content: str = Field(min_length=1)


class StateFrame(ClientFrame):
    type: Literal["state"] = "state"
    state: dict[str, Any]


class InterruptionFrame(InterruptionIn):
    id: FrameId | None = None
    type: Literal["interruption"] = "interruption"


class ContextRequest(ClientFrame):
    type: Literal["context"] = "context"


class PingFrame(ClientFrame):
    type: Literal["ping"] = "ping"


class EndFrame(ClientFrame):
    type: Literal["end"] = "end"


# ---- server frames --------------------------------------------------------------------------


class ReadyFrame(WireModel):
    type: Literal["ready"] = "ready"
    session_id: str
    user_id: str
    resumed: bool = Field(description="the session was active (or in its reconnect grace)")
    state: dict[str, Any] | None = Field(description="the user's state, null when none")
    history: list[MessageOut] = Field(description="the newest messages, oldest first")
    interruptions: list[InterruptionOut] = Field(description="the session's, oldest first")


# Answers echo the id of the frame they answer (null when it had none or it was unreadable).


class AckFrame(WireModel):
    type: Literal["ack"] = "ack"
    id: FrameId | None = None


class PongFrame(WireModel):
    type: Literal["pong"] = "pong"
    id: FrameId | None = None


class ErrorFrame(WireModel):
    type: Literal["error"] = "error"
    id: FrameId | None = None
    error: str


class ContextFrame(WireModel):
    type: Literal["context"] = "context"
    id: FrameId | None = None
    state: dict[str, Any] | None
    history: list[MessageOut]
    interruptions: list[InterruptionOut]


class MessageEvent(WireModel):
    type: Literal["event"] = "event"
    event: Literal["message"] = "message"
    message: MessageOut


class StateEvent(WireModel):
    type: Literal["event"] = "event"
    event: Literal["state"] = "state"
    state: dict[str, Any]


class WipedEvent(WireModel):
    """The user's data was wiped; the server closes the user's sockets right after this."""

    type: Literal["event"] = "event"
    event: Literal["wiped"] = "wiped"


class ContextEvent(WireModel):
    """A key of this session's context was set for all of the user's active sessions."""

    type: Literal["event"] = "event"
    event: Literal["context"] = "context"
    key: str
    value: Any
    context: dict[str, Any]


class RestoredEvent(WireModel):
    """The user's state and history were put back from a snapshot: re-read the context."""

    type: Literal["event"] = "event"
    event: Literal["restored"] = "restored"
    snapshot_id: str


EventFrame = Annotated[
    MessageEvent | StateEvent | WipedEvent | ContextEvent | RestoredEvent,
    Field(discriminator="event"),
]
EVENT_FRAMES = (MessageEvent, StateEvent, WipedEvent, ContextEvent, RestoredEvent)
AnyServerFrame = Annotated[
    ReadyFrame | AckFrame | PongFrame | ErrorFrame | ContextFrame | EventFrame,
    Field(discriminator="type"),
]
SERVER_FRAME: TypeAdapter[AnyServerFrame] = TypeAdapter(AnyServerFrame)
