"""A process-wide budget of bytes that concurrent decodes share, so several requests or fetch threads
cannot each decode a large image at the same moment and add up past the process's memory."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

from backend.common.errors import MediaError


class MemoryBudget:
    """At most `limit` bytes held at once across threads; a holder past it waits its turn.

    A single claim above `limit` could never be granted, so it is refused at once with a MediaError
    that names `setting` (the environment variable that sets `limit`).
    """

    def __init__(self, limit: int, *, setting: str = "MEDIA_DECODE_BUDGET_BYTES"):
        if limit <= 0:
            raise ValueError(f"{setting} must be positive, got {limit}")
        self.limit = limit
        self.setting = setting
        self._held = 0
        self._peak = 0
        self._free = threading.Condition()

    @property
    def held(self) -> int:
        with self._free:
            return self._held

    @property
    def peak(self) -> int:
        """The most bytes held at once since this budget was made (for tests and measurements)."""
        with self._free:
            return self._peak

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        """Hold `size` bytes of the budget for the duration of the block."""
        if size > self.limit:
            raise MediaError(f"Decoding this image needs about {size} bytes, above {self.setting}={self.limit}; "
                             "refused (use a smaller image, or raise the setting on hosts with memory to spare).")
        with self._free:
            self._free.wait_for(lambda: self._held + size <= self.limit)
            self._held += size
            self._peak = max(self._peak, self._held)
        try:
            yield
        finally:
            with self._free:
                self._held -= size
                self._free.notify_all()
