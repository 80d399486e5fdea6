"""The text encoder on the real all-MiniLM-L6-v2 weights: registry, embeddings, untrusted input, HTML."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from backend.common.errors import ConfigurationError, MediaError, UnknownBackbone
from backend.core import encoders as encoder_registry
from backend.core.encoders import EncoderPool, InputLimits
from backend.core.text_encoder import (TEXT_MODELS, HtmlTextEncoder, decode_text, is_local_model,
                                       local_model_key, strip_html)
from tests.helpers import REPO

LIMITS = InputLimits()


@pytest.fixture(scope="module")
def minilm(encoders):
    return encoders.for_input("text")


def test_every_text_entry_says_text_and_its_size_and_the_default_is_minilm():
    entries = encoder_registry.registry()
    text = {name: entry for name, entry in entries.items() if entry.modality == "text"}
    assert set(text) == set(TEXT_MODELS)
    assert "sentence-transformers/all-MiniLM-L6-v2" in text
    assert any("multilingual" in name for name in text)
    for name, entry in text.items():
        assert entry.feature_dim in (384, 768)
        assert entry.key("") == f"st:{name}"
        assert not is_local_model(name)
    with pytest.raises(UnknownBackbone, match="TEXT_ENCODER"):
        encoder_registry.get_entry("no-such-encoder")


def test_a_local_folder_is_an_encoder_whose_identity_is_its_weights(text_model, tmp_path):
    assert is_local_model(text_model)
    assert encoder_registry.get_entry(text_model).modality == "text"
    key = local_model_key(text_model)
    assert key.startswith("st:model@file-") and key == local_model_key(text_model)
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    assert local_model_key(str(tmp_path)) != key
    with pytest.raises(ConfigurationError, match="TEXT_ENCODER"):
        local_model_key(str(tmp_path / "missing"))


def test_embeddings_are_normalized_384_d_and_similar_texts_are_close(minilm, text_model):
    assert minilm.modality == "text" and minilm.feature_dim == 384
    assert minilm.key == local_model_key(text_model)
    assert 22_000_000 < minilm.parameter_count < 23_000_000  # the frozen parameters shown per version
    assert not any(parameter.requires_grad for parameter in minilm.model.parameters())
    texts = [minilm.prepare(text.encode(), LIMITS) for text in (
        "The striker scored twice in the cup final.", "A late goal won the football match.",
        "The central bank raised interest rates.")]
    vectors = minilm.embed(texts)
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2
    one_by_one = torch.cat([minilm.embed([text]) for text in texts])
    assert torch.allclose(one_by_one, vectors, atol=1e-5)  # batching does not change a text's features
    assert minilm.embed([]).shape == (0, 384)


def test_a_long_text_is_cut_by_the_model_s_own_truncation(minilm):
    prefix = "Markets fell sharply as investors worried about inflation. " * 60  # past 256 word pieces
    long = minilm.prepare((prefix + "Football " * 2_000_000).encode(), LIMITS)  # about 18 MB
    assert len(long) == minilm.max_seq_length * 64
    started = time.perf_counter()
    a, b = minilm.embed([long, prefix])
    assert time.perf_counter() - started < 10
    assert a @ b > 0.999  # only the first max_seq_length word pieces count
    assert minilm.preprocessing()["max_seq_length"] == 256


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"   \n\t ", "empty"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "is an image"),
    (b"\xff\xd8\xff\xe0" + b"JFIF", "is an image"),
    (bytes(range(256)) * 10, "binary"),
    (b"\x01\x02\x03\x04\x05\x06abc\x07\x08", "binary"),
    ("caf\u00e9".encode("latin-1"), "not UTF-8"),
    ("\ud800".encode("utf-8", "surrogatepass"), "not UTF-8"),
])
def test_bad_input_is_refused_with_its_reason(minilm, data, reason):
    with pytest.raises(MediaError, match=reason):
        minilm.prepare(data, LIMITS)


def test_utf8_text_in_any_script_is_accepted():
    assert decode_text("\ufeffЗдравствуй, мир — 你好".encode(), max_chars=100) == "Здравствуй, мир — 你好"


def test_hypertext_embeds_the_visible_text_under_its_own_identity(minilm):
    assert strip_html("<html><head><title>x</title><style>p{}</style></head><body><p>Goal &amp; win"
                      "</p><script>var a=1;</script><div>second</div></body></html>") == "Goal & win\nsecond"
    html = EncoderPool(default_name="mobilenet_v2")._html(minilm)
    assert isinstance(html, HtmlTextEncoder) and html.key == minilm.key + "+html"
    text = html.prepare(b"<p>The striker <b>scored</b> twice.</p>", LIMITS)
    assert text == "The striker scored twice."
    assert torch.allclose(html.embed([text]), minilm.embed(["The striker scored twice."]))
    with pytest.raises(MediaError, match="no text"):
        html.prepare(b"<div><img src='x.png'></div>", LIMITS)
    assert html.preprocessing()["strip_html"] is True


def test_the_pool_reloads_a_text_head_s_encoder_by_its_key(encoders, minilm):
    assert encoders.for_key(minilm.name, minilm.key) is minilm
    html = encoders.for_input("text", "html")
    assert encoders.for_key(minilm.name, html.key) is html
    with pytest.raises(ConfigurationError, match="TEXT_ENCODER"):
        encoders.for_key(minilm.name, "st:other@file-0")


def test_the_image_path_never_imports_sentence_transformers():
    code = ("import sys\n"
            "from backend.common.settings import Settings\n"
            "from backend.server.app import create_app\n"
            "import worker.process, worker.jobs, backend.cli\n"
            "from backend.core.encoders import registry, get_entry\n"
            "registry(); get_entry('mobilenet_v2')\n"
            "assert 'sentence_transformers' not in sys.modules, 'imported'\n"
            "assert 'transformers' not in sys.modules, 'imported'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
