"""Strict JSON in, for REST bodies and websocket frames alike."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

MAX_JSON_DEPTH = 32


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(raw: bytes | str) -> Any:
    """Parse JSON, refusing NaN, Infinity and lone surrogates. Raises ValueError (RecursionError
    included)."""
    try:
        return orjson.loads(raw)  # about 10x the standard parser
    except orjson.JSONDecodeError:
        pass
    # orjson also refuses some valid JSON (integers beyond 64 bits, UTF-16, lone surrogate
    # escapes): the standard parser decides those. A lone surrogate ("\\ud800") parses, but
    # it is no text: it cannot be encoded to answer it, so it would be stored and then fail
    # every read. Only this rare path can produce one.
    try:
        value = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
    if _holds_lone_surrogate(value):
        raise ValueError("JSON text holds a lone surrogate (\\ud800-\\udfff), which is not text")
    return value


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _holds_lone_surrogate(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


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
