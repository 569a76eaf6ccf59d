"""Typed keys of what the app factory keeps on the application."""

from __future__ import annotations

from aiohttp import web

from samvad.config import Settings
from samvad.service import SessionPersistenceService

SETTINGS = web.AppKey("settings", Settings)
SERVICE = web.AppKey("service", SessionPersistenceService)
