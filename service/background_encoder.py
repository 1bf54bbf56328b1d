"""Background encoding of new events' memory vectors, right after their append, so that a later
recommend finds them stored (the recommend path still encodes what is missing)."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Sequence

from memory_store import StoreUnavailable
from service.errors import RunnerClosed
from service.scheduler import QueueFull
from service.users import UserService

log = logging.getLogger(__name__)


class BackgroundEncoder:
    """Background encoding of new events' memory vectors: a bounded queue of user ids, drained in
    batches of up to ``batch_users`` users per model call. A full queue drops the user (the next
    recommend encodes what is missing); a user already queued is not queued twice. When the model
    queue is full (``QueueFull``) the batch is retried after the worker's ``retry_after_s``.
    ``lag_s()``: how long the oldest queued user has waited (metrics)."""

    def __init__(self, users: UserService, queue_size: int = 1024, batch_users: int = 16):
        self.users = users
        self.batch_users = batch_users
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=queue_size)
        self.pending: dict[str, float] = {}  # queued user -> monotonic time of its submission (oldest first)
        self.dropped = 0
        self.stored = 0
        self.closed = False
        self._taken = 0  # users in the model call now
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="automr-encoder")

    def submit(self, user_ids: Sequence[str]) -> None:
        for u in user_ids:
            if u in self.pending:
                continue
            if self.closed:  # shutting down: the next recommend encodes lazily
                self.dropped += 1
                continue
            try:
                self.queue.put_nowait(u)
                self.pending[u] = time.monotonic()
            except asyncio.QueueFull:
                self.dropped += 1

    def lag_s(self) -> float:
        """Age in seconds of the oldest queued (not yet taken) user submission; 0.0 when idle."""
        try:
            oldest = next(iter(self.pending.values()))
        except StopIteration:
            return 0.0
        return max(time.monotonic() - oldest, 0.0)

    async def _run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.batch_users and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            for u in batch:
                self.pending.pop(u, None)
            self._taken = len(batch)
            try:
                while True:
                    try:
                        self.stored += await self.users.encode_users(batch)
                        break
                    except QueueFull as e:  # the model is busy with requests: they go first
                        await asyncio.sleep(min(e.retry_after_s, 5.0))
            except RunnerClosed:
                log.info("background encoding of %d users skipped: shutting down", len(batch))
            except StoreUnavailable as e:
                log.warning("background encoding of %d users skipped: %s", len(batch), e)
            except Exception:  # never let the worker die; the recommend path still encodes lazily
                log.exception("background encoding of %d users failed", len(batch))
            finally:
                self._taken = 0
                for _ in batch:
                    self.queue.task_done()

    async def idle(self) -> None:
        """Wait until every queued user has been encoded (tests, shutdown)."""
        await self.queue.join()

    async def stop(self, timeout: float = 0.0) -> bool:
        """Take no more users, let the queued ones be encoded for up to ``timeout`` seconds, then stop.
        True when the queue was drained."""
        self.closed = True
        drained = not self.pending and not self._taken
        if self._task is not None and not drained and timeout > 0:
            try:
                await asyncio.wait_for(self.queue.join(), timeout)
                drained = True
            except asyncio.TimeoutError:
                log.warning("shutdown: %d users left without background encoding (grace %.1fs over)",
                            len(self.pending), timeout)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        return drained
