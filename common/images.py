"""Uploaded digit images to the model's 8x8 input, with torchvision transforms.

sklearn's digits are 8x8 ink counts (0 = paper, 16 = full ink) from 32x32 bitmaps averaged over 4x4
blocks. An upload of any size, colour or grey, dark ink on light paper or the reverse, is turned
into the same thing: grey, ink bright, area-averaged down to 8x8 (antialiased resize), 0..16.
"""

from __future__ import annotations

import functools
import io
import warnings
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from common.errors import TooLargeError, UnsupportedMediaError

INK_SCALE = 16.0
ACCEPTED_FORMATS = ("PNG", "JPEG")


def _ink_bright(image: Any) -> Any:
    """Invert light-paper images: the border is paper, so a bright border means dark ink."""
    import torch

    border = torch.cat([image[..., 0, :], image[..., -1, :], image[..., :, 0], image[..., :, -1]], dim=-1)
    return 1.0 - image if border.mean() > 0.5 else image


@functools.cache
def digit_transform(size: tuple[int, int]) -> Any:
    """Imported on first use: the server's main process imports this module but never decodes an
    image, and importing torch costs a process ~700 MB."""
    import torch
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Grayscale(num_output_channels=1),
            v2.ToDtype(torch.float32, scale=True),
            v2.Lambda(_ink_bright),
            v2.Resize(list(size), antialias=True),
            v2.Lambda(lambda t: (t * INK_SCALE).clamp(0.0, INK_SCALE)),
        ]
    )


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
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as err:
        raise UnsupportedMediaError(field, f"not a readable image ({type(err).__name__})", "PNG or JPEG") from None
    return image


def to_pixels(image: Image.Image, shape: tuple[int, ...]) -> np.ndarray:
    """The model input (1, *shape) for one decoded image."""
    if image.mode not in ("L", "RGB"):
        image = image.convert("RGB")
    pixels = digit_transform((shape[-2], shape[-1]))(image)
    return pixels.reshape(1, *shape).numpy()
