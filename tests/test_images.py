"""Unit tests of the image functions on odd inputs that real encoders produce."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beam_jobs.sample_data import encode, photo_like
from transforms.images import ImageError, Resize, convert_image, parse_resize


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def _solid(mode: str, size, color) -> Image.Image:
    return Image.new(mode, size, color)


def _truncated_jpeg() -> bytes:
    data = encode(photo_like(200, 150, np.random.default_rng(3)), "JPEG", quality=90)
    return data[: len(data) // 2]  # header intact, scan data cut short


def _png_claiming(width: int, height: int) -> bytes:
    """A valid PNG whose header claims ``width`` x ``height``, with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def test_cmyk_jpeg_becomes_rgb():
    data = encode(_solid("CMYK", (32, 24), (0, 255, 255, 0)), "JPEG", quality=95)  # red
    out = convert_image(data)
    pixels = _decode(out.encoded)
    assert out.channels == 3 and pixels.shape == (24, 32, 3)
    assert pixels[..., 0].mean() > 200 and pixels[..., 1].mean() < 60


def test_grayscale_to_rgb_and_to_one_channel():
    data = encode(_solid("L", (16, 16), 100), "PNG")
    rgb = _decode(convert_image(data).encoded)
    assert rgb.shape == (16, 16, 3) and abs(int(rgb.mean()) - 100) <= 2
    gray = convert_image(data, channels=1)
    assert gray.channels == 1 and _decode(gray.encoded).shape == (16, 16)


def test_palette_with_transparency_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    image.info["transparency"] = 0  # palette index 0 (black) is transparent
    data = encode(image, "PNG", transparency=0)
    pixels = _decode(convert_image(data, image_format="png").encoded)
    assert (pixels == 255).all(), "transparent pixels must become white, not black"


def test_rgba_alpha_composited():
    image = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    image.putpixel((0, 0), (0, 0, 255, 255))
    pixels = _decode(convert_image(encode(image, "PNG"), image_format="png").encoded)
    assert tuple(pixels[0, 0]) == (0, 0, 255)
    assert tuple(pixels[3, 3]) == (255, 255, 255)


def test_sixteen_bit_png_is_scaled_not_clipped():
    array = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 32896 = 128 * 257
    data = encode(Image.fromarray(array), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = _decode(convert_image(data, image_format="png", channels=1).encoded)
    assert pixels.tolist() == [[0, 128, 255]]


def test_exif_orientation_applied():
    image = photo_like(40, 20, np.random.default_rng(0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(image, "JPEG", quality=90, exif=exif.tobytes())
    out = convert_image(data)
    assert (out.width, out.height) == (20, 40)
    assert (out.source_width, out.source_height) == (20, 40)
    assert out.encoded != data, "a rotated JPEG must be re-encoded upright"


def test_progressive_rgb_jpeg_kept_byte_for_byte_without_resize():
    data = encode(photo_like(64, 48, np.random.default_rng(1)), "JPEG", progressive=True)
    out = convert_image(data)
    assert out.encoded == data and (out.width, out.height) == (64, 48)


def test_animated_gif_gives_first_frame():
    frames = [_solid("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    pixels = _decode(convert_image(buf.getvalue(), image_format="png").encoded)
    assert pixels[..., 0].min() > 200 and pixels[..., 1].max() < 60


def test_webp_decodes():
    data = encode(photo_like(30, 20, np.random.default_rng(2)), "WEBP", quality=80)
    out = convert_image(data)
    assert out.source_format == "webp" and (out.width, out.height) == (30, 20)


def test_png_named_jpg_sniffed_by_content():
    out = convert_image(encode(_solid("RGB", (5, 5), (1, 2, 3)), "PNG"))
    assert out.source_format == "png" and out.format == "jpeg"


@pytest.mark.parametrize(
    "data, code",
    [
        (b"", "zero_bytes"),
        (b"this is a text file, not a picture\n", "not_an_image"),
        (_truncated_jpeg(), "truncated"),
        (_png_claiming(100_000, 100_000), "decompression_bomb"),
    ],
    ids=["zero-bytes", "text-named-jpg", "truncated-jpeg", "bomb-header"],
)
def test_bad_inputs_raise_image_error_with_code(data, code):
    with pytest.raises(ImageError) as excinfo:
        convert_image(data)
    assert excinfo.value.code == code
    assert str(excinfo.value)


def test_pixel_limit_is_configurable():
    data = encode(_solid("RGB", (200, 100), (9, 9, 9)), "PNG")
    with pytest.raises(ImageError, match="20,000 pixels"):
        convert_image(data, max_pixels=10_000)
    assert convert_image(data, max_pixels=20_000).width == 200


def test_one_pixel_image_and_panorama():
    assert convert_image(encode(_solid("RGB", (1, 1), (5, 5, 5)), "PNG")).width == 1
    out = convert_image(encode(_solid("RGB", (20_000, 8), (5, 5, 5)), "PNG"), parse_resize(
        "fit:224x224"))  # fmt: skip
    assert (out.width, out.height) == (224, 1)


@pytest.mark.parametrize(
    "spec, size",
    [("shorter:256", (341, 256)), ("fit:224x224", (224, 168)), ("crop:224x224", (224, 224)),
     ("none", (500, 375))],  # fmt: skip
)
def test_resize_modes(spec, size):
    data = encode(photo_like(500, 375, np.random.default_rng(4)), "JPEG", quality=90)
    out = convert_image(data, parse_resize(spec))
    assert (out.width, out.height) == size
    assert _decode(out.encoded).shape[:2] == size[::-1]


def test_draft_downscale_keeps_content():
    image = photo_like(2000, 1500, np.random.default_rng(5))
    out = convert_image(encode(image, "JPEG", quality=90), parse_resize("fit:200x150"))
    expected = np.asarray(image.resize((200, 150), Image.Resampling.BILINEAR), np.float32)
    assert np.abs(_decode(out.encoded).astype(np.float32) - expected).mean() < 8


def test_parse_resize_rejects_bad_specs():
    assert parse_resize("crop:10x20") == Resize("crop", 10, 20)
    for bad in ("", "shorter", "fit:10", "crop:0x5", "big"):
        with pytest.raises(ValueError, match="use none"):
            parse_resize(bad)


_FAULTS_PER_CONVERSION = """
import os, resource, sys
from transforms.host import keep_freed_heap
from transforms.images import convert_image, parse_resize
applied = keep_freed_heap() if sys.argv[2] == "keep" else False
names = sorted(os.listdir(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for name in names:
    with open(os.path.join(sys.argv[1], name), "rb") as f:
        convert_image(f.read(), parse_resize("crop:224x224"))
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(names))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_keep_freed_heap_stops_faulting_in_memory_for_every_image(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(40):
        (tmp_path / f"{i:02d}.jpg").write_bytes(
            encode(photo_like(500, 375, rng), "JPEG", quality=90)
        )

    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_PER_CONVERSION, str(tmp_path), mode],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        ).stdout.split()  # fmt: skip
        return out[0], float(out[1])

    default, kept = faults("default"), faults("keep")
    assert kept[0] == "True"
    # By default each 500x375 conversion in a fresh process faults its decoded image
    # in anew (~300 pages).
    assert default[1] > 100
    assert kept[1] < default[1] / 10
