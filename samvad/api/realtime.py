"""Agent websockets (/ws) and the interruption endpoints: parse, call the service, render.

Every socket has one writer task draining a bounded queue. Event listeners (called synchronously
by the service when anything of the user changes) only put a frame on that queue, so a slow
reader never slows a writer; a reader that falls a whole queue behind is closed instead of
growing memory. Interruption frames are handled without awaiting anything.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import BaseModel, ValidationError

from samvad.api import jsonio
from samvad.api.middlewares import prepare
from samvad.api.routes import SESSION_ID, read_object, render, service
from samvad.api.security import take_rate
from samvad.clock import iso_us, monotonic
from samvad.config import Settings
from samvad.errors import InvalidInput, NotFound, PayloadTooLarge, SamvadError, ShuttingDown
from samvad.events import Event
from samvad.ids import check_id, check_session_id, new_session_id
from samvad.interruptions import Interruption
from samvad.models import MessageOut
from samvad.realtime_models import (
    AckFrame,
    ContextEvent,
    ContextFrame,
    ContextRequest,
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    InterruptionIn,
    InterruptionList,
    InterruptionOut,
    InterruptionPushed,
    MessageEvent,
    MessageFrame,
    PingFrame,
    PongFrame,
    ReadyFrame,
    RestoredEvent,
    StateEvent,
    StateFrame,
    WipedEvent,
)
from samvad.service import SessionPersistenceService
from samvad.store.base import Message, UserState

log = logging.getLogger(__name__)

HISTORY_FRAMES = 100  # messages in a ready or context frame
SEND_QUEUE_FRAMES = 256  # frames a socket may be behind before it is closed as too slow
CONTEXT_READS = 4  # context requests of one socket in flight at once
CLOSE_TIMEOUT = 2.0  # seconds to flush and close before the transport is aborted
MAX_LANGUAGE = 64  # as CreateSessionRequest.language
MAX_FRAME_ID = 128

CLOSE_ENDED = WSCloseCode.OK
CLOSE_GOING_AWAY = WSCloseCode.GOING_AWAY
CLOSE_TOO_SLOW = WSCloseCode.TRY_AGAIN_LATER
CLOSE_WIPED = 4000

realtime_routes = web.RouteTableDef()


# ---- rendering ----------------------------------------------------------------------------------


def message_out(message: Message) -> MessageOut:
    return MessageOut(role=message.role, content=message.content, timestamp=iso_us(message.at_us))


def interruption_out(item: Interruption) -> InterruptionOut:
    return InterruptionOut.model_validate({**item.data, "timestamp": iso_us(item.at_us)})


def frame_json(frame: BaseModel) -> str:
    # Nulls stay: `"state": null` and an unset `"id": null` are part of the protocol.
    return frame.model_dump_json(by_alias=True)


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    return f"{where}: {first['msg']}" if where else first["msg"]


def interruption_fields(data: dict[str, Any], nbytes: int, limit: int) -> dict[str, Any]:
    """The fields to keep of a pushed interruption (already validated as InterruptionIn)."""
    if nbytes > limit:
        raise PayloadTooLarge(f"interruption is over {limit} bytes")
    if "timestamp" in data:
        raise InvalidInput("timestamp is set by the server")
    return data


def _echo_id(value: Any) -> str | int | None:
    """The frame's id if it is one the server can echo, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, str) and len(value) <= MAX_FRAME_ID):
        return value
    return None


@dataclass(frozen=True)
class Snapshot:
    state: UserState | None
    messages: tuple[Message, ...]
    interruptions: list[InterruptionOut]

    @property
    def state_data(self) -> dict[str, Any] | None:
        return self.state.data if self.state is not None else None

    @property
    def history(self) -> list[MessageOut]:
        return [message_out(m) for m in self.messages]


async def snapshot(svc: SessionPersistenceService, user_id: str, session_id: str) -> Snapshot:
    try:
        state: UserState | None = await svc.get_user_state(user_id)
    except NotFound:
        state = None
    try:
        messages = (await svc.get_user_profile(user_id)).messages[-HISTORY_FRAMES:]
    except NotFound:
        messages = ()
    interruptions = [interruption_out(i) for i in svc.interruptions.recent(session_id)]
    return Snapshot(state, messages, interruptions)


# ---- the connection registry --------------------------------------------------------------------


@dataclass
class _Grace:
    task: asyncio.Task[None]
    deadline: float  # loop time


