"""`python -m samvad` with some cross-cutting layers taken out, to measure what each one costs.

For the benchmark only: SAMVAD_BENCH_DROP names what to leave out (comma-separated):

- `access_log`: the JSON access line per request;
- `request_context`: the trace / request-id middleware and its response hook;
- `metrics`: the Prometheus request middleware;
- `security`: the CORS and authentication middlewares and the security-headers hook.

Everything else is samvad as `python -m samvad` runs it.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from samvad import __main__ as entry
from samvad import app as app_module
from samvad import logs

LAYERS: dict[str, tuple[str, ...]] = {
    "request_context": ("request_context", "echo_request_id"),
    "metrics": ("request_metrics",),
    "security": ("cors_preflight", "authenticate", "security_headers"),
}


def _name(function: Any) -> str:
    return str(getattr(function, "__qualname__", getattr(function, "__name__", repr(function))))


def main() -> None:
    drop = {d.strip() for d in os.environ.get("SAMVAD_BENCH_DROP", "").split(",") if d.strip()}
    unknown = drop - {*LAYERS, "access_log"}
    if unknown:
        sys.exit(f"unknown layers: {', '.join(sorted(unknown))}")
    names = tuple(n for layer in drop & set(LAYERS) for n in LAYERS[layer])
    create_app = app_module.create_app

    def without_layers(*args: Any, **kwargs: Any) -> Any:
        app = create_app(*args, **kwargs)
        app.middlewares[:] = [m for m in app.middlewares if not _name(m).startswith(names)]
        kept = [h for h in app.on_response_prepare if not _name(h).startswith(names)]
        app.on_response_prepare[:] = kept
        return app

    if "access_log" in drop:
        logs.AccessLogger.enabled = property(lambda self: False)  # type: ignore[method-assign,assignment]
    entry.create_app = without_layers  # type: ignore[attr-defined]
    entry.main()


if __name__ == "__main__":
    main()
