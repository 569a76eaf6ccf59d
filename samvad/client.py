"""Async clients of a samvad server: `SamvadClient` (REST) and `AgentConnection` (/ws).

    async with SamvadClient("http://127.0.0.1:8080") as api:
        await api.append_message("u1", "user", "hello")

    async with AgentConnection("http://127.0.0.1:8080", "u1") as conn:
        print(conn.ready.session_id, conn.ready.resumed)
        await conn.send_message("user", "hello")
        await conn.interrupt(heard="Sure, the weather in", content="no, in Pune")
        async for event in conn.events():
            ...

Answers are the pydantic models of samvad.models and samvad.realtime_models.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Self, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ValidationError
from yarl import URL

from samvad.models import (
    ActiveSessions,
    MessageAppended,
    ProfileResponse,
    ReadyOut,
    SessionDeleted,
    SessionEnded,
    SessionResponse,
    SessionSaved,
    StateResponse,
    StateSaved,
    StatsResponse,
    UserRefreshed,
)
from samvad.realtime_models import (
    EVENT_FRAMES,
    SERVER_FRAME,
    AckFrame,
    AnyServerFrame,
    ContextFrame,
    ErrorFrame,
    EventFrame,
    InterruptionList,
    InterruptionPushed,
    PongFrame,
    ReadyFrame,
)

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
API = "/api/session"


class SamvadAPIError(Exception):
    """The server answered `{"success": false, "error": ...}` (or refused a websocket)."""

    def __init__(self, status: int, error: str) -> None:
        super().__init__(f"{status}: {error}")
        self.status = status
        self.error = error


class SamvadFrameError(Exception):
    """The server answered a websocket frame with an error frame; the socket stays open."""

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class ConnectionClosed(Exception):
    """The websocket closed before the answer came (`code` and `reason` as the server sent)."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"websocket closed ({code}): {reason}" if reason else f"closed ({code})")
        self.code = code
        self.reason = reason


def _path(*parts: str) -> str:
    return "/".join(quote(part, safe="") for part in parts)


def _durable(durable: bool) -> dict[str, str]:
    return {"durable": "true"} if durable else {}


