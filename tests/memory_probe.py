"""Peak memory of one /predict and one embedding job over the bomb set, in a fresh process
(python -m tests.memory_probe make|predict|job DIR), for tests/test_memory_budget.py.

`make` writes the bomb set into DIR: the 1-bit 9400x9400 PNG of issue 12 (~11 KB, 88 MP) and one picture
just under the 40 MP cap in each mode and format that decodes differently (1-bit, grey, 16-bit grey,
palette, RGB, RGBA; PNG, GIF, TIFF, WebP, JPEG), each a few KB to a few MB. `predict` and `job` build the
services as `headstart serve` and `headstart worker` do, warm them up, then send every file (the 9400 one
three times, the others twice) through one /predict, or through one `embed_chunk` job, and print JSON:
resident memory before, peak (ru_maxrss) after, and the outcome per task.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

SIDE = 6300  # 39.7 MP, under MEDIA_MAX_PIXELS=40000000
CONFIG = ('<View><Image name="image" value="$image"/><Choices name="label" toName="image">'
          '<Choice value="A"/><Choice value="B"/></Choices></View>')


def make(directory: Path) -> None:
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    Image.new("1", (9400, 9400)).save(directory / "bomb-1bit-9400.png")
    for name, mode, fmt, options in [("1bit.png", "1", "PNG", {}), ("grey.png", "L", "PNG", {}),
                                     ("grey16.png", "I;16", "PNG", {}), ("palette.gif", "P", "GIF", {}),
                                     ("rgb.png", "RGB", "PNG", {}), ("rgba.png", "RGBA", "PNG", {}),
                                     ("rgb.tiff", "RGB", "TIFF", {"compression": "tiff_deflate"}),
                                     ("rgb.webp", "RGB", "WEBP", {"quality": 10, "method": 0}),
                                     ("rgb.jpg", "RGB", "JPEG", {"quality": 50})]:
        image = Image.new(mode, (SIDE, SIDE))
        ImageDraw.Draw(image).ellipse((SIDE // 4, SIDE // 4, 3 * SIDE // 4, 3 * SIDE // 4), fill=1 if mode == "1" else 200)
        image.save(directory / name, format=fmt, **options)
        del image


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class RssSampler:
    """The highest resident memory seen while the block runs, sampled every 2 ms (ru_maxrss would also
    count what loading torch and the backbone took before)."""

    def __enter__(self):
        import threading

        self.peak, self._stop = rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_bytes())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def main(argv: list[str]) -> int:
    command, directory = argv[0], Path(argv[1])
    if command == "make":
        make(directory)
        return 0
    import redis as redis_lib

    from backend.common.settings import Settings
    from backend.core.encoders import EncoderPool
    from backend.core.torch_runtime import set_torch_threads
    from backend.loop.services import build_services
    from tests.reliability_helpers import promote_real_head

    set_torch_threads(1)
    settings = Settings(redis_url=os.environ["REDIS_URL"], local_files_document_root=str(directory),
                        repredict_unlabeled=False, zero_shot=False)
    redis = redis_lib.Redis.from_url(settings.redis_url)
    redis.flushdb()  # the test's own database: nothing may come from the embedding cache
    services = build_services(settings, redis, encoders=EncoderPool(default_name="mobilenet_v2"))
    project = "51"
    if command == "predict":
        promote_real_head(services, project)
    else:  # warm up the encoder as a worker's start does (a served head would make the job write to Label Studio)
        services.encoders.get().embed([])
    files = sorted(path.name for path in directory.iterdir())
    names = [name for name in files for _ in range(3 if name.startswith("bomb") else 2)]
    tasks = [{"id": index + 1, "data": {"image": f"/data/local-files/?d={name}"}} for index, name in enumerate(names)]
    before = rss_bytes()
    sampler = RssSampler().__enter__()
    if command == "predict":
        from backend.server.app import create_app

        client = create_app(settings, services=services).test_client()
        response = client.post("/predict", json={"tasks": tasks, "project": f"{project}.1", "label_config": CONFIG})
        outcome = {name: bool(result["result"]) for name, result in zip(names, response.json["results"])}
    else:
        from worker.jobs import embed_chunk

        services.projects.remember(project, CONFIG)
        services.tasks.put_many(project, tasks)
        outcome = embed_chunk(services, project, [task["id"] for task in tasks])
    sampler.__exit__()
    print(json.dumps({"rss_before": before, "peak": sampler.peak, "ru_maxrss": peak_bytes(), "outcome": outcome,
                      "decode_budget_peak": services.features.limits.budget.peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
