"""Decode untrusted image bytes into RGB pictures, within limits on bytes and pixels.

Every format is shrunk while it is decoded, before it becomes RGB: JPEG through the decoder's own
scaling (`draft`), every other format by an integer box reduction of the decoded picture in its
native mode (1-bit, grey, palette or RGB), so an RGB copy of a big image never exists. The decoded
picture in its native mode is counted against a process-wide `MemoryBudget` while it exists.
"""

from __future__ import annotations

import contextlib
import io
import warnings

from PIL import Image, UnidentifiedImageError

from backend.common.errors import MediaError
from backend.core.memory_budget import MemoryBudget

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})


def decode_image(data: bytes, *, max_pixels: int, min_side: int = 0,
                 budget: MemoryBudget | None = None) -> Image.Image:
    """Decode `data` to an RGB image, refusing anything that is not a bounded raster image.

    `min_side` enables shrinking on decode: the result keeps both sides at least `min_side` (the
    backbone's resize loses nothing more), JPEGs are scaled down by the decoder itself and other
    formats by an integer box reduction before conversion to RGB. `budget`, when given, is held for
    the bytes the decoded picture takes in its native mode while it is decoded and reduced.
    """
    if not data:
        raise MediaError("The media file is empty (0 bytes).")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise MediaError(
                    f"Unsupported image format {image.format or 'unknown'}; "
                    f"use one of {', '.join(sorted(ACCEPTED_FORMATS))}."
                )
            width, height = image.size
            if width * height > max_pixels:
                raise MediaError(
                    f"Image is {width}x{height} pixels, above MEDIA_MAX_PIXELS={max_pixels}."
                )
            if min_side and image.format in ("JPEG", "MPO"):
                image.draft("RGB", _draft_size(width, height, min_side))
            with budget.hold(decoded_bytes(image)) if budget else contextlib.nullcontext():
                image.load()
                image = _shrink(image, min_side)
                return image.convert("RGB")
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise MediaError(f"Image has too many pixels to decode safely ({exc}); "
                         f"the limit is MEDIA_MAX_PIXELS={max_pixels}.") from None
    except UnidentifiedImageError as exc:
        raise MediaError(f"Not a decodable image: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise MediaError(f"The image is broken or truncated: {exc}") from None


def decoded_bytes(image: Image.Image) -> int:
    """Bytes Pillow and its codecs allocate to decode `image` (at its current, possibly drafted, size) and shrink it.

    Pillow keeps 1 byte per pixel for 1-bit, grey and palette pictures and 4 for every multi-band or 32-bit
    mode (RGB included). A 1-bit picture is copied to grey before reduction, 16-bit grey to 32-bit, and a
    picture with alpha to premultiplied alpha. libwebp decodes into a buffer of its own that Pillow then
    copies and converts, so a WebP takes 16 bytes per pixel (measured: a 39.7 MP WebP, 604 MB).
    """
    pixels = image.size[0] * image.size[1]
    if image.format == "WEBP":
        return 16 * pixels
    if image.mode in ("L", "P"):
        return pixels
    if image.mode == "1":
        return 2 * pixels
    if image.mode.startswith("I;16"):
        return 6 * pixels
    if image.mode in ("RGBA", "LA", "PA"):
        return 8 * pixels
    return 4 * pixels


def _shrink(image: Image.Image, min_side: int) -> Image.Image:
    """`image` reduced by the largest integer factor that keeps its shorter side at least `min_side`."""
    factor = min(image.size) // min_side if min_side else 1
    if factor < 2:
        return image
    if image.mode == "P":  # palette indices cannot be averaged: pick pixels, then convert the small picture
        size = (max(1, image.size[0] // factor), max(1, image.size[1] // factor))
        return image.resize(size, Image.Resampling.NEAREST)
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    try:
        return image.reduce(factor)
    except ValueError:  # a mode reduce does not take: convert first (counted in decoded_bytes' 4 per pixel)
        return image.convert("RGB").reduce(factor)


def _draft_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The size to ask `draft` for so the shorter side stays at least `min_side`."""
    scale = min_side / min(width, height)
    return max(1, int(width * scale) + 1), max(1, int(height * scale) + 1)
