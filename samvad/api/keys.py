"""Typed keys of what the app factory keeps on the application."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from samvad.config import Settings
from samvad.service import SessionPersistenceService

SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", SessionPersistenceService)

# Sets headers on a response before it goes out (security headers, CORS): the edge runs them on
# every answer it returns; handlers that prepare a response themselves (streams, websockets)
# through samvad.api.middlewares.prepare.
HeaderHook = Callable[[web.Request, web.StreamResponse], None]
RESPONSE_HEADERS: web.AppKey[list[HeaderHook]] = web.AppKey("response_headers")
