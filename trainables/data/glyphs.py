"""Procedural glyphs: the tiny base's pre-training source (the role ImageNet plays for the official VAR).

Letters and symbols rendered from the TrueType fonts that matplotlib ships (DejaVu Sans / Mono / Serif, STIX and
Computer Modern, upright, bold and slanted), each image with its own font, size, rotation, stroke width, position,
blur and ink/paper colours. A model pre-trained on them has seen strokes of every width on paper of every tone, so
it can represent a new stroke domain; it has never seen a digit: no digit is ever rendered (``GLYPH_CLASSES``
holds letters and symbols only), so handwritten digits stay a domain the base must be adapted to.
Images are uint8 [N, 3, H, W], fully determined by (split, seed); no files are read but the fonts.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageFont

# Uppercase letters, the lowercase letters whose shapes differ from their capitals, and symbols; never a digit.
GLYPH_CLASSES = tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + tuple("abdeghnqrt") + tuple("+#%&@?")
FONT_FILES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
    "cmb10.ttf",
    "cmti10.ttf",
)
LOW_RESOLUTION_SHARE = 0.5
MAX_STROKE = 0.07  # extra stroke width, as a share of the font size
SUPERSAMPLE = 4  # render at 4x, then box-filter down: anti-aliased strokes at any size
SPLITS = ("train", "test")


def font_folder() -> Path:
    import matplotlib  # only for the location of its bundled fonts

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _font_path(file: str) -> Path:
    path = font_folder() / file
    if not path.is_file():
        raise FileNotFoundError(f"matplotlib's bundled font {path} is missing; reinstall matplotlib")
    return path


@cache
def _font(file: str, size_px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_path(file)), size_px)


def fonts_sha256() -> str:
    """SHA-256 (hex) of the bytes of every font in ``FONT_FILES``, in order: what the glyphs are drawn from (a
    matplotlib or distribution that ships other font files draws other pixels)."""
    digest = hashlib.sha256()
    for file in FONT_FILES:
        data = _font_path(file).read_bytes()
        digest.update(f"{file}:{len(data)}:".encode())
        digest.update(data)
    return digest.hexdigest()


def _drawn(font: ImageFont.FreeTypeFont, char: str) -> np.ndarray:
    canvas = Image.new("L", (128, 128), 0)
    ImageDraw.Draw(canvas).text((64, 64), char, font=font, fill=255, anchor="mm")
    return np.asarray(canvas)


@cache
def fonts_for(char: str) -> tuple[str, ...]:
    """The font files that draw ``char`` as a real glyph (not blank, not the font's 'missing glyph' box)."""
    usable = []
    for file in FONT_FILES:
        font = _font(file, 64)
        drawn = _drawn(font, char)
        if drawn.any() and not np.array_equal(drawn, _drawn(font, "\uffff")):
            usable.append(file)
    if not usable:
        raise ValueError(f"no bundled font draws {char!r}")
    return tuple(usable)


def _colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(ink, paper) RGB in [0, 1]: mostly dark ink on light grey paper (60%), else light on dark (20%) or coloured
    (20%)."""
    kind = rng.uniform()
    if kind < 0.6:
        paper, ink = rng.uniform(0.75, 1.0), rng.uniform(0.0, 0.35)
        return np.full(3, ink) + rng.uniform(-0.04, 0.04, 3), np.full(3, paper) + rng.uniform(-0.04, 0.04, 3)
    if kind < 0.8:
        paper, ink = rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0)
        return np.full(3, ink) + rng.uniform(-0.04, 0.04, 3), np.full(3, paper) + rng.uniform(-0.04, 0.04, 3)
    ink, paper = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    while np.abs(ink - paper).sum() < 1.0:  # keep the glyph readable against its paper
        ink = rng.uniform(0, 1, 3)
    return ink, paper


def ink_mask(char: str, *, image_size: int, rng: np.random.Generator, max_blur_px: float = 1.0) -> np.ndarray:
    """Coverage of one rendered glyph, float32 [H, W] in [0, 1]: random font, size, stroke, rotation, offset, blur."""
    big = image_size * SUPERSAMPLE
    font_file = fonts_for(char)[rng.integers(len(fonts_for(char)))]
    size = 2 * big // 3  # the font size only sets the stroke/shape detail: the glyph is rescaled below
    stroke = int(
        round(rng.uniform(0.0, MAX_STROKE) * size)
    )  # hairline to marker strokes on top of the font's own weight
    canvas = Image.new("L", (2 * big, 2 * big), 0)
    ImageDraw.Draw(canvas).text(
        (big, big),
        char,
        font=_font(font_file, size),
        fill=255,
        anchor="mm",
        stroke_width=stroke,
        stroke_fill=255,
    )
    canvas = canvas.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    glyph = canvas.crop(canvas.getbbox() or (0, 0, 2 * big, 2 * big))
    scale = rng.uniform(0.55, 0.95) * big / max(glyph.size)  # its longer side spans 55-95% of the frame
    glyph = glyph.resize(
        (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.BILINEAR
    )
    frame = Image.new("L", (big, big), 0)
    slack_x, slack_y = big - glyph.width, big - glyph.height
    frame.paste(glyph, (int(rng.uniform(0.2, 0.8) * slack_x), int(rng.uniform(0.2, 0.8) * slack_y)))
    blur = (
        rng.uniform(0.0, max_blur_px) * SUPERSAMPLE
    )  # up to one output pixel: soft strokes like scanned ink
    if blur > 0.3:
        frame = frame.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(frame.resize((image_size, image_size), Image.BOX), dtype=np.float32) / 255.0


def render(char: str, *, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One glyph image, float32 [H, W, 3] in [0, 1]. Half of them are scanned at a coarser resolution (half to
    three quarters of ``image_size``) and resampled up bicubically, like low-resolution scans shown larger."""
    if rng.uniform() < LOW_RESOLUTION_SHARE:
        low = int(rng.integers(max(4, image_size // 2), max(5, 3 * image_size // 4) + 1))
        coarse = ink_mask(char, image_size=low, rng=rng, max_blur_px=0.0)  # the resampling softens it already
        resized = Image.fromarray(coarse, mode="F").resize((image_size, image_size), Image.BICUBIC)
        mask = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)[..., None]
    else:
        mask = ink_mask(char, image_size=image_size, rng=rng)[..., None]
    ink, paper = _colours(rng)
    shading = (
        1.0 + 0.08 * rng.uniform(-1, 1) * np.linspace(-1, 1, image_size)[None, :, None]
    )  # uneven lighting
    return np.clip(paper * shading * (1 - mask) + ink * mask, 0.0, 1.0)


def glyph_images(
    *, split: str, images_per_class: int, image_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 3, H, W], labels int64 [N] indexing ``GLYPH_CLASSES``); splits use disjoint streams."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if images_per_class < 1 or image_size < 8:
        raise ValueError(
            f"need images_per_class >= 1 and image_size >= 8, got {images_per_class}, {image_size}"
        )
    rng = np.random.default_rng([seed, SPLITS.index(split), 7])
    labels = np.repeat(np.arange(len(GLYPH_CLASSES)), images_per_class)
    pixels = np.stack([render(GLYPH_CLASSES[k], image_size=image_size, rng=rng) for k in labels])
    images = torch.from_numpy(np.round(pixels * 255).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    return images, torch.from_numpy(labels).long()
