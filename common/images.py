"""Uploaded digit images to the model's 8x8 input, with Pillow.

sklearn's digits are 8x8 ink counts (0 = paper, 16 = full ink) from 32x32 bitmaps averaged over 4x4
blocks. An upload of any size, colour or grey, dark ink on light paper or the reverse, is turned
into the same thing: grey, ink bright, area-averaged down to 8x8 (antialiased resize), 0..16.
Pillow, not torchvision: torchvision's wheels need the CUDA build of torch, and the CPU build saves
every worker ~150 MiB and the server the CUDA libraries (docs/performance.md, "Memory per runtime").
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import TooLargeError, UnsupportedMediaError

INK_SCALE = 16.0
ACCEPTED_FORMATS = ("PNG", "JPEG")
GREY_LEVELS = 255.0
PAPER_THRESHOLD = 0.5
"""A border brighter than this on average (0..1) is paper: the ink is dark and gets inverted."""


def _ink_bright(grey: np.ndarray) -> np.ndarray:
    """Invert light-paper images (0..1): the border is paper, so a bright border means dark ink."""
    border = np.concatenate([grey[0, :], grey[-1, :], grey[:, 0], grey[:, -1]])
    return 1.0 - grey if border.mean() > PAPER_THRESHOLD else grey


def decode(data: bytes, field: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open a PNG or JPEG, refusing oversized files and decompression bombs before decoding."""
    if len(data) > max_bytes:
        raise TooLargeError(field, f"{len(data)} bytes is more than the limit", f"at most {max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in ACCEPTED_FORMATS:
                raise UnsupportedMediaError(field, f"image format {image.format} is not accepted", "PNG or JPEG")
            width, height = image.size
            if width * height > max_pixels:
                raise TooLargeError(field, f"{width}x{height} pixels is more than the limit",
                                    f"at most {max_pixels} pixels")
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as err:  # ValueError: a malformed chunk ("Truncated IHDR chunk")
        raise UnsupportedMediaError(field, f"not a readable image ({type(err).__name__})", "PNG or JPEG") from None
    return image


def to_pixels(image: Image.Image, shape: tuple[int, ...]) -> np.ndarray:
    """The model input (1, *shape) for one decoded image: grey (ITU-R 601 luma, as torchvision's
    ``Grayscale``), ink bright, resized with Pillow's antialiased bilinear filter, 0..16."""
    grey = _ink_bright(np.asarray(image.convert("L"), dtype=np.float32) / GREY_LEVELS)
    small = Image.fromarray(grey, mode="F").resize((shape[-1], shape[-2]), Image.Resampling.BILINEAR)
    pixels = (np.asarray(small, dtype=np.float32) * INK_SCALE).clip(0.0, INK_SCALE)
    return pixels.reshape(1, *shape)
