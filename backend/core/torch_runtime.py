"""Process-wide torch settings: which device to use and how many CPU threads."""

from __future__ import annotations

import torch


def resolve_device(requested: str) -> torch.device:
    """`auto` means CUDA when present, else CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def set_torch_threads(count: int) -> None:
    """Pin torch's CPU thread pools. Call once per process, at its start."""
    torch.set_num_threads(max(1, count))
    try:
        torch.set_num_interop_threads(max(1, count))
    except RuntimeError:
        pass  # already set once in this process; the intra-op setting above still applies