class Connections:
    """The open agent sockets of this instance, and the grace timers of dropped sessions."""

    def __init__(self, svc: SessionPersistenceService, settings: Settings) -> None:
        self.service = svc
        self.settings = settings
        self.closing = False
        self._open: set[Connection] = set()
        self._by_session: dict[str, set[Connection]] = {}
        self._holders: dict[str, int] = {}  # sockets of a session open or being opened
        self._graces: dict[str, _Grace] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def __len__(self) -> int:
        return len(self._open)

    def attach(self, session_id: str) -> float | None:
        """Hold a session for a socket being opened, cancelling its grace timer: a resume.
        Returns the seconds that timer had left, to re-arm it if the socket never opens."""
        if self.closing:
            raise ShuttingDown()
        self._holders[session_id] = self._holders.get(session_id, 0) + 1
        grace = self._graces.pop(session_id, None)
        if grace is None:
            return None
        grace.task.cancel()
        return max(0.0, grace.deadline - asyncio.get_running_loop().time())

    def detach(self, session_id: str, grace: float | None) -> None:
        """Release a hold. The last one starts the session's grace timer unless `grace` is None
        (the session was ended or wiped, or the socket was refused before it touched it)."""
        left = self._holders[session_id] - 1
        if left:
            self._holders[session_id] = left
            return
        del self._holders[session_id]
        if grace is not None and not self.closing:
            self._arm(session_id, grace)

    def add(self, conn: Connection) -> None:
        self._open.add(conn)
        self._by_session.setdefault(conn.session_id, set()).add(conn)
        if self.closing:  # opened while the server was closing the others
            conn.close_soon(CLOSE_GOING_AWAY, "going away")

    def remove(self, conn: Connection) -> None:
        self._open.discard(conn)
        peers = self._by_session.get(conn.session_id)
        if peers is not None:
            peers.discard(conn)
            if not peers:
                del self._by_session[conn.session_id]

    def of_session(self, session_id: str) -> list[Connection]:
        return list(self._by_session.get(session_id, ()))

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task that outlives the connection that started it, held here until it is done."""
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def in_grace(self, session_id: str) -> bool:
        return session_id in self._graces

    def _arm(self, session_id: str, delay: float) -> None:
        loop = asyncio.get_running_loop()
        dropped_us = self.service.now_us()
        task = loop.create_task(self._expire(session_id, delay, dropped_us), name="ws-grace")
        self._graces[session_id] = _Grace(task, loop.time() + delay)

    async def _expire(self, session_id: str, delay: float, dropped_us: int) -> None:
        await asyncio.sleep(delay)
        self._graces.pop(session_id, None)
        try:
            record = await self.service.get_session(session_id)
            # A reconnect through another instance saved the session after the drop: it is
            # in use there (seen here once the change feed has caught up).
            if record.is_active and record.last_activity_us <= dropped_us:
                await self.service.end_session(session_id)
                log.info("session ended after its reconnect grace")
        except NotFound:
            pass  # deleted or wiped meanwhile
        except SamvadError as exc:
            log.warning(
                "could not end a session after its reconnect grace",
                extra={"json_fields": {"error": exc.message}},
            )

    def cancel_graces(self) -> None:
        for grace in self._graces.values():
            grace.task.cancel()
        self._graces.clear()

    async def close_all(self, code: int, reason: str) -> None:
        """Close every socket (sessions stay active for a reconnect elsewhere) and stop timers."""
        self.closing = True
        self.cancel_graces()
        await asyncio.gather(
            *(conn.close(code, reason) for conn in list(self._open)), return_exceptions=True
        )


CONNECTIONS = web.AppKey("connections", Connections)


# ---- one socket ---------------------------------------------------------------------------------


class Connection:
    def __init__(
        self,
        hub: Connections,
        request: web.Request,
        ws: web.WebSocketResponse,
        user_id: str,
        session_id: str,
    ) -> None:
        self.hub = hub
        self.request = request
        self.ws = ws
        self.user_id = user_id
        self.session_id = session_id
        self.id = f"ws_{secrets.token_hex(6)}"
        self.closing = False
        self.ended = False  # the session was ended or the user wiped: no reconnect grace
        self.frames = 0
        self.close_code: int | None = None  # the code the server closed with, if it did
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=SEND_QUEUE_FRAMES)
        self._early: list[Event] | None = []  # events that came before the ready frame
        self._unsubscribe: Callable[[], None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._reads: set[asyncio.Task[None]] = set()

    @property
    def service(self) -> SessionPersistenceService:
        return self.hub.service

    # ---- lifecycle ----------------------------------------------------------------------------

    def subscribe(self) -> None:
        """Listen before the ready snapshot is read, so nothing between the two is missed."""
        self._unsubscribe = self.service.events.subscribe(self.user_id, self._on_event)

    def start(self, ready: ReadyFrame, snap: Snapshot) -> None:
        """Send the ready frame, then what happened since the snapshot, then everything else."""
        self.send(ready)
        early, self._early = self._early or [], None
        newest_us = snap.messages[-1].at_us if snap.messages else 0
        state_us = snap.state.updated_us if snap.state is not None else 0
        for event in early:
            if event.kind == "message" and event.data["message"].at_us <= newest_us:
                continue  # already in the ready frame's history
            if event.kind == "state" and event.data.get("updatedUs", 0) <= state_us:
                continue
            self._on_event(event)
        self._writer = asyncio.get_running_loop().create_task(self._write(), name="ws-writer")

    async def serve(self) -> None:
        async for msg in self.ws:
            if msg.type is WSMsgType.TEXT:
                await self.on_text(msg.data)
            elif msg.type is WSMsgType.BINARY:
                self.error(None, "binary frames are not supported: send JSON text frames")
            else:  # ERROR: a protocol error or a frame over max_msg_size; aiohttp closes
                break

    def finish(self) -> None:
        """Forget the socket, at once: no await, so a cancelled handler still runs all of it."""
        self.closing = True
        if self._unsubscribe is not None:
            self._unsubscribe()
        self.hub.remove(self)
        for task in self._reads:
            task.cancel()
        if self._closer is None and self._writer is not None:
            self._writer.cancel()

    async def wait_closed(self) -> None:
        """Until the writer and any close under way are done (bounded by CLOSE_TIMEOUT)."""
        tasks = {t for t in (self._closer, self._writer) if t is not None}
        if tasks:
            await asyncio.wait(tasks)

    def close_soon(self, code: int, reason: str, flush: bool = True) -> None:
        """Close from any task: after the queued frames (if `flush`), with `code`. The close
        runs in a task of its own, so that the handler ending does not cut it short."""
        if self.closing:
            return
        self.closing = True
        self.close_code = code
        self._closer = self.hub.spawn(self._close(code, reason, flush), "ws-close")

    async def close(self, code: int, reason: str) -> None:
        self.close_soon(code, reason)
        if self._closer is not None:
            await asyncio.wait({self._closer})

    async def _close(self, code: int, reason: str, flush: bool) -> None:
        if self._writer is not None:
            if flush:  # until the queue is sent, the writer dies or the time is up
                joined = asyncio.ensure_future(self.queue.join())
                await asyncio.wait(
                    {joined, self._writer},
                    timeout=CLOSE_TIMEOUT,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                joined.cancel()
            self._writer.cancel()
            await asyncio.wait({self._writer})
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code=code, message=reason.encode())
        except TimeoutError:
            self._abort()  # a peer that reads nothing must not hold the socket open
        except Exception:
            log.exception("websocket close failed")
            self._abort()

    def _abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def _write(self) -> None:
        try:
            while True:
                text = await self.queue.get()
                await self.ws.send_str(text)
                self.queue.task_done()
        except (ConnectionError, RuntimeError):
            pass  # the peer is gone: the reader sees it too and ends the connection

    # ---- outgoing -----------------------------------------------------------------------------

    def send(self, frame: BaseModel) -> None:
        if self.closing:
            return
        try:
            self.queue.put_nowait(frame_json(frame))
        except asyncio.QueueFull:
            log.warning(
                "websocket reader too slow: closing it",
                extra={"json_fields": {"connection": self.id, "queued": self.queue.qsize()}},
            )
            self.close_soon(CLOSE_TOO_SLOW, "too slow to read: reconnect to resume", flush=False)

    def error(self, frame_id: str | int | None, message: str) -> None:
        self.send(ErrorFrame(id=frame_id, error=message))

    def _on_event(self, event: Event) -> None:
        if event.origin == self.id or self.closing:
            return
        if self._early is not None:
            self._early.append(event)
            return
        if event.kind == "message":
            self.send(MessageEvent(message=message_out(event.data["message"])))
        elif event.kind == "state":
            self.send(StateEvent(state=event.data["state"]))
        elif event.kind == "context" and self.session_id in event.data["sessionIds"]:
            self.send(
                ContextEvent(
                    key=event.data["key"],
                    value=event.data["value"],
                    context=event.data["contexts"].get(self.session_id, {}),
                )
            )
        elif event.kind == "restored":
            self.send(RestoredEvent(snapshot_id=event.data["snapshotId"]))
        elif event.kind == "wiped":
            self.ended = True
            self.send(WipedEvent())
            self.close_soon(CLOSE_WIPED, "user data wiped")

    # ---- incoming -----------------------------------------------------------------------------

    async def on_text(self, text: str) -> None:
        """Handle one text frame. Answers go on the queue; nothing here awaits I/O except
        `end` (and `context`, which runs in a task of its own)."""
        if self.closing:
            return
        self.frames += 1
        limit = self.hub.settings.ws_max_frame_bytes
        nbytes = len(text) if text.isascii() else len(text.encode())
        if nbytes > limit:
            self.error(None, f"frame is over {limit} bytes")
            return
        try:
            data = jsonio.loads(text)
        except ValueError:
            self.error(None, "frame is not valid JSON")
            return
        if not isinstance(data, dict):
            self.error(None, "frame must be a JSON object")
            return
        frame_id = _echo_id(data.get("id"))
        kind = data.get("type")
        entry = _FRAMES.get(kind) if isinstance(kind, str) else None
        if entry is None:
            self.error(frame_id, f"type must be one of: {', '.join(_FRAMES)}")
            return
        if jsonio.too_deep(text, data):
            self.error(frame_id, f"frame is nested deeper than {jsonio.MAX_JSON_DEPTH} levels")
            return
        model, handle = entry
        try:
            frame = model.model_validate(data)
        except ValidationError as exc:
            self.error(frame_id, _first_error(exc))
            return
        try:
            await handle(self, frame, data, nbytes)
        except SamvadError as exc:
            self.error(frame_id, exc.message)
        except Exception:
            log.exception("websocket frame failed", extra={"json_fields": {"type": kind}})
            self.error(frame_id, "internal error")

    async def _message(self, frame: MessageFrame, data: dict[str, Any], size: int) -> None:
        take_rate(self.request, "append")  # the REST appends' limit: RateLimited is a 429 error
        await self.service.append_to_user_history(
            self.user_id, frame.role, frame.content, origin=self.id
        )
        self.send(AckFrame(id=frame.id))

    async def _state(self, frame: StateFrame, data: dict[str, Any], size: int) -> None:
        await self.service.save_user_state(self.user_id, frame.state, origin=self.id)
        self.send(AckFrame(id=frame.id))

    async def _interruption(
        self, frame: InterruptionFrame, data: dict[str, Any], size: int
    ) -> None:
        fields = {k: v for k, v in data.items() if k != "type" and k != "id"}
        limit = self.hub.settings.max_message_bytes
        self.service.push_interruption(
            self.session_id, self.user_id, interruption_fields(fields, size, limit)
        )
        self.send(AckFrame(id=frame.id))

    async def _context(self, frame: ContextRequest, data: dict[str, Any], size: int) -> None:
        if len(self._reads) >= CONTEXT_READS:
            raise InvalidInput(f"at most {CONTEXT_READS} context requests may be in flight")
        self._spawn_read(lambda: self._send_context(frame.id))

    async def _send_context(self, frame_id: str | int | None) -> None:
        try:
            snap = await snapshot(self.service, self.user_id, self.session_id)
        except SamvadError as exc:
            self.error(frame_id, exc.message)
            return
        self.send(
            ContextFrame(
                id=frame_id,
                state=snap.state_data,
                history=snap.history,
                interruptions=snap.interruptions,
            )
        )

    def _spawn_read(self, read: Callable[[], Awaitable[None]]) -> None:
        async def run() -> None:
            try:
                await read()
            except SamvadError as exc:
                log.warning("websocket read failed", extra={"json_fields": {"error": exc.message}})

        task = asyncio.get_running_loop().create_task(run(), name="ws-read")
        self._reads.add(task)
        task.add_done_callback(self._reads.discard)

    async def _ping(self, frame: PingFrame, data: dict[str, Any], size: int) -> None:
        self.send(PongFrame(id=frame.id))

    async def _end(self, frame: EndFrame, data: dict[str, Any], size: int) -> None:
        await self.service.end_session(self.session_id)
        self.ended = True
        self.send(AckFrame(id=frame.id))
        for peer in self.hub.of_session(self.session_id):
            if peer is not self:
                peer.ended = True
                peer.close_soon(CLOSE_ENDED, "session ended")
        self.close_soon(CLOSE_ENDED, "session ended")


_FRAMES: dict[str, tuple[type[BaseModel], Callable[..., Awaitable[None]]]] = {
    "message": (MessageFrame, Connection._message),
    "state": (StateFrame, Connection._state),
    "interruption": (InterruptionFrame, Connection._interruption),
    "context": (ContextRequest, Connection._context),
    "ping": (PingFrame, Connection._ping),
    "end": (EndFrame, Connection._end),
}


# ---- the websocket route ------------------------------------------------------------------------


def _query_id(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is None:
        return None
    return check_session_id(value) if name == "sessionId" else check_id(name, value)


def _query_text(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and len(value) > MAX_LANGUAGE:
        raise InvalidInput(f"{name} must be at most {MAX_LANGUAGE} characters")
    return value


async def _leave(svc: SessionPersistenceService, session_id: str, connection_id: str) -> None:
    try:
        await svc.leave_session(session_id, connection_id)
    except SamvadError as exc:
        # Shutting down or Firestore away: the participant's leftAt is the one thing lost.
        log.info("leave not recorded", extra={"json_fields": {"reason": exc.message}})


@realtime_routes.get("/ws")
async def agent_socket(request: web.Request) -> web.StreamResponse:
    user_id = _query_id(request, "userId")
    if user_id is None:
        raise InvalidInput("userId is required")
    session_id = _query_id(request, "sessionId") or new_session_id()
    language = request.query.get("language")
    if language is not None and len(language) > MAX_LANGUAGE:
        raise InvalidInput(f"language must be at most {MAX_LANGUAGE} characters")
    settings = request.app[CONNECTIONS].settings
    ws = web.WebSocketResponse(
        heartbeat=settings.ws_heartbeat,
        # Frames up to twice the limit are read and refused with an error frame; only larger
        # ones make aiohttp close the socket (1009), which bounds what one frame can cost.
        max_msg_size=2 * settings.ws_max_frame_bytes,
    )
    if not ws.can_prepare(request).ok:
        raise InvalidInput("this endpoint takes websocket upgrades only")

    hub = request.app[CONNECTIONS]
    svc = service(request)
    conn = Connection(hub, request, ws, user_id, session_id)
    grace = hub.attach(session_id)
    opened_at: float | None = None
    joined = False
    try:
        conn.subscribe()
        try:
            existing = await svc.get_session(session_id)
        except NotFound:
            existing = None
        resumed = existing is not None and existing.is_active
        await svc.save_session(session_id, user_id, language)
        await svc.join_session(
            session_id,
            conn.id,
            device_id=_query_text(request, "deviceId"),
            platform=_query_text(request, "platform"),
        )
        joined = True
        grace = settings.ws_resume_grace  # from here, a drop leaves it active for a reconnect
        snap = await snapshot(svc, user_id, session_id)
        await prepare(request, ws)
        conn.start(
            ReadyFrame(
                session_id=session_id,
                user_id=user_id,
                resumed=resumed,
                state=snap.state_data,
                history=snap.history,
                interruptions=snap.interruptions,
            ),
            snap,
        )
        hub.add(conn)
        opened_at = monotonic()
        log.info(
            "websocket open",
            extra={"json_fields": {"connection": conn.id, "resumed": resumed, "open": len(hub)}},
        )
        await conn.serve()
    finally:
        # Runs to the end even when the handler is cancelled (a lost connection may cancel
        # it at any await): everything that must happen comes before the one await.
        conn.finish()
        hub.detach(session_id, None if conn.ended else grace)
        if joined:
            hub.spawn(_leave(svc, session_id, conn.id), "leave")
        if opened_at is not None:
            log.info(
                "websocket closed",
                extra={
                    "json_fields": {
                        "connection": conn.id,
                        "code": conn.close_code or ws.close_code,
                        "by": "server" if conn.close_code else "client",
                        "frames": conn.frames,
                        "seconds": round(monotonic() - opened_at, 3),
                        "ended": conn.ended,
                    }
                },
            )
        await conn.wait_closed()
    return ws


# ---- interruptions over REST ---------------------------------------------------------------------


@realtime_routes.post("/api/session/" + SESSION_ID + "/interruptions")
async def push_interruption(request: web.Request) -> web.Response:
    session_id = request.match_info["sessionId"]
    svc = service(request)
    data = await read_object(request)
    try:
        InterruptionIn.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput(_first_error(exc)) from None
    fields = interruption_fields(data, len(await request.read()), svc.settings.max_message_bytes)
    record = await svc.get_session(session_id)
    item = svc.push_interruption(session_id, record.user_id, fields)
    out = InterruptionPushed(session_id=session_id, interruption=interruption_out(item))
    return render(out, 201)


@realtime_routes.get("/api/session/" + SESSION_ID + "/interruptions")
async def list_interruptions(request: web.Request) -> web.Response:
    session_id = request.match_info["sessionId"]
    svc = service(request)
    await svc.get_session(session_id)  # 404 for a session that does not exist
    items = [interruption_out(i) for i in svc.interruptions.recent(session_id)]
    return render(InterruptionList(session_id=session_id, count=len(items), interruptions=items))
