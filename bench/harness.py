"""What every benchmark shares: result files, the machine description, percentiles, tables.

Machines are noisy (and this one is shared), so every result records the load average before and
after the run, and benchmarks report medians and ratios measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Iterable, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or what platform knows elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> list[float]:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return []


def machine() -> dict:
    """Where a result was measured: CPU, cores, GPU, library versions."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}


class Run:
    """One benchmark run: its start time and load, finished into a JSON result file."""

    def __init__(self, name: str, *, quick: bool, results_dir: Path = RESULTS_DIR):
        self.name = name
        self.quick = quick
        self.results_dir = results_dir
        self.started = time.time()
        self.load_before = load_average()

    def finish(self, results: dict, *, goals: dict, notes: Sequence[str] = ()) -> dict:
        """Write `results` (with goals, machine and load) to results_dir/NAME.json and return it."""
        record = {
            "benchmark": self.name,
            **results,
            "goals": goals,
            "notes": list(notes),
            "quick": self.quick,
            "machine": machine(),
            "load_average_before": self.load_before,
            "load_average_after": load_average(),
            "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "wall_s": round(time.time() - self.started, 1),
        }
        self.results_dir.mkdir(parents=True, exist_ok=True)
        (self.results_dir / f"{self.name}.json").write_text(json.dumps(record, indent=2) + "\n")
        return record


def read_result(name: str, results_dir: Path = RESULTS_DIR) -> dict | None:
    path = results_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100), linear interpolation between the closest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    if len(ordered) == 1:
        return ordered[0]
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def rounded(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain-text table on stdout."""
    cells = [[str(cell) for cell in header]] + [[_cell(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for index, row in enumerate(cells):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def goal(value: float | None, target: float, *, at_least: bool) -> dict:
    """A goal record: the target, the direction and whether `value` meets it."""
    met = None if value is None else (value >= target if at_least else value <= target)
    return {"target": target, "direction": ">=" if at_least else "<=", "met": met}
