"""Decode untrusted image bytes into RGB pictures, within limits on bytes and pixels."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from backend.common.errors import MediaError

ACCEPTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})


def decode_image(data: bytes, *, max_pixels: int, min_side: int = 0) -> Image.Image:
    """Decode `data` to an RGB image, refusing anything that is not a bounded raster image.

    `min_side` enables the JPEG fast path: the decoder scales down by a power of two while
    both sides stay at least `min_side`, which is several times faster for big photos and
    loses nothing the backbone's resize would keep.
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


def _draft_size(width: int, height: int, min_side: int) -> tuple[int, int]:
    """The size to ask `draft` for so the shorter side stays at least `min_side`."""
    scale = min_side / min(width, height)
    return max(1, int(width * scale) + 1), max(1, int(height * scale) + 1)
