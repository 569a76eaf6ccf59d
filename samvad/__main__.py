"""`python -m samvad`: serve the API with settings from the environment."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from samvad.app import create_app
from samvad.auth import AuthConfigError
from samvad.config import Settings
from samvad.logs import AccessLogger, access_logger_class, configure

log = logging.getLogger("samvad")


def main() -> None:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        configure()
        log.critical(str(exc))
        sys.exit(2)
    configure(settings.log_level)
    log.info(
        "starting samvad",
        extra={
            "json_fields": {
                "host": settings.host,
                "port": settings.port,
                "project": settings.project,
                "emulator": settings.emulator_host,
            }
        },
    )
    try:
        app = create_app(settings)
    except AuthConfigError as exc:  # e.g. authentication required and no credentials set
        log.critical(str(exc))
        sys.exit(2)
    access_logger = access_logger_class(settings.access_log, settings.slow_request)
    # In-flight requests get 1 s on SIGTERM; the write-behind flush then has its own budget,
    # both inside Cloud Run's 10 s grace period.
    web.run_app(
        app,
        host=settings.host,
        port=settings.port,
        shutdown_timeout=1.0,
        access_log=logging.getLogger("aiohttp.access") if access_logger else None,
        access_log_class=access_logger or AccessLogger,
        print=None,
    )


if __name__ == "__main__":
    main()
