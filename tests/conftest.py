"""Shared fixtures: one Firestore emulator process per test session, a fresh project per test."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from samvad.app import create_app
from samvad.config import Settings
from samvad.emulator import EmulatorError, FirestoreEmulator

# Short windows so that tests see flushes and cross-instance changes quickly.
FAST: dict[str, Any] = {
    "auth": "none",  # tests/test_auth.py turns it on
    "flush_delay": 0.02,
    "flush_interval": 0.1,
    "sync_interval": 0.2,
    "stats_ttl": 0.5,
    "retry_base": 0.05,
    "retry_max": 0.5,
    "store_timeout": 3.0,
    "shutdown_flush_budget": 5.0,
}


@pytest.fixture(scope="session")
def emulator() -> Iterator[FirestoreEmulator | None]:
    """Google's emulator on a free port; or the one FIRESTORE_EMULATOR_HOST names."""
    if os.environ.get("FIRESTORE_EMULATOR_HOST"):
        yield None
        return
    with FirestoreEmulator() as emu:
        os.environ["FIRESTORE_EMULATOR_HOST"] = emu.host
        try:
            yield emu
        finally:
            os.environ.pop("FIRESTORE_EMULATOR_HOST", None)


@pytest.fixture(scope="session")
def emulator_host(emulator: FirestoreEmulator | None) -> str:
    return os.environ["FIRESTORE_EMULATOR_HOST"]


@pytest.fixture
def project_id(emulator: FirestoreEmulator | None) -> Iterator[str]:
    """A project of its own for each test, cleared afterwards."""
    project = f"test-{uuid.uuid4().hex[:16]}"
    yield project
    if emulator is None:
        return
    # Only to keep the emulator small: every test has its own project, so a clear that
    # keeps meeting a transaction lock left by the test's background writes can be skipped.
    for _ in range(3):
        try:
            emulator.clear(project)
            return
        except EmulatorError:
            time.sleep(0.5)


@pytest.fixture
def settings(emulator_host: str, project_id: str) -> Settings:
    return Settings(project=project_id, emulator_host=emulator_host, **FAST)


@pytest.fixture
def make_settings(emulator_host: str, project_id: str) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        return Settings(project=project_id, emulator_host=emulator_host, **{**FAST, **overrides})

    return make


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Any], settings: Settings
) -> AsyncIterator[TestClient[web.Request, web.Application]]:
    """The app on the emulator, through aiohttp's test client."""
    yield await aiohttp_client(create_app(settings))
