"""Procedural images for the synthetic tasks: one coloured shape (or 7-segment digit) on a dark,
slightly noisy background, drawn with PIL at twice the size and box-downsampled (anti-aliased).

Everything random comes from the caller's ``numpy.random.Generator``, so an image is a pure
function of the generator state. `dominant_colour` and `shape_mask` let tests check an image
independently of how it was drawn.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # pixels per side (the CLIP tower's image_size)
_SCALE = 2  # drawn at SIZE * _SCALE, then box-downsampled
BACKGROUND = (16, 16, 20)
COLOURS = {
  "red": (230, 40, 40),
  "green": (40, 190, 60),
  "blue": (50, 90, 245),
  "yellow": (240, 225, 40),
  "purple": (150, 60, 220),
  "orange": (250, 140, 20),
  "cyan": (40, 215, 225),
  "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "star")
# 7-segment digits: segments a b c d e f g (top, top-right, bottom-right, bottom, bottom-left,
# top-left, middle).
_SEGMENTS = {
  0: "abcdef",
  1: "bc",
  2: "abdeg",
  3: "abcdg",
  4: "bcfg",
  5: "acdfg",
  6: "acdefg",
  7: "abc",
  8: "abcdefg",
  9: "abcdfg",
}


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
  if shape == "triangle":
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in _angles(3, -math.pi / 2)]
  if shape == "diamond":
    return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
  if shape == "star":
    pts = []
    for i, a in enumerate(_angles(10, -math.pi / 2)):
      rr = r if i % 2 == 0 else r * 0.45
      pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts
  raise ValueError(f"{shape!r} is not a polygon shape")


def _angles(n: int, start: float) -> list[float]:
  return [start + 2 * math.pi * i / n for i in range(n)]


def _canvas():
  s = SIZE * _SCALE
  img = Image.new("RGB", (s, s), BACKGROUND)
  return img, ImageDraw.Draw(img)


def _finish(img: Image.Image, rng: np.random.Generator, noise: float) -> Image.Image:
  small = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), np.float32)
  if noise:
    small = small + rng.normal(0.0, noise, small.shape)
  return Image.fromarray(np.clip(np.rint(small), 0, 255).astype(np.uint8))


def _jitter_colour(colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
  base = np.asarray(COLOURS[colour], np.int64) + rng.integers(-15, 16, 3)
  return tuple(int(x) for x in np.clip(base, 0, 255))


def shape_image(shape: str, colour: str, rng: np.random.Generator, noise: float = 6.0):
  """A ``SIZE`` x ``SIZE`` PIL image of one ``colour`` ``shape``, jittered in place and size."""
  if shape not in SHAPES:
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")
  img, draw = _canvas()
  k = _SCALE
  r = float(rng.uniform(10.0, 13.0)) * k  # radius in drawing pixels
  cx, cy = (SIZE / 2 + rng.uniform(-3, 3, 2)) * k
  fill = _jitter_colour(colour, rng)
  if shape == "circle":
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
  elif shape == "square":
    h = r * 0.82
    draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
  elif shape == "cross":
    w = r * 0.34
    draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
  else:
    draw.polygon(_polygon(shape, cx, cy, r), fill=fill)
  return _finish(img, rng, noise)


def digit_image(digit: int, colour: str, rng: np.random.Generator, noise: float = 6.0):
  """A 7-segment ``digit`` (0-9) in ``colour``, jittered in place."""
  if digit not in _SEGMENTS:
    raise ValueError(f"digit must be 0-9, got {digit!r}")
  img, draw = _canvas()
  k = _SCALE
  w, h, t = 14 * k, 24 * k, 3.5 * k  # digit width, height, stroke
  x0 = (SIZE / 2 + rng.uniform(-2, 2)) * k - w / 2
  y0 = (SIZE / 2 + rng.uniform(-2, 2)) * k - h / 2
  fill = _jitter_colour(colour, rng)
  ym = y0 + h / 2
  boxes = {
    "a": (x0, y0, x0 + w, y0 + t),
    "b": (x0 + w - t, y0, x0 + w, ym),
    "c": (x0 + w - t, ym, x0 + w, y0 + h),
    "d": (x0, y0 + h - t, x0 + w, y0 + h),
    "e": (x0, ym, x0 + t, y0 + h),
    "f": (x0, y0, x0 + t, ym),
    "g": (x0, ym - t / 2, x0 + w, ym + t / 2),
  }
  for seg in _SEGMENTS[digit]:
    draw.rectangle(boxes[seg], fill=fill)
  return _finish(img, rng, noise)


def foreground(image: Image.Image, threshold: float = 60.0) -> np.ndarray:
  """``[SIZE, SIZE]`` bool mask of pixels that are clearly not background."""
  px = np.asarray(image.convert("RGB"), np.float32)
  return np.abs(px - np.asarray(BACKGROUND, np.float32)).max(-1) > threshold


def dominant_colour(image: Image.Image) -> str:
  """The palette colour nearest to the mean foreground pixel (an independent check)."""
  px = np.asarray(image.convert("RGB"), np.float32)
  mask = foreground(image, 100.0)
  mean = px[mask].mean(0) if mask.any() else px.reshape(-1, 3).mean(0)
  names = list(COLOURS)
  dist = [np.linalg.norm(mean - np.asarray(COLOURS[n], np.float32)) for n in names]
  return names[int(np.argmin(dist))]
