"""The app factory: everything the server needs is built here and kept on typed AppKeys."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from samvad.api.dashboard import setup_dashboard
from samvad.api.keys import RESPONSE_HEADERS, SERVICE, SETTINGS, HeaderHook
from samvad.api.lifecycle import lifecycle_routes
from samvad.api.metrics import Metrics, setup_metrics
from samvad.api.middlewares import EDGE, Edge, add_routes
from samvad.api.openapi import setup_openapi
from samvad.api.realtime import CLOSE_GOING_AWAY, CONNECTIONS, Connections, realtime_routes
from samvad.api.routes import RENDERED, RenderedBodies, routes
from samvad.api.security import install_security
from samvad.clock import Clock
from samvad.config import Settings
from samvad.service import SessionPersistenceService
from samvad.store.base import Store

StoreFactory = Callable[[Settings], Store]


def firestore_store(settings: Settings) -> Store:
    from samvad.store.firestore import FirestoreStore  # keeps google.cloud out of other imports

    return FirestoreStore.connect(
        settings.project, timeout=settings.store_timeout, retention=settings.retention()
    )


def create_app(
    settings: Settings,
    store_factory: StoreFactory = firestore_store,
    clock: Clock | None = None,
) -> web.Application:
    metrics = Metrics()
    header_hooks: list[HeaderHook] = []
    # No aiohttp middlewares: the edge wraps each route's handler (samvad/api/middlewares.py).
    app = web.Application(client_max_size=settings.max_body_bytes)
    app[RESPONSE_HEADERS] = header_hooks
    app[SETTINGS] = settings
    app[RENDERED] = RenderedBodies()
    # Refuses (AuthConfigError) when auth cannot work.
    guard = install_security(app, settings)
    app[EDGE] = edge = Edge(settings.project, metrics, guard, header_hooks)
    edge.install(app)

    async def service_ctx(app: web.Application) -> AsyncIterator[None]:
        service = SessionPersistenceService(store_factory(settings), settings, clock=clock)
        await service.start()
        app[SERVICE] = service
        yield
        await service.close()

    async def connections_ctx(app: web.Application) -> AsyncIterator[None]:
        app[CONNECTIONS] = Connections(app[SERVICE], settings)
        yield
        app[CONNECTIONS].cancel_graces()

    async def close_sockets(app: web.Application) -> None:
        # Flush first: an agent told "going away" may reconnect elsewhere at once and must
        # find there every write it was acknowledged for on this instance.
        await app[SERVICE].drain()
        await app[CONNECTIONS].close_all(CLOSE_GOING_AWAY, "going away")

    app.cleanup_ctx.append(service_ctx)
    app.cleanup_ctx.append(connections_ctx)
    app.on_shutdown.append(close_sockets)
    setup_metrics(app, metrics)
    setup_dashboard(app)
    setup_openapi(app)
    add_routes(app, [*routes, *lifecycle_routes, *realtime_routes])
    return app
