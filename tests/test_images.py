"""Decoding untrusted bytes: real photos pass (with the JPEG fast path), everything else is refused with a reason."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from backend.core.images import decode_image
from backend.core.memory_budget import MemoryBudget
from backend.common.errors import MediaError
from backend.common.settings import Settings
from tests.helpers import HYMENOPTERA, dataset_images


def biggest_photo() -> bytes:
    path = max((path for path, _ in dataset_images(HYMENOPTERA, "train")), key=lambda p: p.stat().st_size)
    return path.read_bytes()


def test_a_big_jpeg_is_decoded_at_a_reduced_scale_that_keeps_the_short_side():
    data = biggest_photo()
    full = decode_image(data, max_pixels=10**9)
    fast = decode_image(data, max_pixels=10**9, min_side=256)
    assert fast.mode == "RGB"
    assert min(fast.size) >= 256
    assert fast.size[0] < full.size[0]


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"this is not an image at all", "Not a decodable image"),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "Not a decodable image"),
])
def test_non_images_are_refused(data, reason):
    with pytest.raises(MediaError, match=reason):
        decode_image(data, max_pixels=10**8)


def test_a_truncated_jpeg_is_refused():
    with pytest.raises(MediaError, match="broken or truncated"):
        decode_image(biggest_photo()[:2000], max_pixels=10**9)


def test_a_decompression_bomb_is_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("L", (12000, 12000)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 1_000_000
    with pytest.raises(MediaError, match="MEDIA_MAX_PIXELS"):
        decode_image(buffer.getvalue(), max_pixels=50_000_000)


def encoded(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    """A picture with detail (a gradient with stripes), so decoding cannot take shortcuts."""
    width, height = size
    gradient = Image.linear_gradient("L").resize(size)
    image = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))
    image = image.convert(mode) if mode != "P" else image.quantize(16)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("L", "PNG"), ("P", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"),
                                       ("P", "GIF"), ("RGB", "TIFF"), ("RGB", "WEBP"), ("RGB", "BMP"),
                                       ("RGB", "JPEG")])
def test_every_format_shrinks_while_decoding_and_holds_the_budget_for_its_native_pixels(mode, fmt):
    """A 3000x2000 picture becomes an RGB picture whose short side is between 232 and twice that, and the
    decode holds the budget only for its native pixels (1 or 2 bytes each for 1-bit/grey/palette), never for
    a full-size RGB copy."""
    budget = MemoryBudget(10**9)
    image = decode_image(encoded(mode, (3000, 2000), fmt), max_pixels=10**8, min_side=232, budget=budget)
    assert image.mode == "RGB"
    assert 232 <= min(image.size) < 2 * 232
    assert abs(image.size[0] / image.size[1] - 1.5) < 0.02
    native = {"1": 2, "L": 1, "P": 1, "RGBA": 8}.get(mode, 16 if fmt == "WEBP" else 4) * 3000 * 2000
    if fmt == "JPEG":
        native = 4 * (3000 // 8) * (2000 // 8)  # the decoder itself scales by 1/8 per side
    assert budget.peak == native
    assert budget.held == 0


def test_shrinking_keeps_what_the_backbone_sees():
    """The reduced picture, resized as the backbone's preprocessing does, matches the full decode resized."""
    data = encoded("RGB", (3000, 2000), "PNG")
    full = decode_image(data, max_pixels=10**8).resize((348, 232), Image.Resampling.BILINEAR)
    small = decode_image(data, max_pixels=10**8, min_side=232).resize((348, 232), Image.Resampling.BILINEAR)
    difference = sum(abs(a - b) for a, b in zip(full.tobytes(), small.tobytes())) / len(full.tobytes())
    assert difference < 3


def test_the_1_bit_bomb_of_the_issue_is_refused_by_the_default_pixel_cap():
    """A ~11 KB 1-bit PNG of 9400x9400 (88 MP; 265 MB as RGB) passed the old cap of 89,478,485 pixels."""
    buffer = io.BytesIO()
    Image.new("1", (9400, 9400)).save(buffer, format="PNG")
    assert len(buffer.getvalue()) < 20_000
    with pytest.raises(MediaError, match="MEDIA_MAX_PIXELS=40000000"):
        decode_image(buffer.getvalue(), max_pixels=Settings().media_max_pixels, min_side=232)


def test_an_image_that_alone_needs_more_than_the_budget_is_refused_without_decoding():
    budget = MemoryBudget(10_000_000, setting="MEDIA_DECODE_BUDGET_BYTES")
    with pytest.raises(MediaError, match="MEDIA_DECODE_BUDGET_BYTES=10000000"):
        decode_image(encoded("RGB", (3000, 2000), "PNG"), max_pixels=10**8, min_side=232, budget=budget)
    assert budget.peak == 0