class SamvadClient:
    """One method per REST endpoint. Uses `session` if given (and leaves it open)."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        body: Any = None,
        params: dict[str, str] | None = None,
    ) -> M:
        url = URL(self.base_url + path, encoded=True)
        async with self.session.request(method, url, json=body, params=params) as resp:
            raw = await resp.read()
            status = resp.status
        try:
            data = json.loads(raw)
        except ValueError:
            raise SamvadAPIError(status, f"not a JSON answer (HTTP {status})") from None
        if isinstance(data, dict) and data.get("success") is False:
            raise SamvadAPIError(status, str(data.get("error", "")))
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise SamvadAPIError(status, f"unexpected answer: {exc.errors()[0]['msg']}") from None

    # ---- health -------------------------------------------------------------------------------

    async def healthz(self) -> bool:
        url = URL(self.base_url + "/healthz", encoded=True)
        async with self.session.get(url) as resp:
            return resp.status == 200

    async def readyz(self) -> ReadyOut:
        """Whether the server takes writes (a 503 answer is returned too, with ready false)."""
        return await self._call("GET", "/readyz", ReadyOut)

    async def stats(self) -> StatsResponse:
        return await self._call("GET", f"{API}/stats", StatsResponse)

    # ---- sessions -----------------------------------------------------------------------------

    async def create_session(
        self,
        user_id: str,
        session_id: str | None = None,
        language: str | None = None,
        metadata: dict[str, Any] | None = None,
        durable: bool = False,
    ) -> SessionSaved:
        body: dict[str, Any] = {"userId": user_id}
        if session_id is not None:
            body["sessionId"] = session_id
        if language is not None:
            body["language"] = language
        if metadata is not None:
            body["metadata"] = metadata
        return await self._call("POST", f"{API}/create", SessionSaved, body, _durable(durable))

    async def get_session(self, session_id: str) -> SessionResponse:
        return await self._call("GET", f"{API}/{_path(session_id)}", SessionResponse)

    async def end_session(self, session_id: str, durable: bool = False) -> SessionEnded:
        path = f"{API}/{_path(session_id)}/end"
        return await self._call("PUT", path, SessionEnded, params=_durable(durable))

    async def delete_session(self, session_id: str) -> SessionDeleted:
        return await self._call("DELETE", f"{API}/{_path(session_id)}", SessionDeleted)

    async def active_sessions(self, user_id: str) -> ActiveSessions:
        return await self._call("GET", f"{API}/user/{_path(user_id)}/active", ActiveSessions)

    # ---- users --------------------------------------------------------------------------------

    async def save_state(
        self, user_id: str, state: dict[str, Any], durable: bool = False
    ) -> StateSaved:
        path = f"{API}/{_path(user_id)}/state"
        return await self._call("POST", path, StateSaved, state, _durable(durable))

    async def get_state(self, user_id: str) -> StateResponse:
        return await self._call("GET", f"{API}/{_path(user_id)}/state", StateResponse)

    async def get_profile(self, user_id: str) -> ProfileResponse:
        return await self._call("GET", f"{API}/{_path(user_id)}/profile", ProfileResponse)

    async def append_message(
        self, user_id: str, role: str, content: str, durable: bool = False
    ) -> MessageAppended:
        path = f"{API}/{_path(user_id)}/history"
        body = {"role": role, "content": content}
        return await self._call("POST", path, MessageAppended, body, _durable(durable))

    async def refresh_user(self, user_id: str) -> UserRefreshed:
        """Wipe everything of the user (state, history, sessions, interruptions)."""
        return await self._call("POST", f"{API}/refresh", UserRefreshed, {"userId": user_id})

    # ---- interruptions ------------------------------------------------------------------------

    async def push_interruption(self, session_id: str, **fields: Any) -> InterruptionPushed:
        path = f"{API}/{_path(session_id)}/interruptions"
        return await self._call("POST", path, InterruptionPushed, fields)

    async def interruptions(self, session_id: str) -> InterruptionList:
        path = f"{API}/{_path(session_id)}/interruptions"
        return await self._call("GET", path, InterruptionList)


_CLOSED: Any = object()


class AgentConnection:
    """An agent's websocket: `ready` once entered, requests answered by id, events on the side.

    Leaving the `async with` without `end()` drops the connection: the session stays active
    for the server's reconnect grace, and `AgentConnection(..., session_id=...)` resumes it.
    """

    def __init__(
        self,
        base_url: str,
        user_id: str,
        session_id: str | None = None,
        language: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 10.0,
        max_events: int = 1000,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.user_id = user_id
        self.session_id = session_id
        self.language = language
        self.timeout = timeout
        self.close_code: int | None = None
        self.close_reason = ""
        self.dropped_events = 0
        self._session = session
        self._owns_session = session is None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._ready: ReadyFrame | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[AnyServerFrame]] = {}
        # Bounded: if nobody reads events, the oldest are dropped (counted), never the acks.
        self._events: asyncio.Queue[Any] = asyncio.Queue(maxsize=max_events)
        self._reader: asyncio.Task[None] | None = None

    @property
    def ready(self) -> ReadyFrame:
        if self._ready is None:
            raise RuntimeError("not connected: use `async with AgentConnection(...)`")
        return self._ready

    @property
    def closed(self) -> bool:
        return self._ws is None or self._ws.closed

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def connect(self) -> ReadyFrame:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        params = {"userId": self.user_id}
        if self.session_id is not None:
            params["sessionId"] = self.session_id
        if self.language is not None:
            params["language"] = self.language
        try:
            self._ws = await self._session.ws_connect(
                URL(self.base_url + "/ws", encoded=True), params=params, timeout=self._ws_timeout()
            )
        except aiohttp.WSServerHandshakeError as exc:
            await self._close_session()
            raise SamvadAPIError(exc.status, exc.message) from None
        first = await self._ws.receive(timeout=self.timeout)
        if first.type is not aiohttp.WSMsgType.TEXT:
            await self.close()
            raise ConnectionClosed(self._ws.close_code, "closed before the ready frame")
        ready = SERVER_FRAME.validate_json(first.data)
        if not isinstance(ready, ReadyFrame):
            await self.close()
            raise ConnectionClosed(self._ws.close_code, f"expected ready, got {ready.type}")
        self._ready = ready
        self.session_id = ready.session_id
        self._reader = asyncio.get_running_loop().create_task(self._read(), name="agent-reader")
        return ready

    def _ws_timeout(self) -> aiohttp.ClientWSTimeout:
        return aiohttp.ClientWSTimeout(ws_receive=None, ws_close=self.timeout)

    async def close(self) -> None:
        """Close without ending the session (it can be resumed within the grace period)."""
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        await self._close_session()

    async def _close_session(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # ---- requests -----------------------------------------------------------------------------

    async def request(self, frame: dict[str, Any]) -> AnyServerFrame:
        """Send a frame with a fresh id and wait for the answer with that id."""
        if self._ws is None or self._ws.closed:
            raise ConnectionClosed(self.close_code, self.close_reason or "not connected")
        frame_id = next(self._ids)
        waiter: asyncio.Future[AnyServerFrame] = asyncio.get_running_loop().create_future()
        self._pending[frame_id] = waiter
        try:
            await self._ws.send_str(json.dumps({**frame, "id": frame_id}))
            async with asyncio.timeout(self.timeout):
                answer = await waiter
        finally:
            self._pending.pop(frame_id, None)
        if isinstance(answer, ErrorFrame):
            raise SamvadFrameError(answer.error)
        return answer

    async def send_message(self, role: str, content: str) -> None:
        await self.request({"type": "message", "role": role, "content": content})

    async def set_state(self, state: dict[str, Any]) -> None:
        await self.request({"type": "state", "state": state})

    async def interrupt(self, **fields: Any) -> None:
        """Record a barge-in: e.g. `heard=` what was played, `content=` what the user said."""
        await self.request({**fields, "type": "interruption"})

    async def context(self) -> ContextFrame:
        answer = await self.request({"type": "context"})
        assert isinstance(answer, ContextFrame)
        return answer

    async def ping(self) -> float:
        """Round trip through the server's frame handling, in seconds."""
        started = time.perf_counter()
        answer = await self.request({"type": "ping"})
        assert isinstance(answer, PongFrame)
        return time.perf_counter() - started

    async def end(self) -> None:
        """End the session; the server then closes the socket (1000)."""
        answer = await self.request({"type": "end"})
        assert isinstance(answer, AckFrame)
        if self._reader is not None:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(self._reader)

    # ---- events -------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[EventFrame]:
        """Event frames (other devices' messages, state changes, a wipe) until the socket closes."""
        while True:
            item = await self._events.get()
            if item is _CLOSED:
                self._events.put_nowait(_CLOSED)  # later iterators end too
                return
            yield item

    async def next_event(self) -> EventFrame:
        """The next event frame, waiting at most `timeout` seconds."""
        async with asyncio.timeout(self.timeout):
            async for event in self.events():
                return event
        raise ConnectionClosed(self.close_code, self.close_reason)

    def _offer(self, item: Any) -> None:
        if self._events.full():
            self._events.get_nowait()
            self.dropped_events += 1
        self._events.put_nowait(item)

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            while True:
                msg = await self._ws.receive()
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._dispatch(msg.data)
                elif msg.type is aiohttp.WSMsgType.CLOSE:
                    self.close_reason = msg.extra or ""
                    break
                elif msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                    break
                elif msg.type is aiohttp.WSMsgType.ERROR:
                    self.close_reason = str(msg.data)
                    break
        finally:
            if self._ws.close_code is None and not self._ws.closed:
                await self._ws.close()
            self.close_code = self._ws.close_code
            for waiter in self._pending.values():
                if not waiter.done():
                    waiter.set_exception(ConnectionClosed(self.close_code, self.close_reason))
            self._offer(_CLOSED)

    def _dispatch(self, text: str) -> None:
        try:
            frame = SERVER_FRAME.validate_json(text)
        except ValidationError:
            log.warning("unexpected frame from the server")
            return
        if isinstance(frame, EVENT_FRAMES):
            self._offer(frame)
            return
        frame_id = getattr(frame, "id", None)
        waiter = self._pending.get(frame_id) if isinstance(frame_id, int) else None
        if waiter is not None and not waiter.done():
            waiter.set_result(frame)
        elif isinstance(frame, ErrorFrame):
            log.warning(
                "error frame from the server", extra={"json_fields": {"error": frame.error}}
            )
