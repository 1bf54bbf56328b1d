"""The one error type the service maps to 503."""
from __future__ import annotations

from redis import exceptions as rx


class StoreUnavailable(RuntimeError):
    """Redis cannot serve the request now (down, unreachable, timing out, loading, out of memory,
    read-only replica, failing to write its AOF, cluster slot down). Retrying later may succeed;
    appends are idempotent by event id, so retrying an append is always safe."""


# Errors that mean "the store is unavailable", as opposed to a bug in a request or a script.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    rx.ConnectionError,  # includes BusyLoadingError (LOADING), AuthenticationError, MaxConnectionsError
    rx.TimeoutError,
    rx.ClusterError,  # ClusterDownError, MasterDownError
    rx.SlotNotCoveredError,
    rx.TryAgainError,
    rx.ReadOnlyError,
    rx.OutOfMemoryError,
    ConnectionError,  # builtin (socket-level errors redis-py did not wrap)
    TimeoutError,
)

_UNAVAILABLE_PREFIXES = ("MISCONF", "BUSY ", "MASTERDOWN", "CLUSTERDOWN")


def is_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, UNAVAILABLE_ERRORS):
        return True
    if isinstance(exc, rx.RedisClusterException) and "cannot be connected" in str(exc):
        return True  # no reachable cluster node (other RedisClusterExceptions are usage errors)
    return isinstance(exc, rx.ResponseError) and str(exc).startswith(_UNAVAILABLE_PREFIXES)
