"""Storage behind the service: the Store protocol and its implementations."""

from samvad.store.base import (
    Change,
    ChangeBatch,
    Message,
    Profile,
    SessionRecord,
    Store,
    StoreCounts,
    UserState,
    WipeReport,
)
from samvad.store.memory import MemoryStore

__all__ = [
    "Change",
    "ChangeBatch",
    "MemoryStore",
    "Message",
    "Profile",
    "SessionRecord",
    "Store",
    "StoreCounts",
    "UserState",
    "WipeReport",
]
