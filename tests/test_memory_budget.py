"""The decode budget: threads that together want more than it wait their turn; a claim above it is refused;
and a whole request or job over the bomb set stays under a process budget (tests/memory_probe.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from backend.common.errors import MediaError
from backend.common.settings import Settings
from backend.core.memory_budget import MemoryBudget
from tests.helpers import REPO

pytestmark = pytest.mark.security


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


BUDGET_BYTES = 1_500_000_000  # peak resident memory of a backend or worker process, torch and the backbone included


@pytest.fixture(scope="module")
def bomb_set(tmp_path_factory):
    directory = tmp_path_factory.mktemp("bombs")
    subprocess.run([sys.executable, "-m", "tests.memory_probe", "make", str(directory)], cwd=REPO, check=True,
                   timeout=300)
    return directory


def probe(command: str, directory, redis_url: str) -> dict:
    """Run tests/memory_probe.py in a fresh process (one at a time: they are the memory-heavy part)."""
    done = subprocess.run([sys.executable, "-m", "tests.memory_probe", command, str(directory)], cwd=REPO,
                          env={**os.environ, "REDIS_URL": redis_url}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", ["predict", "job"])
def test_the_bomb_set_stays_within_the_memory_budget_of_a_request_and_a_job(bomb_set, redis, redis_url, command):
    """The 1-bit 9400x9400 PNG of issue 12 three times and every mode and format just under 40 MP twice, in one
    /predict and in one embedding job: the peak stays under 1.5 GB with torch and the backbone loaded (before:
    2.0 GB for the three 9400 PNGs alone); what decodes within MEDIA_DECODE_BUDGET_BYTES is embedded, the rest
    refused with its reason."""
    measured = probe(command, bomb_set, redis_url)
    peak, before = measured["peak"], measured["rss_before"]
    print(f"\nbomb set, one {command}: resident {before / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB "
          f"(+{(peak - before) / 2**20:.0f} MiB; decode budget peak {measured['decode_budget_peak'] / 2**20:.0f} "
          f"MiB); outcome {measured['outcome']}")
    assert peak < BUDGET_BYTES
    assert measured["decode_budget_peak"] <= Settings().media_decode_budget_bytes
    if command == "predict":
        outcome = measured["outcome"]
        assert not outcome["bomb-1bit-9400.png"] and not outcome["rgb.webp"] and not outcome["rgba.png"]
        assert all(ok for name, ok in outcome.items() if name not in ("bomb-1bit-9400.png", "rgb.webp", "rgba.png"))
    else:
        assert measured["outcome"]["failed"] == 3 + 2 + 2 and measured["outcome"]["media"] == 21
