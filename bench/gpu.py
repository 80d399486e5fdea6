"""`gpu`: embedding throughput and retrain time with the backbone on a CUDA device.

Runs only where torch sees CUDA; elsewhere it writes a result saying it was not run and why.

- embed_img_per_s: the product's ImageEncoder on cuda (its batching and autocast) over flowers12's
  960 images, decoded beforehand; decode_embed_img_per_s includes decoding them (on the CPU).
- retrain_s: what a worker with DEVICE=cuda does for one new annotation on a ~1,000-label project,
  called directly: decode + embed the new image on the GPU, then fit the head and cross-validate
  it (the promotion guard) on the cached features, as backend.core.candidates does.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from backend.core.image_encoder import load_image_encoder
from backend.core.images import decode_image
from backend.core.head_fitting import cross_validate, fit_head
from bench import data
from bench.harness import RESULTS_DIR, Run, median, print_table, rounded

NAME = "gpu"
REPEATS = 3


def run(*, quick: bool = False, results_dir: Path = RESULTS_DIR) -> dict:
    bench_run = Run(NAME, quick=quick, results_dir=results_dir)
    if not torch.cuda.is_available():
        reason = "not run: torch.cuda.is_available() is False on this machine (no CUDA device or driver)"
        print(reason)
        return bench_run.finish({"run": False, "reason": reason}, goals={})
    items = data.images("flowers12", "train", "val")[: 64 if quick else None]
    classes = data.classes_of(items)
    encoder = load_image_encoder("mobilenet_v2", device="cuda")
    started = time.perf_counter()
    images = [decode_image(path.read_bytes(), max_pixels=10**9, min_side=encoder.resize_size) for path, _ in items]
    decode_s = time.perf_counter() - started
    encoder.embed(images[:64])  # warm-up: CUDA context, cuDNN autotuning
    embed_times = []
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        started = time.perf_counter()
        features = encoder.embed(images)
        torch.cuda.synchronize()
        embed_times.append(time.perf_counter() - started)
    embed_s = median(embed_times)
    targets = torch.tensor([classes.index(cls) for _, cls in items])
    retrain_times = []
    for repeat in range(REPEATS):
        new_path = items[repeat][0]
        started = time.perf_counter()
        image = decode_image(new_path.read_bytes(), max_pixels=10**9, min_side=encoder.resize_size)
        all_features = torch.cat([features[1:], encoder.embed([image])])
        fit_head(all_features, targets, num_classes=len(classes), multi_label=False)
        cross_validate(all_features, targets, num_classes=len(classes), multi_label=False)
        retrain_times.append(time.perf_counter() - started)
    results = {
        "run": True,
        "device": torch.cuda.get_device_name(0),
        "images": len(images),
        "embed_img_per_s": rounded(len(images) / embed_s, 1),
        "decode_embed_img_per_s": rounded(len(images) / (decode_s + embed_s), 1),
        "retrain_s": rounded(median(retrain_times), 4),
        "retrain_labels": len(items),
    }
    record = bench_run.finish(results, goals={}, notes=[
        "retrain_s: decode + embed 1 image on the GPU, fit_head + cross_validate on cached features (CPU tensors)"])
    print_table(f"gpu ({results['device']})", ["what", "value"], [
        ["embed images/s", results["embed_img_per_s"]], ["decode + embed images/s", results["decode_embed_img_per_s"]],
        [f"retrain s ({len(items)} labels)", results["retrain_s"]]])
    return record
