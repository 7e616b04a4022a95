"""Image functions: bytes of any image file in, a normalised encoded image out.

Pure Python + Pillow, no Beam: the DoFns, the benchmarks' compute limit and the tests all
call :func:`convert_image`. What it guarantees (DESIGN.md, "Images"):

- the format is decided by content, never by file extension;
- EXIF orientation is applied; animated images give their first frame;
- every mode becomes RGB (or L with ``channels=1``): alpha is composited on white,
  16-bit samples are scaled to 8 bits (Pillow's ``convert`` would clip them), palette and
  CMYK are converted;
- decompression bombs (more than ``max_pixels``), truncated files, zero-byte and non-image
  objects raise :class:`ImageError` with a reason a person can act on.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import threading

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ConvertedImage",
    "ImageError",
    "Resize",
    "convert_image",
    "estimated_encoded_bytes",
    "parse_resize",
]

DEFAULT_MAX_PIXELS = 100_000_000
BACKGROUND = (255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
# Pillow's own bomb check only warns below 2x its global limit; ours (max_pixels) is
# exact and per call, so the global one is switched off.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An input that cannot become a training image.

    Attributes:
        code: a short stable category for counters (``not_an_image``, ``truncated``, …).
    """

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclasses.dataclass(frozen=True)
class Resize:
    """How to size the output: ``none``, ``shorter`` (side), ``fit`` or ``crop`` (box)."""

    mode: str = "none"
    width: int = 0
    height: int = 0

    def __str__(self) -> str:
        if self.mode == "none":
            return "none"
        if self.mode == "shorter":
            return f"shorter:{self.width}"
        return f"{self.mode}:{self.width}x{self.height}"

    def target(self, width: int, height: int) -> tuple[int, int]:
        """Output size for a ``width`` x ``height`` source (before any crop)."""
        if self.mode == "none":
            return width, height
        if self.mode == "shorter":
            scale = self.width / min(width, height)
        elif self.mode == "fit":
            scale = min(self.width / width, self.height / height)
        else:  # crop: cover the box, then cut the centre
            scale = max(self.width / width, self.height / height)
        return max(1, round(width * scale)), max(1, round(height * scale))


def parse_resize(spec: str) -> Resize:
    """Parses ``none``, ``shorter:256``, ``fit:224x224`` or ``crop:224x224``.

    Raises:
        ValueError: with the accepted forms, for anything else.
    """
    spec = spec.strip().lower()
    if spec == "none":
        return Resize()
    match = re.fullmatch(r"shorter:(\d+)", spec)
    if match and int(match[1]) > 0:
        return Resize("shorter", int(match[1]), int(match[1]))
    match = re.fullmatch(r"(fit|crop):(\d+)x(\d+)", spec)
    if match and int(match[2]) > 0 and int(match[3]) > 0:
        return Resize(match[1], int(match[2]), int(match[3]))
    raise ValueError(
        f"bad resize {spec!r}: use none, shorter:SIDE, fit:WxH or crop:WxH (e.g. crop:224x224)"
    )


@dataclasses.dataclass(frozen=True)
class ConvertedImage:
    encoded: bytes
    format: str  # "jpeg" or "png"
    height: int
    width: int
    channels: int
    source_format: str
    source_height: int
    source_width: int


