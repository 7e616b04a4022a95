"""Generated image trees with real encoders: the demo's sample data, the tests' inputs and
the benchmarks' photo-like JPEGs.

Photo-like means smooth gradients, shapes and sensor-like noise, so JPEG sizes and decode
costs resemble photographs rather than flat colour.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SAMPLE_CLASSES", "encode", "photo_like", "write_photo_tree", "write_sample_tree"]

SAMPLE_CLASSES = ("bird", "cat", "dog")
CORRUPT_NAME = "broken.jpg"


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image with gradients, a few filled shapes and noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3)
    slope = rng.uniform(-0.6, 0.6, size=(3, 2))
    channels = [
        base[c] + slope[c, 0] * x * 255 / max(width, 1) + slope[c, 1] * y * 255 / max(height, 1)
        for c in range(3)
    ]
    array = np.stack(channels, axis=-1)
    array += rng.normal(0, 6, size=array.shape)
    image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x0, x1 = sorted(rng.integers(0, max(width, 2), size=2))
        y0, y1 = sorted(rng.integers(0, max(height, 2), size=2))
        draw.ellipse((x0, y0, x1, y1), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def write_sample_tree(
    root: str,
    classes: tuple[str, ...] = SAMPLE_CLASSES,
    per_class: int = 10,
    seed: int = 0,
    corrupt: bool = True,
) -> dict[str, int]:
    """Writes ``root/<class>/<name>`` with mixed sizes, JPEG and PNG, and one corrupt file.

    Returns:
        Images written per class (the corrupt file not counted).
    """
    rng = np.random.default_rng(seed)
    counts = {}
    for c in classes:
        os.makedirs(os.path.join(root, c), exist_ok=True)
        for i in range(per_class):
            width, height = (int(v) for v in rng.integers(64, 400, size=2))
            image = photo_like(width, height, rng)
            fmt, ext = ("PNG", "png") if i % 3 == 2 else ("JPEG", "jpg")
            with open(os.path.join(root, c, f"{c}_{i:04d}.{ext}"), "wb") as f:
                f.write(encode(image, fmt, **({"quality": 90} if fmt == "JPEG" else {})))
        counts[c] = per_class
    if corrupt:
        whole = encode(photo_like(200, 150, rng), "JPEG", quality=90)
        with open(os.path.join(root, classes[-1], CORRUPT_NAME), "wb") as f:
            f.write(whole[: len(whole) // 3])  # a JPEG cut short: truncated
    return counts


def write_photo_tree(
    root: str, count: int, classes: int = 4, size: tuple[int, int] = (500, 375), seed: int = 0
) -> int:
    """Writes ``count`` photo-like JPEGs of ``size`` spread over ``classes`` folders.

    Returns:
        Total bytes written.
    """
    rng = np.random.default_rng(seed)
    total = 0
    for i in range(count):
        folder = os.path.join(root, f"class_{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        data = encode(photo_like(*size, rng), "JPEG", quality=90)
        with open(os.path.join(folder, f"img_{i:06d}.jpg"), "wb") as f:
            f.write(data)
        total += len(data)
    return total
