"""Image functions: bytes of any image file in, a normalised encoded image out.

Pillow, libjpeg-turbo and OpenCV, no Beam: the DoFns, the benchmarks' compute limit and
the tests all call :func:`convert_image`. A resized JPEG goes through
:mod:`transforms.turbo` (DCT-scaled decode, SIMD resampling, libjpeg-turbo encode); every
other input, and a JPEG that path declines, through Pillow. What it guarantees:

- the format is decided by content, never by file extension, and only JPEG, PNG, GIF,
  WebP, TIFF, BMP and MPO files reach a decoder;
- EXIF orientation is applied; animated images give their first frame;
- every mode becomes RGB (or L with ``channels=1``): alpha is composited on white,
  16-bit samples are scaled to 8 bits (Pillow's ``convert`` would clip them), palette and
  CMYK are converted;
- every input either converts or raises :class:`ImageError` with a stable code and a
  reason a person can act on, built from fixed text and numbers, never from the input's
  bytes: decompression bombs (more pixels, or more bytes of working memory, than
  ``max_pixels`` allows), truncated or corrupt files, unsupported formats, zero-byte
  and non-image objects, and conversions that run past their time budget.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
import threading
import time
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from transforms import turbo

__all__ = [
    "DEFAULT_JPEG_QUALITY",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_TIME_BUDGET_S",
    "JPEG_MAX_SIDE",
    "ConvertedImage",
    "ImageError",
    "Resize",
    "convert_image",
    "estimated_encoded_bytes",
    "parse_resize",
]

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_TIME_BUDGET_S = 60.0
DEFAULT_JPEG_QUALITY = 90
# JPEG's frame header holds each side in 16 bits.
JPEG_MAX_SIDE = 65_535
BACKGROUND = (255, 255, 255)
# The decoders an input may reach, most common first. Pillow would otherwise try every
# plugin it has, and hand EPS and PostScript files to Ghostscript where it is installed.
# MPO files open through the JPEG plugin.
_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP")
_FORMAT_NAMES = {"JPEG": "JPEG", "PNG": "PNG", "GIF": "GIF", "WEBP": "WebP",
                 "TIFF": "TIFF", "BMP": "BMP", "MPO": "MPO"}  # fmt: skip
_SUPPORTED = "JPEG, PNG, GIF, WebP, TIFF, BMP and MPO"
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_ORIENTATION = 0x0112  # the EXIF tag
# What ImageOps.exif_transpose does for each EXIF orientation.
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Pillow keeps 1, L and P in a byte per pixel, the 16-bit modes in two and every other
# mode (RGB included) in four.
_DECODED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
# One conversion may hold this many bytes per pixel of ``max_pixels``: the decoded image
# and one full-size copy of four bytes a pixel (a rotated RGB image, CMYK converted to
# RGB) - what any ordinary 8-bit image at the pixel limit needs.
_BUDGET_BYTES_PER_PIXEL = 8
# Pixel-wise work on large images (16-bit scaling, alpha compositing) goes a strip of
# about this many pixels at a time, so that no full-size temporary is made.
_STRIP_PIXELS = 1 << 20
# v / 257 rounded to the nearest integer, for every 16-bit v: (v + 128) // 257.
_SCALE_16_TO_8 = ((np.arange(1 << 16, dtype=np.uint32) + 128) // 257).astype(np.uint8)
_STAGES = {
    "open": "reading its header",
    "orient": "reading its EXIF orientation",
    "decode": "decoding its pixels",
    "convert": "converting its pixels",
    "resize": "resizing it",
    "encode": "encoding the output",
}

# Pillow's own bomb check only warns below 2x its global limit; ours (max_pixels) is
# exact and per call, so the global one is switched off.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Pillow's log lines and warnings are all about the file being decoded, and some quote
# its bytes (PNG chunk types and TIFF tag values at DEBUG): no byte of an input may
# reach a log, and an image's failure is already its rejection.
logging.getLogger("PIL").setLevel(logging.CRITICAL)
warnings.filterwarnings("ignore", module=r"PIL\.")


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
        f"bad resize {spec!r}: use none, shorter:SIDE, fit:WxH or crop:WxH "
        "(e.g. crop:224x224)"
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


class _Stage:
    """The stage one conversion is in (its rejection's code) and its time budget.

    Pillow cannot be interrupted inside a decoder or a resize, so the budget is checked
    between stages and between strips: a conversion stops at the first check past its
    deadline. What one stage can cost is bounded by the pixel limit.
    """

    __slots__ = ("_budget_s", "_deadline", "name")

    def __init__(self, budget_s: float) -> None:
        self.name = "open"
        self._budget_s = budget_s
        self._deadline = time.monotonic() + budget_s

    def enter(self, name: str) -> None:
        self.check()
        self.name = name

    def check(self) -> None:
        if time.monotonic() > self._deadline:
            raise ImageError(
                "too_slow",
                f"stopped after more than {self._budget_s:g} s, while "
                f"{_STAGES[self.name]}: the image costs too much to convert",
            )


def _accepts(accept, prefix: bytes) -> bool:
    """Whether a Pillow plugin's signature check takes ``prefix``."""
    try:
        result = accept(prefix)
    except Exception:  # noqa: BLE001 - a plugin's check on a short or odd prefix
        return False
    return bool(result) and not isinstance(result, str)


def _claimed_format(prefix: bytes) -> str | None:
    """The supported format whose signature ``prefix`` starts with, if any."""
    Image.init()
    for name in _FORMATS:
        if name in Image.OPEN and _accepts(Image.OPEN[name][1], prefix):
            return name
    return None


def _unidentified(prefix: bytes) -> ImageError:
    claimed = _claimed_format(prefix)
    if claimed:
        return ImageError(
            "corrupt",
            f"corrupt image header: the file starts like a {_FORMAT_NAMES[claimed]} "
            "file, but its header cannot be read",
        )
    for name, (_factory, accept) in Image.OPEN.items():
        if name not in _FORMATS and accept is not None and _accepts(accept, prefix):
            return ImageError(
                "unsupported_format",
                f"unsupported format: a {name} file (only {_SUPPORTED} are converted)",
            )
    return ImageError(
        "not_an_image",
        f"not an image: the content is none of the formats converted ({_SUPPORTED})",
    )


def _rejection(stage: _Stage, error: Exception, data: bytes) -> ImageError:
    """The rejection for ``error``, raised while at ``stage``: fixed text per stage."""
    doing = _STAGES[stage.name]
    if isinstance(error, MemoryError):
        return ImageError(
            "out_of_memory",
            f"out of memory while {doing}: lower --max_pixels, or give the workers "
            "more memory",
        )
    if isinstance(error, Image.DecompressionBombError):
        return ImageError(
            "decompression_bomb",
            "refused by Pillow's own pixel limit (Image.MAX_IMAGE_PIXELS, which this "
            "module switches off: another one set it)",
        )
    if stage.name == "open":
        name = _FORMAT_NAMES.get(_claimed_format(data[:16]) or "", "image")
        return ImageError(
            "corrupt", f"corrupt image header: the {name} header cannot be read"
        )
    if stage.name in ("orient", "decode"):
        return ImageError(
            "truncated",
            f"truncated or corrupt image data: the decoder failed while {doing}",
        )
    if stage.name == "encode":
        return ImageError("encode_failed", "cannot encode the converted image")
    return ImageError(
        "convert_failed", f"cannot convert the decoded image: failed while {doing}"
    )


def _decoder_bytes_per_pixel(image: Image.Image) -> float:
    """What a decoder holds beside the decoded image, in bytes per pixel."""
    if image.format in ("JPEG", "MPO") and image.info.get("progressive"):
        # libjpeg keeps every DCT coefficient (2 bytes) of a progressive file, at full
        # size even when it decodes at a reduced scale.
        layers = getattr(image, "layer", [])[:4]
        h_max = max([h for _, h, _, _ in layers] + [1])
        v_max = max([v for _, _, v, _ in layers] + [1])
        return 2 * sum(max(h, 1) * max(v, 1) for _, h, v, _ in layers) / (h_max * v_max)
    if image.format == "WEBP":
        return 8  # libwebp's canvas and previous frame, RGBA
    if image.format == "TIFF" and image.info.get("compression", "raw") != "raw":
        # libtiff decodes a strip at a time, and one strip may be the whole image.
        bits = image.tag_v2.get(258, 8)  # BitsPerSample
        return (sum(bits) if isinstance(bits, tuple) else bits) / 8
    return 0


def _working_bytes_per_pixel(image: Image.Image, channels: int) -> float:
    """The most bytes per source pixel that converting ``image`` holds at one time.

    Converting holds two full-size images at a time: the decoded one (or its 8-bit,
    rotated or composited successor) and the next; a decoder may hold its own buffers
    beside the decoded image.
    """
    decoded = _DECODED_BYTES.get(image.mode, 4)
    converting = decoded + max(decoded, 1 if channels == 1 else 4)
    return max(converting, decoded + _decoder_bytes_per_pixel(image))


def _check_pixels(image: Image.Image, channels: int, max_pixels: int) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(
            "corrupt", f"corrupt image header: it claims a size of {width}x{height}"
        )
    if width * height > max_pixels:
        raise ImageError(
            "decompression_bomb",
            f"image claims {width}x{height} = {width * height:,} pixels, above the limit "
            f"of {max_pixels:,} (raise --max_pixels to accept it)",
        )
    per_pixel = _working_bytes_per_pixel(image, channels)
    if width * height * per_pixel > max_pixels * _BUDGET_BYTES_PER_PIXEL:
        kind = image.mode if image.mode in Image.MODES else "other"
        name = _FORMAT_NAMES.get(image.format or "", "image")
        raise ImageError(
            "decompression_bomb",
            f"a {width}x{height} {name} image in mode {kind} needs about "
            f"{per_pixel:.3g} bytes per pixel to convert, "
            f"{width * height * per_pixel / 1e6:,.0f} MB: above the "
            f"{max_pixels * _BUDGET_BYTES_PER_PIXEL / 1e6:,.0f} MB that the limit of "
            f"{max_pixels:,} pixels allows ({_BUDGET_BYTES_PER_PIXEL} bytes per pixel; "
            "raise --max_pixels to accept it)",
        )


def _orientation(image: Image.Image):
    """The EXIF orientation left to apply; for a PNG this decodes the image (its eXIf
    chunk may follow the pixels)."""
    if image.format == "TIFF":
        return 1  # Pillow's TIFF plugin gives the displayed size and rotates on load
    return image.getexif().get(_ORIENTATION, 1)


def _strips(image: Image.Image, stage: _Stage):
    """(first row, strip) of ``image``, strips of about ``_STRIP_PIXELS`` pixels."""
    width, height = image.size
    step = max(1, _STRIP_PIXELS // max(width, 1))
    for top in range(0, height, step):
        stage.check()
        yield top, image.crop((0, top, width, min(height, top + step)))


def _to_8bit(image: Image.Image, stage: _Stage) -> Image.Image:
    """Scales 16/32-bit integer and float samples into 0..255 instead of clipping.

    A strip at a time, in integers for 16 and 32 bits: the same bytes as rounding
    ``v / 257`` over the whole image in float64, without full-size float64 copies.
    """
    if image.mode in _SIXTEEN_BIT_MODES:

        def scale(block: np.ndarray) -> np.ndarray:
            if block.dtype.itemsize == 2:
                return _SCALE_16_TO_8[block]
            return np.clip((block.astype(np.int64) + 128) // 257, 0, 255)

    elif image.mode == "F":
        peaks = [
            np.fmax.reduce(np.asarray(strip), axis=None)
            for _, strip in _strips(image, stage)
        ]
        # Samples in 0..1 are scaled to 0..255; NaN counts as 0.
        factor = 255.0 if peaks and np.fmax.reduce(peaks) <= 1.0 else 1.0

        def scale(block: np.ndarray) -> np.ndarray:
            with np.errstate(invalid="ignore"):  # signalling NaNs, read as quiet ones
                array = np.nan_to_num(block.astype(np.float64) * factor)
            return np.clip(np.rint(array), 0, 255)

    else:
        return image
    out = np.empty((image.height, image.width), np.uint8)
    for top, strip in _strips(image, stage):
        block = np.asarray(strip)
        out[top : top + block.shape[0]] = scale(block)
    return Image.fromarray(out)


def _composite_strip(image: Image.Image, target: str) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert(target)


def _composite(image: Image.Image, target: str, stage: _Stage) -> Image.Image:
    """``image`` over a white background, as ``target``: by strips when large, so that
    only the output is full-size beside the source."""
    if image.width * image.height <= _STRIP_PIXELS:
        return _composite_strip(image, target)
    out = Image.new(target, image.size)
    for top, strip in _strips(image, stage):
        out.paste(_composite_strip(strip, target), (0, top))
    return out


def convert_image(
    data: bytes,
    resize: Resize = Resize(),
    *,
    channels: int = 3,
    image_format: str = "jpeg",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
) -> ConvertedImage:
    """Decodes, orients, converts and resizes one image, then encodes it.

    Args:
        data: the source file's bytes: JPEG, PNG, GIF, WebP, TIFF, BMP or MPO.
        resize: output size policy.
        channels: 3 (RGB) or 1 (grayscale).
        image_format: ``jpeg`` or ``png`` for the output.
        jpeg_quality: 1..95 for JPEG output.
        max_pixels: refuse sources with more pixels than this, or whose conversion
            needs more than 8 bytes of working memory per pixel of it.
        time_budget_s: refuse a source still converting after this many seconds.

    Returns:
        The encoded image and its dimensions. With ``resize`` none, JPEG output and an RGB
        (or grayscale for ``channels=1``) JPEG source with no rotation, the source bytes are
        kept as they are (no generation loss), after a full decode proves them intact.

    Raises:
        ImageError: for any input that cannot become an image, with ``code`` and reason;
            nothing else, whatever the bytes.
    """
    stage = _Stage(time_budget_s)
    try:
        return _convert(
            data, resize, channels, image_format, jpeg_quality, max_pixels, stage
        )
    except ImageError as e:
        error = e
    except Exception as e:  # noqa: BLE001 - one input's failure is its rejection
        error = _rejection(stage, e, data)
    # Raised bare: the rejection keeps no frame, decoded image or Pillow message alive.
    error.__context__ = error.__cause__ = None
    raise error.with_traceback(None)


def _convert(
    data: bytes,
    resize: Resize,
    channels: int,
    image_format: str,
    jpeg_quality: int,
    max_pixels: int,
    stage: _Stage,
) -> ConvertedImage:
    if not data:
        raise ImageError("zero_bytes", "zero-byte object: nothing to decode")
    try:
        image = Image.open(io.BytesIO(data), formats=_FORMATS)
    except UnidentifiedImageError:
        image = None
    if image is None:
        raise _unidentified(data[:16])
    _check_pixels(image, channels, max_pixels)
    source_format = (image.format or "unknown").lower()
    stage.enter("orient")
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
    out_width, out_height = (
        (resize.width, resize.height)
        if resize.mode == "crop"
        else (target_width, target_height)
    )
    if image_format == "jpeg" and max(out_width, out_height) > JPEG_MAX_SIDE:
        raise ImageError(
            "too_large_for_jpeg",
            f"the output would be {out_width}x{out_height}, and JPEG holds at most "
            f"{JPEG_MAX_SIDE:,} pixels a side: use --image_format png or a --resize "
            "that shrinks it",
        )

    if (
        image.format in ("JPEG", "MPO")
        and image.mode in ("RGB", "L")
        and resize.mode != "none"
    ):
        converted = _convert_turbo(
            data, image, resize, orientation, channels, image_format, jpeg_quality, stage
        )
        if converted is not None:
            return converted

    stage.enter("decode")
    if image.format == "JPEG" and resize.mode != "none":
        # DCT-domain downscaling: decode at 1/2, 1/4 or 1/8 scale when that still
        # leaves at least the target size. Sizes here are before EXIF rotation.
        draft = (
            (target_height, target_width) if rotated else (target_width, target_height)
        )
        image.draft(image.mode if image.mode in ("RGB", "L") else None, draft)
    # Frame 0 (an animation's first) is the one Image.open positions on.
    image.load()
    if (
        resize.mode == "none"
        and image_format == "jpeg"
        and source_format == "jpeg"
        and orientation == 1
        and image.mode == ("L" if channels == 1 else "RGB")
    ):
        return ConvertedImage(
            data, "jpeg", source_height, source_width, channels,
            source_format, source_height, source_width,
        )  # fmt: skip

    # Pixel-wise steps commute with the rotation, so it is done on the smallest form of
    # the image; each step's result replaces the previous image, which is freed.
    stage.enter("convert")
    image = _to_8bit(image, stage)
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        image = image.transpose(method)
    target = "L" if channels == 1 else "RGB"
    if image.mode in _ALPHA_MODES or (
        image.mode == "P" and "transparency" in image.info
    ):
        image = _composite(image, target, stage)
    else:
        # Gray is resized before it becomes RGB: the same pixels, a third of the work.
        mode = "L" if image.mode in ("1", "L") else target
        if image.mode != mode:
            image = image.convert(mode)

    stage.enter("resize")
    if resize.mode == "crop":
        box, _ = _resize_geometry(
            resize, target_width, target_height,
            image.width / target_width, image.height / target_height,
        )  # fmt: skip
        if image.size != (resize.width, resize.height) or box[:2] != (0, 0):
            image = image.resize(
                (resize.width, resize.height), Image.Resampling.BILINEAR, box=box,
                reducing_gap=None,
            )  # fmt: skip
    elif resize.mode != "none" and image.size != (target_width, target_height):
        image = image.resize(
            (target_width, target_height), Image.Resampling.BILINEAR, reducing_gap=None
        )
    if image.mode != target:
        image = image.convert(target)

    stage.enter("encode")
    # Pixels only: Pillow would otherwise copy the source's JPEG comment, PNG ICC profile
    # and transparency (meaningless after compositing) from ``image.info`` into the
    # output, so bytes of the input would ride along unconverted.
    if image_format == "png":
        encoded = _encode(
            image, format="PNG", compress_level=6, icc_profile=None, transparency=None
        )
    else:
        encoded = _encode(image, format="JPEG", quality=jpeg_quality, comment=b"")
    return ConvertedImage(
        encoded, image_format, image.height, image.width, channels,
        source_format, source_height, source_width,
    )  # fmt: skip


def _resize_geometry(
    resize: Resize, target_width: int, target_height: int, scale_x: float, scale_y: float
) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
    """The box to resample and the output size, for a source resized to ``target`` and
    held in an image of ``scale_x`` x ``scale_y`` its pixels per target pixel.

    With ``crop``, only the source pixels under the centre crop are resampled, straight
    to the output size: the same filter positions as resizing the whole image to the
    target and cropping it, without computing the columns or rows cut away.
    """
    if resize.mode != "crop":
        box = (0.0, 0.0, target_width * scale_x, target_height * scale_y)
        return box, (target_width, target_height)
    left = (target_width - resize.width) // 2
    top = (target_height - resize.height) // 2
    box = (left * scale_x, top * scale_y,
           (left + resize.width) * scale_x, (top + resize.height) * scale_y)  # fmt: skip
    return box, (resize.width, resize.height)


def _convert_turbo(
    data: bytes,
    image: Image.Image,
    resize: Resize,
    orientation: int,
    channels: int,
    image_format: str,
    jpeg_quality: int,
    stage: _Stage,
) -> ConvertedImage | None:
    """A resized JPEG through libjpeg-turbo and OpenCV (``transforms.turbo``); ``None``
    where that path does not apply or libjpeg-turbo reports damage, and Pillow's path
    then converts or rejects it."""
    width, height = image.size
    rotated = orientation in (5, 6, 7, 8)
    source_width, source_height = (height, width) if rotated else (width, height)
    target_width, target_height = resize.target(source_width, source_height)
    need = (target_height, target_width) if rotated else (target_width, target_height)
    eighths = turbo.scale_eighths(width, height, *need)
    scale = eighths / 8
    box, size = _resize_geometry(
        resize, target_width, target_height,
        scale * source_width / target_width, scale * source_height / target_height,
    )  # fmt: skip
    if not turbo.fits(width, height, eighths, size):
        return None
    stage.enter("decode")
    # Gray sources stay gray until after the resize: the same pixels, a third of the work.
    gray = channels == 1 or image.mode == "L"
    pixels = turbo.decode(data, width, height, eighths, gray)
    if pixels is None:
        return None
    stage.enter("convert")
    method = _TRANSPOSE.get(orientation)
    if method is not None:
        pixels = turbo.transpose(pixels, method)
    stage.enter("resize")
    pixels = turbo.resample(pixels, box, size)
    if channels == 3 and pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    stage.enter("encode")
    if image_format == "png":
        encoded = _encode(Image.fromarray(pixels), format="PNG", compress_level=6)
    else:
        encoded = turbo.encode_jpeg(pixels, jpeg_quality)
    return ConvertedImage(
        encoded, image_format, size[1], size[0], channels,
        image.format.lower(), source_height, source_width,
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
    try:
        image.save(file, **params)
    except BaseException:
        file.truncate(0)  # what a failed encode of a large image wrote
        raise
    size = file.tell()
    encoded = os.pread(file.fileno(), size, 0)
    if size > _KEEP_ENCODE_FILE_BYTES:
        file.truncate(0)
    return encoded


def estimated_encoded_bytes(
    resize: Resize, image_format: str, source_bytes: int
) -> int:
    """A rough output size for one image, used only to pick a shard count."""
    if resize.mode == "none":
        return source_bytes
    # shorter:N does not know the aspect ratio ahead; 4:3 is the common case.
    pixels = resize.width * resize.height * (4 / 3 if resize.mode == "shorter" else 1)
    per_pixel = 1.5 if image_format == "png" else 0.35
    return max(1, min(source_bytes, math.ceil(pixels * per_pixel)))
