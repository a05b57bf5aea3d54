"""Drawing the bundled pictures with Pillow: flat shapes and words, anti-aliased, on a tinted grey with noise.

What this file teaches:
- Anti-aliasing by supersampling: everything is drawn at SUPERSAMPLE times the size, then averaged down
  with a box filter, so an 8-pixel shape still has the right silhouette and a pure colour at its centre.
- Shapes as polygons: each non-circle is a list of (radius, angle) vertices around its centre, rotated by
  the shape's own angle, so one function draws squares, triangles, stars and crosses at any turn.
- Legible text from Pillow's built-in font (scalable since Pillow 10.1; older builds fall back to a small
  bitmap font), shrunk until the word fits, in whichever ink stands out more from the background.
- Colours chosen far apart in RGB and from every background, so Gaussian pixel noise never makes one look
  like another: the picture's labels stay true.

prepare/shapes.py decides what a scene holds (which shapes, where, which question) and calls these to draw it;
every random draw here comes from the generator it is handed, so a scene's pixels follow from its seed.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SUPERSAMPLE = 4  # drawn at 4x, then each output pixel is the mean of 4x4 drawn ones
COLORS = {  # far apart in RGB (>= 100) and from the grey backgrounds, so a noisy pixel still tells them apart
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (240, 225, 40),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "purple": (150, 40, 190),
    "white": (250, 250, 250),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")


@dataclass
class Shape:
    """One drawn shape; x, y (its centre) and r (its bounding radius) in output pixels; where: its grid cell's
    name (prepare/shapes.py's WHERE)."""

    name: str
    color: str
    x: float
    y: float
    r: float
    angle: float
    where: str


def background(rng: np.random.Generator) -> tuple[int, int, int]:
    """A mid grey with a slight tint: far from white, from every colour, and from the dark text."""
    level = rng.integers(95, 166)
    return tuple(int(c) for c in np.clip(level + rng.integers(-15, 16, size=3), 0, 255))


def draw_shapes(rng: np.random.Generator, shapes: list[Shape], image_size: int,
                tint: tuple[int, int, int]) -> Image.Image:
    """The shapes, filled in their colours, on a background of colour tint: an image_size x image_size RGB picture."""
    big = Image.new("RGB", (image_size * SUPERSAMPLE,) * 2, tint)
    draw = ImageDraw.Draw(big)
    for shape in shapes:
        if shape.name == "circle":  # 0.9 r: a full-radius disc looks bigger than the polygons beside it
            x, y, r = (v * SUPERSAMPLE for v in (shape.x, shape.y, 0.9 * shape.r))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=COLORS[shape.color])
        else:
            draw.polygon(_outline(shape, SUPERSAMPLE), fill=COLORS[shape.color])
    return _finish(rng, big, image_size)


def draw_word(rng: np.random.Generator, word: str, image_size: int,
              tint: tuple[int, int, int]) -> tuple[Image.Image, list[tuple[float, float]]]:
    """The word at a random size and place on a background of colour tint, in dark or light ink, whichever
    stands out more -> the picture, and the centre (x, y) of each letter in output pixels."""
    margin = 2 * SUPERSAMPLE
    size = int(rng.uniform(0.30, 0.50) * image_size * SUPERSAMPLE)
    font = _font(size)
    left, top, right, bottom = font.getbbox(word)
    while right - left > image_size * SUPERSAMPLE - 2 * margin:  # shrink until the word fits the width
        size = int(size * 0.9)
        font = _font(size)
        left, top, right, bottom = font.getbbox(word)
    x = rng.uniform(margin, image_size * SUPERSAMPLE - margin - (right - left)) - left
    y = rng.uniform(margin, image_size * SUPERSAMPLE - margin - (bottom - top)) - top
    ink = (20, 20, 20) if sum(tint) > 3 * 128 else (245, 245, 245)
    big = Image.new("RGB", (image_size * SUPERSAMPLE,) * 2, tint)
    ImageDraw.Draw(big).text((x, y), word, fill=ink, font=font)
    middle = (y + (top + bottom) / 2) / SUPERSAMPLE  # a letter's centre: halfway along its advance, the line's middle
    centres = [((x + (font.getlength(word[:k]) + font.getlength(word[:k + 1])) / 2) / SUPERSAMPLE, middle)
               for k in range(len(word))]
    return _finish(rng, big, image_size), centres


def _outline(shape: Shape, scale: float) -> list[tuple[float, float]]:
    """Polygon vertices of a non-circle shape at `scale` times the output size, rotated by shape.angle."""
    if shape.name == "square":
        radii, angles = [1.0] * 4, [math.pi / 4 + k * math.pi / 2 for k in range(4)]
    elif shape.name == "triangle":
        radii, angles = [1.0] * 3, [k * 2 * math.pi / 3 for k in range(3)]
    elif shape.name == "star":  # 5 points, inner radius 0.5: fat enough to stay a star when small
        radii, angles = [1.0, 0.5] * 5, [k * math.pi / 5 for k in range(10)]
    else:  # cross: a plus sign whose arms are 0.5 r wide
        half = 0.25
        corners = [(half, 1), (half, half), (1, half), (1, -half), (half, -half), (half, -1)]
        corners += [(-u, -v) for u, v in corners]
        radii = [math.hypot(u, v) / math.hypot(1, half) for u, v in corners]
        angles = [math.atan2(v, u) for u, v in corners]
    return [((shape.x + shape.r * k * math.cos(a + shape.angle)) * scale,
             (shape.y + shape.r * k * math.sin(a + shape.angle)) * scale) for k, a in zip(radii, angles)]


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at `size` pixels; Pillow built without FreeType only has a small bitmap one. Kept
    per size: a font loaded anew decodes the font file embedded in Pillow and renders its glyphs again, about half
    of a word picture's time (1.9 -> 0.9 ms here). A font object only measures and draws: the same bytes."""
    try:
        return ImageFont.load_default(size=size)
    except ImportError:
        return ImageFont.load_default()


def _finish(rng: np.random.Generator, big: Image.Image, image_size: int) -> Image.Image:
    """Box-filter down to image_size, then add Gaussian pixel noise of a random strength (sigma 0 to 6)."""
    pixels = np.asarray(big.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(0.0, 6.0), size=pixels.shape)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
