"""The decode budget: threads that together want more than it wait their turn; a claim above it is refused."""

from __future__ import annotations

import threading
import time

import pytest

from backend.common.errors import MediaError
from backend.core.memory_budget import MemoryBudget


def test_concurrent_holders_never_exceed_the_limit_and_all_get_their_turn():
    budget = MemoryBudget(100)
    done = []

    def hold(size):
        with budget.hold(size):
            assert budget.held <= 100
            time.sleep(0.02)
        done.append(size)

    threads = [threading.Thread(target=hold, args=(size,)) for size in (60, 60, 60, 40, 100, 10) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(done) == len(threads)
    assert budget.peak <= 100
    assert budget.held == 0


def test_a_claim_above_the_whole_budget_is_refused_at_once_naming_the_setting():
    budget = MemoryBudget(100, setting="MEDIA_DECODE_BUDGET_BYTES")
    with pytest.raises(MediaError, match="MEDIA_DECODE_BUDGET_BYTES=100"):
        with budget.hold(101):
            pass
    assert budget.held == 0


def test_the_budget_is_released_when_the_holder_fails():
    budget = MemoryBudget(100)
    with pytest.raises(ValueError):
        with budget.hold(80):
            raise ValueError("a broken image")
    assert budget.held == 0
