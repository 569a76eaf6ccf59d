"""`python -m samvad` with some cross-cutting layers taken out, to measure what each one costs.

For the benchmark only: SAMVAD_BENCH_DROP names what to leave out (comma-separated):

- `edge`: the edge around every route's handler (request context, request id, authentication,
  metrics, JSON errors, and the response headers it sets; JSON answers still carry the security
  headers they are made with).

The access line and the change feed are settings (SAMVAD_ACCESS_LOG, SAMVAD_SYNC_INTERVAL), not
layers to cut out. Everything else is samvad as `python -m samvad` runs it.
"""

from __future__ import annotations

import os
import sys

from aiohttp.typedefs import Handler

from samvad import __main__ as entry
from samvad import app as app_module
from samvad.api.middlewares import Edge
from samvad.api.security import Policy

LAYERS = ("edge",)


class BareEdge(Edge):
    """Every route's handler as it is, with nothing around it."""

    def wrap(
        self, handler: Handler, method: str, route: str, policy: Policy | None = None
    ) -> Handler:
        self._handlers.add(handler)  # passes the startup check: it went through here
        return handler


def main() -> None:
    drop = {d.strip() for d in os.environ.get("SAMVAD_BENCH_DROP", "").split(",") if d.strip()}
    unknown = drop - set(LAYERS)
    if unknown:
        sys.exit(f"unknown layers: {', '.join(sorted(unknown))}")
    if "edge" in drop:
        app_module.Edge = BareEdge  # type: ignore[misc]
    entry.main()


if __name__ == "__main__":
    main()
