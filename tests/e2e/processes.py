"""The end-to-end suite's long-running child processes: the same helpers the `loop` benchmark uses (bench.processes)."""

from bench.processes import ManagedProcess, http_ok, wait_until  # noqa: F401
