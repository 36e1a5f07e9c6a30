"""How an image file's pixels are shown: the one decoding every reader of dataset pixels uses (training, token
caches, reference statistics, image checks, and the analysis's sample grids). Part of the contract between the
two sides (PIL and numpy only): the analysis, which imports no torch, shows real images as training sees them."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how a camera's stored pixels are turned for display
# PIL modes with an alpha channel ("a": premultiplied); palette and other images may name a transparent colour.
TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "PA")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB as a viewer shows it: turned upright by its EXIF orientation, and one-channel
    16/32-bit integer or float pixels rescaled to 8 bits (PIL's ``convert("RGB")`` clips them at 255, so a
    16-bit scan came out almost white). Every reader of dataset pixels (training, token caches, reference
    statistics, image checks, sample grids) decodes through here; transparent pixels are shown on white. Changing
    its output means bumping ``token_cache.CACHE_FORMAT``, ``metrics.REFERENCE_FORMAT`` and
    ``datasets.CHECK_FORMAT`` so old caches miss."""
    # The full scale is read before turning: a turned copy loses the TIFF tags that give a mode-I bit depth.
    full_scale = _full_scale(image) if image.mode in ("I", "F") or image.mode.startswith("I;16") else None
    if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if full_scale is not None:
        pixels = np.asarray(image, dtype=np.float64) * (255.0 / full_scale)
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode in TRANSPARENT_MODES or "transparency" in image.info:
        # convert("RGB") drops the alpha, showing whatever colour the file keeps under a transparent pixel (black
        # in one file, white in the next): composited onto white instead, as on a page.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return image.convert("RGB")


def _full_scale(image: Image.Image) -> float:
    """The pixel value shown as white in a one-channel high-depth image: 1.0 for floats (the usual [0, 1]
    convention), 2**16 - 1 for PIL's 16-bit modes and for mode I (how 16-bit PNG and PGM files open), 2**31 - 1
    for a TIFF whose BitsPerSample tag (258) gives its mode-I pixels more than 16 bits."""
    if image.mode == "F":
        return 1.0
    bits = getattr(image, "tag_v2", {}).get(258, 16) if image.mode == "I" else 16
    bits = bits[0] if isinstance(bits, tuple) else bits  # one entry per channel in some TIFFs
    return float(2**31 - 1 if bits > 16 else 2**16 - 1)  # mode I is signed 32-bit: 2**31 - 1 is its top
