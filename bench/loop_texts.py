"""N distinct real texts for the `loop` benchmark's text project (`python -m bench loop --text`), with their topic.

Every bbc-news article (../shared/datasets/bbc-news, train + val: 2,125 articles, 5 topics) in a
shuffled order; past them, deterministic variants of the same articles: the title kept, the body's
paragraphs rotated by one more place each round, so the first 256 word pieces the encoder reads
differ and every text's bytes differ (headstart's content-addressed cache sees N different inputs).
Texts go into the tasks themselves (`{"text": ...}`), as most Label Studio text projects hold them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from bench.resources import BBC_CLASSES, dataset_texts


@dataclass(frozen=True)
class LoopText:
    text: str
    label: str


def originals(seed: int = 0) -> list[tuple[str, str]]:
    """(text, topic) of every article of both splits, shuffled by `seed`."""
    items = dataset_texts("train") + dataset_texts("val")
    random.Random(seed).shuffle(items)
    return items


def classes() -> list[str]:
    return list(BBC_CLASSES)


def make_texts(count: int, *, seed: int = 0) -> list[LoopText]:
    """`count` distinct texts in task order; raises if a variant repeats an earlier text."""
    articles = originals(seed)
    texts: list[LoopText] = []
    digests: set[str] = set()
    for index in range(count):
        round_, position = divmod(index, len(articles))
        text, label = articles[position]
        if round_:
            title, *body = text.split("\n\n")
            shift = round_ % max(1, len(body))
            text = "\n\n".join([title, *body[shift:], *body[:shift]]) + f"\n\n(variant {round_})"
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in digests:
            raise RuntimeError(f"text {index} repeats an earlier one: the variants are not distinct")
        digests.add(digest)
        texts.append(LoopText(text=text, label=label))
    return texts
