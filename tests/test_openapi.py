"""The OpenAPI document: complete, valid, and true of the running server (schemathesis)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, assume, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from samvad.api.middlewares import served_routes
from samvad.api.openapi import OPERATIONS, build_document
from samvad.api.security import policy_key
from samvad.app import create_app
from samvad.config import Settings
from samvad.emulator import FirestoreEmulator, find_free_port
from samvad.ids import RESERVED_SESSION_IDS
from tests.conftest import FAST

Client = TestClient  # type: ignore[type-arg]
ADMIN_KEY = "admin-key-of-the-schemathesis-run"
EXAMPLES_PER_OPERATION = 25
SHADOWING_WORDS = {".", "..", *RESERVED_SESSION_IDS}
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    ignored_auth,  # what the document says needs a credential refuses a request without one
]


def test_every_route_is_in_the_document(settings: Settings) -> None:
    document = build_document()
    missing = sorted(
        f"{method} {template}"
        for route in served_routes(create_app(settings))
        for method, template in [policy_key(route)]
        if method.lower() not in document["paths"].get(template, {})
    )
    assert not missing, f"add these routes to OPERATIONS in samvad/api/openapi.py: {missing}"
    assert set(OPERATIONS) <= {policy_key(r) for r in served_routes(create_app(settings))}


def test_the_document_is_valid_openapi_3_1() -> None:
    document = build_document()
    assert document["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(document)  # refuses a document that breaks the spec
    ids = [op["operationId"] for path in document["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids))
    components = document["components"]
    assert {"apiKey", "userToken"} <= set(components["securitySchemes"])
    # request and response bodies are the wire models, camelCase as on the wire
    create = document["paths"]["/api/session/create"]["post"]
    ref = create["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert set(components["schemas"][ref.rsplit("/", 1)[1]]["properties"]) >= {"userId"}
    assert create["responses"]["401"]["headers"]["WWW-Authenticate"]
    assert document["paths"]["/healthz"]["get"]["security"] == []


async def test_the_server_serves_it_without_credentials(
    aiohttp_client: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(auth="required", api_keys=f"admin:{ADMIN_KEY}")
    client = await aiohttp_client(create_app(settings))
    response = await client.get("/api/openapi.json")
    assert response.status == 200
    assert await response.json() == build_document()


# ---- schemathesis against a real server ----------------------------------------------------------


class BackgroundServer:
    """The app on a free port, served by an event loop of its own in a thread, because
    schemathesis' calls block."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.port = find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.runner = web.AppRunner(app)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture(scope="module")
def server_url(emulator_host: str, emulator: FirestoreEmulator | None) -> Iterator[str]:
    project = f"test-schemathesis-{uuid.uuid4().hex[:12]}"
    settings = Settings(
        project=project,
        emulator_host=emulator_host,
        **{**FAST, "auth": "required", "api_keys": f"admin:{ADMIN_KEY}"},
    )
    with BackgroundServer(create_app(settings)) as server:
        yield server.url
    if emulator is not None:
        emulator.clear(project)


schema = schemathesis.openapi.from_dict(build_document())


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_the_server_keeps_to_its_document(case: Any, server_url: str) -> None:
    # Negative cases may break a path parameter's pattern with a word that makes the URL
    # another route's (sessionId "stats" is GET /api/session/stats): that tests the other route.
    assume(not set((case.path_parameters or {}).values()) & SHADOWING_WORDS)
    case.call_and_validate(
        base_url=server_url,
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        checks=CHECKS,
        timeout=30,
    )
