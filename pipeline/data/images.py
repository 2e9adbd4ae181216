"""Decoding image bytes to RGB, the one documented way every component uses.

Teachers and the student must see the same pixels for the same bytes, so both call `decode_rgb`:
EXIF orientation is applied first, then the mode is converted to 8-bit RGB:
- palette (P, PA) and alpha modes (RGBA, LA) are composited over white, so transparent areas do
  not turn black or take whatever colour the encoder left under the alpha channel;
- 16-bit and 32-bit greyscale (I;16*, I, F) are rescaled from their full range to 0..255;
- everything else (L, CMYK, YCbCr, 1, ...) goes through Pillow's own `convert("RGB")`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

# Pillow's own default (about 89 Mpx) is a warning, not an error; a bomb in a dataset must be an error.
DEFAULT_MAX_PIXELS = 89_478_485


class ImageDecodeError(ValueError):
    """The bytes are not an image this pipeline can use (corrupt, truncated, too large)."""


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes into an RGB `PIL.Image` (mode "RGB", uint8).

    Raises `ImageDecodeError` with a readable reason for empty, corrupt, truncated or oversized images: over
    `max_pixels` (width x height), or over Pillow's own hard limit (twice `PIL.Image.MAX_IMAGE_PIXELS`, about
    179 Mpx by default), which a larger `max_pixels` does not lift. No other exception escapes: whatever goes
    wrong with one image's bytes (including its EXIF block or mode conversion) is that image's failure.
    """
    if not data:
        raise ImageDecodeError("empty image file (0 bytes)")
    buffer = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            # `max_pixels` is the limit: Pillow's warning at its own default must not veto a higher one.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(buffer)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image of {width}x{height} pixels is over the limit of {max_pixels} pixels")
            image.load()
            # Inside the try: EXIF parsing and mode conversion read untrusted bytes too (a malformed eXIf chunk
            # raises SyntaxError from exif_transpose), and one bad file must not stop a job or a DataLoader.
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        # Pillow names the buffer by its repr, a memory address: drop it so a reason is the same on every run.
        reason = str(exc).replace(f" {buffer!r}", "")
        raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {reason}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert any Pillow mode to 8-bit RGB (see the module docstring)."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "RGB":
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        high = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        scaled = np.clip(array / high * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return image.convert("RGB")
