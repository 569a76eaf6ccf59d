"""Typed domain errors. The edge (samvad.api.middlewares) maps them to HTTP answers."""

from __future__ import annotations


class SamvadError(Exception):
    """Base of every error the API turns into a JSON answer."""

    status: int = 500
    public_message: str = "internal error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.public_message)
        self.message = message or self.public_message


class InvalidInput(SamvadError):
    status = 400
    public_message = "invalid input"


class InvalidId(InvalidInput):
    """An id that Firestore would refuse as a document id (or that samvad reserves)."""


class PayloadTooLarge(SamvadError):
    status = 413
    public_message = "payload too large"


class NotFound(SamvadError):
    status = 404
    public_message = "not found"


class StoreUnavailable(SamvadError):
    """Firestore could not be reached, or refused for a reason worth retrying."""

    status = 503
    public_message = "storage is temporarily unavailable"
    retry_after: float = 2.0


class BacklogFull(SamvadError):
    """The write-behind backlog is at its byte limit: accepting more could not be honoured."""

    status = 503
    public_message = "write backlog is full; retry shortly"

    def __init__(self, retry_after: float) -> None:
        super().__init__()
        self.retry_after = retry_after


class ShuttingDown(SamvadError):
    status = 503
    public_message = "server is shutting down"
    retry_after: float = 1.0


class StoreContention(Exception):
    """A transaction lost to concurrent writers too often: retry soon; Firestore is fine."""


class StoreError(Exception):
    """A Firestore failure that retrying will not fix (a bug or a limit): logged, not shown."""


class Conflict(SamvadError):
    status = 409
    public_message = "conflict"


class Gone(SamvadError):
    """It existed, and its retention ran out (Firestore's TTL deletes it soon)."""

    status = 410
    public_message = "gone"
