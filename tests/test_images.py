"""Decoding untrusted bytes: real photos pass (with the JPEG fast path), everything else is refused with a reason."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from backend.core.images import decode_image
from backend.common.errors import MediaError
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
