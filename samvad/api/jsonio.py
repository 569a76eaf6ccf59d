"""Strict JSON in, for REST bodies and websocket frames alike."""

from __future__ import annotations

import json
from typing import Any

import orjson

MAX_JSON_DEPTH = 32


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Parse JSON, refusing NaN and Infinity. Raises ValueError (RecursionError included)."""
    try:
        return orjson.loads(raw)  # about 10x the standard parser
    except orjson.JSONDecodeError:
        # orjson also refuses some valid JSON (integers beyond 64 bits, lone surrogate escapes,
        # UTF-16): the standard parser decides those, so the accepted input stays the same.
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except RecursionError as exc:
            raise ValueError("JSON nested too deeply") from exc


def too_deep(raw: bytes | str, value: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `value` (parsed from `raw`) nests deeper than `limit` objects and arrays."""
    # Nesting needs an opening bracket per level: counting them is C-fast, and the walk
    # only runs for the rare input that could be deep.
    brackets = (
        raw.count(b"{") + raw.count(b"[")
        if isinstance(raw, bytes)
        else (raw.count("{") + raw.count("["))
    )
    if brackets <= limit:
        return False
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False
