"""`python -m samvad` with some cross-cutting layers taken out, to measure what each one costs.

For the benchmark only: SAMVAD_BENCH_DROP names what to leave out (comma-separated):

- `edge`: the edge middleware (request context, request id, metrics, JSON errors, and the
  response headers it sets; JSON answers still carry the security headers they are made with);
- `security`: the CORS and authentication middlewares (installed only when configured).

The access line and the change feed are settings (SAMVAD_ACCESS_LOG, SAMVAD_SYNC_INTERVAL), not
layers to cut out. Everything else is samvad as `python -m samvad` runs it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from samvad import __main__ as entry
from samvad import app as app_module

MIDDLEWARES: dict[str, tuple[str, ...]] = {
    "edge": ("edge",),
    "security": ("cors_preflight", "authenticate"),
}


def _name(function: Any) -> str:
    return str(getattr(function, "__qualname__", getattr(function, "__name__", repr(function))))


def main() -> None:
    drop = {d.strip() for d in os.environ.get("SAMVAD_BENCH_DROP", "").split(",") if d.strip()}
    unknown = drop - set(MIDDLEWARES)
    if unknown:
        sys.exit(f"unknown layers: {', '.join(sorted(unknown))}")
    names = tuple(n for layer in drop for n in MIDDLEWARES[layer])
    create_app = app_module.create_app

    def without_layers(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        app.middlewares[:] = [m for m in app.middlewares if not _name(m).startswith(names)]
        return app

    entry.create_app = without_layers  # type: ignore[attr-defined]
    entry.main()


if __name__ == "__main__":
    main()
