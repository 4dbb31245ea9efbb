"""Images as the loop moves them: PNG bytes in, uint8 RGB arrays out, and grids for people."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def to_png(arr: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG bytes."""
    arr = np.asarray(arr)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {arr.shape} {arr.dtype}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes, size: int | None = None) -> np.ndarray:
    """Decode PNG bytes to an (H, W, 3) uint8 RGB array; with `size`, insist on size x size."""
    if not isinstance(data, (bytes, bytearray)) or not bytes(data[:8]) == PNG_MAGIC:
        head = bytes(data[:8]) if isinstance(data, (bytes, bytearray)) else type(data).__name__
        raise ValueError(f"not a PNG image (starts with {head!r})")
    try:
        with Image.open(io.BytesIO(data)) as im:
            arr = np.asarray(im.convert("RGB"))
    except Exception as e:  # truncated or corrupt file
        raise ValueError(f"unreadable PNG: {e}") from e
    if size is not None and arr.shape[:2] != (size, size):
        raise ValueError(f"expected a {size}x{size} image, got {arr.shape[1]}x{arr.shape[0]}")
    return arr


def thumbnail(data: bytes, size: int) -> np.ndarray:
    """PNG bytes as a size x size uint8 RGB array, whatever size they came at (for grids)."""
    arr = from_png(data)
    if arr.shape[:2] == (size, size):
        return arr
    return np.asarray(Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR))


def save_grid(images: list[np.ndarray], path: Path, scale: int = 3, cols: int = 8) -> None:
    """A grid of images (one size), upscaled `scale` times, as a PNG at `path`."""
    if not images:
        return
    n = len(images)
    cols = min(cols, n)
    rows = (n + cols - 1) // cols
    h, w, _ = images[0].shape
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 64, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = im
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)
