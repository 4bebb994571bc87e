"""Montages of cine frames as PNG (and animated GIF) for quick visual review."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from scripts.runtime.files import atomic_write


def to_uint8(frame: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """Window a 2D frame to 0..255 (default window: its 0.5 and 99.5 percentiles)."""
    frame = np.asarray(frame, dtype=np.float32)
    lo = float(np.percentile(frame, 0.5)) if lo is None else lo
    hi = float(np.percentile(frame, 99.5)) if hi is None else hi
    return (np.clip((frame - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)


def grid(tiles: Sequence[np.ndarray], ncols: int, captions: Sequence[str] | None, scale: int) -> Image.Image:
    """Tile equally sized uint8 frames into one image, captions drawn at each tile's top-left."""
    h, w = tiles[0].shape
    nrows = -(-len(tiles) // ncols)
    canvas = np.zeros((nrows * h, ncols * w), np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, ncols)
        canvas[r * h : (r + 1) * h, c * w : (c + 1) * w] = tile
    image = Image.fromarray(canvas).resize((ncols * w * scale, nrows * h * scale), Image.NEAREST)
    if captions:
        draw = ImageDraw.Draw(image)
        for k, text in enumerate(captions):
            r, c = divmod(k, ncols)
            draw.text((c * w * scale + 3, r * h * scale + 2), text, fill=255)
    return image


def montage(frames: Sequence[np.ndarray], ncols: int, captions: Sequence[str] | None = None,
            scale: int = 2) -> Image.Image:
    """2D frames (windowed per frame) as one grid image."""
    return grid([to_uint8(f) for f in frames], ncols, captions, scale)


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write `image` as a PNG, atomically; returns the path."""
    with atomic_write(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)


def save_montage(
    frames: Sequence[np.ndarray], path: str | Path, ncols: int, captions: Sequence[str] | None = None, scale: int = 2
) -> Path:
    """Write 2D frames (windowed per frame) as one PNG grid, atomically; returns the path."""
    return save_png(montage(frames, ncols, captions, scale), path)


def save_cine_gif(cines: Sequence[np.ndarray], path: str | Path, ncols: int, fps: int = 25, scale: int = 2) -> Path:
    """Write cines (each T x H x W, windowed per cine) side by side as an animated GIF, atomically."""
    windows = [(float(np.percentile(c, 0.5)), float(np.percentile(c, 99.5))) for c in cines]
    frames = [
        grid([to_uint8(c[t], *win) for c, win in zip(cines, windows)], ncols, None, scale)
        for t in range(min(len(c) for c in cines))
    ]
    with atomic_write(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=1000 // fps, loop=0)
    return Path(path)