def _open(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise ImageError("zero_bytes", "zero-byte object: nothing to decode")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        head = data[:16]
        raise ImageError(
            "not_an_image", f"not an image: unrecognised content (starts with {head!r})"
        ) from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageError("corrupt", f"corrupt image header: {e}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            "decompression_bomb",
            f"image claims {width}x{height} = {width * height:,} pixels, above the limit "
            f"of {max_pixels:,} (raise --max_pixels to accept it)",
        )
    return image


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(ImageOps.ExifTags.Base.Orientation, 1)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scales 16/32-bit integer and float samples into 0..255 instead of clipping."""
    if image.mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(array / 257.0), 0, 255).astype(np.uint8))
    if image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.size and np.nanmax(array) <= 1.0:
            array = array * 255.0
        array = np.nan_to_num(array)
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8))
    return image


def _to_channels(image: Image.Image, channels: int) -> Image.Image:
    image = _to_8bit(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        image.mode == "P" and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        image = Image.alpha_composite(background, rgba)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def convert_image(
    data: bytes,
    resize: Resize = Resize(),
    *,
    channels: int = 3,
    image_format: str = "jpeg",
    jpeg_quality: int = 90,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> ConvertedImage:
    """Decodes, orients, converts and resizes one image, then encodes it.

    Args:
        data: the source file's bytes, any format Pillow reads.
        resize: output size policy.
        channels: 3 (RGB) or 1 (grayscale).
        image_format: ``jpeg`` or ``png`` for the output.
        jpeg_quality: 1..95 for JPEG output.
        max_pixels: refuse sources with more pixels than this.

    Returns:
        The encoded image and its dimensions. With ``resize`` none, JPEG output and an RGB
        (or grayscale for ``channels=1``) JPEG source with no rotation, the source bytes are
        kept as they are (no generation loss), after a full decode proves them intact.

    Raises:
        ImageError: for any input that cannot become an image, with ``code`` and reason.
    """
    image = _open(data, max_pixels)
    source_format = (image.format or "unknown").lower()
    orientation = _orientation(image)
    rotated = orientation in (5, 6, 7, 8)
    source_width, source_height = image.size[::-1] if rotated else image.size
    target_width, target_height = resize.target(source_width, source_height)
    # A tiny file of extreme aspect ratio (1 x 20,000) scaled to cover a box would need
    # gigabytes before the crop: the pixel limit holds for that intermediate too.
    if target_width * target_height > max_pixels:
        raise ImageError(
            "resize_too_large",
            f"resizing {source_width}x{source_height} to {resize} needs an intermediate "
            f"{target_width}x{target_height} image, above the limit of {max_pixels:,} "
            "pixels (extreme aspect ratio)",
        )
    try:
        if image.format == "JPEG" and resize.mode != "none":
            # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 scale when that still
            # leaves at least the target size. Sizes here are before EXIF rotation.
            draft = (target_height, target_width) if rotated else (target_width, target_height)
            image.draft(image.mode if image.mode in ("RGB", "L") else None, draft)
        image.load()
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        oriented = ImageOps.exif_transpose(image) if orientation != 1 else image
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError("truncated", f"truncated or corrupt image data: {e}") from None

    keep_original = (
        resize.mode == "none"
        and image_format == "jpeg"
        and source_format == "jpeg"
        and oriented is image
        and image.mode == ("L" if channels == 1 else "RGB")
    )
    if keep_original:
        return ConvertedImage(
            data, "jpeg", source_height, source_width, channels,
            source_format, source_height, source_width,
        )  # fmt: skip

    converted = _to_channels(oriented, channels)
    if resize.mode != "none" and converted.size != (target_width, target_height):
        converted = converted.resize(
            (target_width, target_height), Image.Resampling.BILINEAR, reducing_gap=None
        )
    if resize.mode == "crop":
        left = (converted.width - resize.width) // 2
        top = (converted.height - resize.height) // 2
        converted = converted.crop((left, top, left + resize.width, top + resize.height))

    try:
        if image_format == "png":
            encoded = _encode(converted, format="PNG", compress_level=6)
        else:
            encoded = _encode(converted, format="JPEG", quality=jpeg_quality)
    except (OSError, ValueError) as e:
        raise ImageError("encode_failed", f"cannot encode {converted.size}: {e}") from None
    return ConvertedImage(
        encoded, image_format, converted.height, converted.width, channels,
        source_format, source_height, source_width,
    )  # fmt: skip


# Each thread's in-memory file for _encode; one is kept only up to this size.
_ENCODE_FILES = threading.local()
_KEEP_ENCODE_FILE_BYTES = 4 << 20


def _encode(image: Image.Image, **params) -> bytes:
    """``image.save(**params)``'s bytes, encoded without holding the GIL where possible.

    Saved into ``io.BytesIO``, Pillow encodes holding the GIL; saved to a file with a
    descriptor, it encodes with the GIL released (``encode_to_file``). Measured with
    224x224 JPEGs: two threads encoding at once ran 1.07x one thread through
    ``BytesIO`` and 1.96x through an in-memory file (``memfd``), at the same cost per
    image and with the same bytes. So on Linux each thread writes into its own memfd.
    """
    file = getattr(_ENCODE_FILES, "file", None)
    if file is None:
        if not hasattr(os, "memfd_create"):  # not Linux
            out = io.BytesIO()
            image.save(out, **params)
            return out.getvalue()
        fd = os.memfd_create("s3tfr-encode", os.MFD_CLOEXEC)
        file = _ENCODE_FILES.file = open(fd, "w+b", buffering=0)  # noqa: SIM115
    file.seek(0)
    image.save(file, **params)
    size = file.tell()
    encoded = os.pread(file.fileno(), size, 0)
    if size > _KEEP_ENCODE_FILE_BYTES:
        file.truncate(0)
    return encoded


def estimated_encoded_bytes(resize: Resize, image_format: str, source_bytes: int) -> int:
    """A rough output size for one image, used only to pick a shard count."""
    if resize.mode == "none":
        return source_bytes
    # shorter:N does not know the aspect ratio ahead; 4:3 is the common case.
    pixels = resize.width * resize.height * (4 / 3 if resize.mode == "shorter" else 1)
    per_pixel = 1.5 if image_format == "png" else 0.35
    return max(1, min(source_bytes, math.ceil(pixels * per_pixel)))
