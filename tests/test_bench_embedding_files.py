"""The benchmarks' embedding files: vectors kept by (encoder, input digest), and the text benchmark reusing them."""

from __future__ import annotations

import torch

from bench import text as text_bench
from bench.embedding_files import EmbeddingFiles, identity
from bench.resources import dataset_texts


def test_vectors_come_back_by_digest_and_only_for_their_encoder(tmp_path):
    vectors = {"a" * 64: torch.arange(4, dtype=torch.float32), "b" * 64: torch.ones(4)}
    EmbeddingFiles(tmp_path, "st:model@file-1").put_many(vectors)
    EmbeddingFiles(tmp_path, "st:model@file-1").put_many({"c" * 64: torch.zeros(4)})

    again = EmbeddingFiles(tmp_path, "st:model@file-1").get_many(["a" * 64, "c" * 64, "d" * 64])
    assert set(again) == {"a" * 64, "c" * 64}
    assert torch.equal(again["a" * 64], vectors["a" * 64])
    assert EmbeddingFiles(tmp_path, "st:model@file-2").get_many(["a" * 64]) == {}
    assert not list(tmp_path.glob("*.partial"))


def test_the_identity_names_the_encoder_and_the_library_versions():
    name = identity("st:sentence-transformers/all-MiniLM-L6-v2")
    assert "/" not in name and ":" not in name
    assert "all-MiniLM-L6-v2" in name and "__torch-" in name and "transformers-" in name


def test_a_second_pass_reads_the_products_vectors_from_the_file(services, tmp_path):
    encoder = services.encoders.for_input("text")
    texts = dataset_texts("val")[:3]
    files = EmbeddingFiles(tmp_path, encoder.key)

    first, source = text_bench._features(services, encoder, texts, 0, files)
    assert source == {"embedded": 3, "from_file": 0}
    services.redis.flushdb()
    second, source = text_bench._features(services, encoder, texts, 0, EmbeddingFiles(tmp_path, encoder.key))
    assert source == {"embedded": 0, "from_file": 3}
    assert torch.equal(first, second)
    assert torch.allclose(second.norm(dim=1), torch.ones(3), atol=1e-5)
