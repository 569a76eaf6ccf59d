"""Ids that reach Firestore as document ids: checked here, before any store call."""

from __future__ import annotations

import re
import secrets

from samvad.errors import InvalidId

# A document id may be 1500 bytes, but a user id is also a value that queries compare, and
# Firestore refuses 1500-byte query values ("too large to be used in a query": a 500 before).
MAX_ID_BYTES = 1499
_RESERVED_PATTERN = re.compile(r"^__.*__$", re.DOTALL)
# Path words of the API that a session id must never be mistaken for.
RESERVED_SESSION_IDS = frozenset({"stats", "create", "refresh", "user"})


def check_id(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise InvalidId(f"{field} must be a string")
    if not value:
        raise InvalidId(f"{field} must not be empty")
    if "/" in value:
        raise InvalidId(f"{field} must not contain '/'")
    if value in (".", ".."):
        raise InvalidId(f"{field} must not be '.' or '..'")
    if _RESERVED_PATTERN.match(value):
        raise InvalidId(f"{field} must not look like __name__ (reserved by Firestore)")
    if len(value.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise InvalidId(f"{field} must be at most {MAX_ID_BYTES} bytes")
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidId(f"{field} must not contain control characters or lone surrogates")
    return value


def check_session_id(value: object) -> str:
    session_id = check_id("sessionId", value)
    if session_id in RESERVED_SESSION_IDS:
        raise InvalidId(f"sessionId {session_id!r} is reserved")
    return session_id


def new_session_id() -> str:
    return f"session_{secrets.token_hex(12)}"
