"""Redis memory store: each user's last 100 events and their memory vectors (see store.py)."""
from .connect import open_store
from .embedded import EmbeddedRedis, redis_server_executable
from .errors import StoreUnavailable
from .resilience import Breaker, EmbeddedSupervisor
from .store import DEFAULT_CAP, MemoryStore, make_client
from .types import AppendResult, Event, LoadResult, PutResult, UserState

__all__ = [
    "AppendResult", "Breaker", "DEFAULT_CAP", "EmbeddedRedis", "EmbeddedSupervisor", "Event", "LoadResult",
    "MemoryStore", "PutResult", "StoreUnavailable", "UserState", "make_client", "open_store", "redis_server_executable",
]
