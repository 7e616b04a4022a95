"""Unit tests of the image functions on odd inputs that real encoders produce."""

from __future__ import annotations

import io
import itertools
import logging
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image

from devtools.sample_data import encode, photo_like
from transforms import images
from transforms.examples import ConvertSettings, convert_record
from transforms.images import ImageError, Resize, convert_image, parse_resize
from transforms.references import Rejection, ShardItem


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
    data = encode(
        photo_like(64, 48, np.random.default_rng(1)), "JPEG", progressive=True
    )
    out = convert_image(data)
    assert out.encoded == data and (out.width, out.height) == (64, 48)


def test_animated_gif_gives_first_frame():
    frames = [_solid("RGB", (10, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(
        buf, format="GIF", save_all=True, append_images=frames[1:], duration=50
    )
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
    [
        ("shorter:256", (341, 256)),
        ("fit:224x224", (224, 168)),
        ("crop:224x224", (224, 224)),
        ("none", (500, 375)),
    ],
)
def test_resize_modes(spec, size):
    data = encode(photo_like(500, 375, np.random.default_rng(4)), "JPEG", quality=90)
    out = convert_image(data, parse_resize(spec))
    assert (out.width, out.height) == size
    assert _decode(out.encoded).shape[:2] == size[::-1]


def test_draft_downscale_keeps_content():
    image = photo_like(2000, 1500, np.random.default_rng(5))
    out = convert_image(encode(image, "JPEG", quality=90), parse_resize("fit:200x150"))
    expected = np.asarray(
        image.resize((200, 150), Image.Resampling.BILINEAR), np.float32
    )
    assert np.abs(_decode(out.encoded).astype(np.float32) - expected).mean() < 8


def test_parse_resize_rejects_bad_specs():
    assert parse_resize("crop:10x20") == Resize("crop", 10, 20)
    for bad in ("", "shorter", "fit:10", "crop:0x5", "big"):
        with pytest.raises(ValueError, match="use none"):
            parse_resize(bad)


# ------------------------------------------------------- untrusted input


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(png):
        length = struct.unpack(">I", png[pos : pos + 4])[0]
        chunks.append((png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _leaks(data: bytes, reason: str) -> set[str]:
    """Runs of 4 printable bytes of ``data`` that appear in ``reason``."""
    runs = re.findall(rb"[\x21-\x7e]{4,}", data)
    windows = {run[i : i + 4].decode() for run in runs for i in range(len(run) - 3)}
    return {window for window in windows if window in reason}


_TOKEN = b"K3Y!"  # not a valid chunk type: Pillow quotes it in its exception


def _png_with_secret_chunk() -> bytes:
    """A PNG whose image data is cut by a chunk of type ``_TOKEN``."""
    png = encode(photo_like(64, 48, np.random.default_rng(7)), "PNG")
    chunks = _chunks(png)
    data = b"".join(body for kind, body in chunks if kind == b"IDAT")
    head = [(kind, body) for kind, body in chunks if kind not in (b"IDAT", b"IEND")]
    parts = head + [(b"IDAT", data[: len(data) // 2]), (_TOKEN, data[len(data) // 2 :])]
    return b"\x89PNG\r\n\x1a\n" + b"".join(
        struct.pack(">I", len(body))
        + kind
        + body
        + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        for kind, body in parts
    )


def test_leak_check_finds_what_the_old_reasons_quoted():
    secret = b"AWS_SECRET=abcd1234SECRET\n"
    assert "SECR" in _leaks(secret, f"starts with {secret[:16]!r}")
    with pytest.raises(SyntaxError, match=re.escape(repr(_TOKEN))):
        Image.open(io.BytesIO(_png_with_secret_chunk())).load()


@pytest.mark.parametrize(
    "data, code",
    [
        (b"AWS_SECRET=abcd1234SECRET\naws_key_id=AKIAEXAMPLE\n", "not_an_image"),
        (_png_with_secret_chunk(), "truncated"),
    ],
    ids=["credentials-file", "png-secret-chunk"],
)
def test_no_input_byte_reaches_the_reason_or_the_log(data, code, caplog):
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ImageError) as excinfo:
        convert_image(data)
    assert excinfo.value.code == code
    reason = str(excinfo.value)
    assert not _leaks(data, reason), reason
    assert excinfo.value.__context__ is None and excinfo.value.__cause__ is None
    item = ShardItem(0, "cat/x.png", len(data), 0, "cat")
    rejection = convert_record(ConvertSettings(), item, data)
    assert rejection == Rejection("cat/x.png", "decode", code, reason)
    assert not _leaks(data, caplog.text), caplog.text


def test_pillow_debug_lines_that_quote_input_are_off():
    """Pillow logs PNG chunk types at DEBUG; its logger is silenced."""
    png = encode(photo_like(16, 12, np.random.default_rng(7)), "PNG")
    body = b"private"
    chunk = struct.pack(">I", len(body)) + b"sEcR" + body
    chunk += struct.pack(">I", zlib.crc32(b"sEcR" + body) & 0xFFFFFFFF)
    data = png[:33] + chunk + png[33:]  # after the 8-byte signature and 25-byte IHDR
    pil = logging.getLogger("PIL")
    assert pil.getEffectiveLevel() == logging.CRITICAL
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    pil.addHandler(handler)
    try:
        convert_image(data)
        assert seen == []
        pil.setLevel(logging.DEBUG)
        convert_image(data)
    finally:
        pil.setLevel(logging.CRITICAL)
        pil.removeHandler(handler)
    assert any("sEcR" in line for line in seen), seen


def _eps() -> bytes:
    return encode(_solid("RGB", (8, 8), (1, 2, 3)), "EPS")


@pytest.mark.parametrize(
    "data, code",
    [
        (_eps(), "unsupported_format"),
        (encode(_solid("RGB", (8, 8), (1, 2, 3)), "PPM"), "unsupported_format"),
        (encode(_solid("RGB", (8, 8), (1, 2, 3)), "ICO"), "unsupported_format"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "corrupt"),
        (b"%PDF-1.7\n", "not_an_image"),
    ],
    ids=["eps", "ppm", "ico", "png-broken-header", "pdf"],
)
def test_only_supported_formats_reach_a_decoder(data, code, monkeypatch):
    ghostscript_calls = []
    monkeypatch.setattr(
        EpsImagePlugin,
        "Ghostscript",
        lambda *args, **kw: ghostscript_calls.append(args),
    )
    with pytest.raises(ImageError) as excinfo:
        convert_image(data)
    assert excinfo.value.code == code and ghostscript_calls == []
    if code != "corrupt":
        assert "JPEG, PNG, GIF, WebP, TIFF, BMP and MPO" in str(excinfo.value)


@pytest.mark.parametrize(
    "image, fmt",
    [
        (photo_like(40, 30, np.random.default_rng(8)), "TIFF"),
        (photo_like(40, 30, np.random.default_rng(8)), "BMP"),
    ],
)
def test_tiff_and_bmp_convert(image, fmt):
    out = convert_image(encode(image, fmt), parse_resize("fit:20x20"))
    assert out.source_format == fmt.lower() and (out.width, out.height) == (20, 15)


def test_exif_rotated_tiff_is_rotated_once_and_keeps_its_aspect():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo_like(40, 20, np.random.default_rng(0)), "TIFF", exif=exif)
    out = convert_image(data, parse_resize("fit:16x16"))
    assert (out.source_width, out.source_height) == (20, 40)
    assert (out.width, out.height) == (8, 16)


def test_side_longer_than_jpeg_allows_is_refused_before_decoding():
    data = encode(Image.new("RGB", (1, 100_000)), "PNG")
    with pytest.raises(ImageError) as excinfo:
        convert_image(data)
    assert excinfo.value.code == "too_large_for_jpeg"
    assert "65,535" in str(excinfo.value)
    assert convert_image(data, image_format="png").height == 100_000
    assert convert_image(data, parse_resize("fit:224x224")).height == 224


def test_pixel_limit_weighs_what_the_decoder_holds():
    """A progressive 4:4:4 JPEG keeps 6 bytes of coefficients a pixel in libjpeg."""
    image = photo_like(100, 100, np.random.default_rng(6))
    progressive = encode(image, "JPEG", progressive=True, subsampling=0)
    with pytest.raises(ImageError, match="10 bytes per pixel") as excinfo:
        convert_image(progressive, max_pixels=12_000)
    assert excinfo.value.code == "decompression_bomb"
    assert convert_image(encode(image, "JPEG"), max_pixels=12_000).width == 100
    assert convert_image(progressive, max_pixels=12_500).width == 100


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(
            np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21 + 7
        ),  # 16-bit gray
        Image.fromarray(
            np.linspace(-0.2, 1.0, 64 * 48, dtype=np.float32).reshape(48, 64)
        ),
        photo_like(64, 48, np.random.default_rng(3)).convert("RGBA"),
        photo_like(64, 48, np.random.default_rng(3)).quantize(8),
    ],
    ids=["I;16", "F", "RGBA", "P+transparency"],
)
def test_conversion_by_strips_gives_the_same_bytes(image, monkeypatch):
    if image.mode == "RGBA":
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    params = {"transparency": 2} if image.mode == "P" else {}
    data = encode(image, "TIFF" if image.mode == "F" else "PNG", **params)
    whole = [
        convert_image(data, resize, image_format="png", channels=channels)
        for resize, channels in itertools.product(
            (Resize(), parse_resize("crop:20x20")), (1, 3)
        )
    ]
    monkeypatch.setattr(images, "_STRIP_PIXELS", 100)  # strips of one or two rows
    strips = [
        convert_image(data, resize, image_format="png", channels=channels)
        for resize, channels in itertools.product(
            (Resize(), parse_resize("crop:20x20")), (1, 3)
        )
    ]
    assert strips == whole


def test_float_samples_in_zero_to_one_are_scaled():
    array = np.array([[0.0, 0.5, 1.0, np.nan]], dtype=np.float32)
    out = convert_image(
        encode(Image.fromarray(array), "TIFF"), image_format="png", channels=1
    )
    assert _decode(out.encoded).tolist() == [[0, 128, 255, 0]]


def test_time_budget_rejects_between_stages(monkeypatch):
    clock = itertools.count(0.0, 10.0)  # every look at the clock: 10 s later
    monkeypatch.setattr(images.time, "monotonic", lambda: next(clock))
    data = encode(photo_like(64, 48, np.random.default_rng(1)), "PNG")
    with pytest.raises(ImageError, match="more than 25 s") as excinfo:
        convert_image(data, time_budget_s=25)
    assert excinfo.value.code == "too_slow"
    assert convert_image(data, time_budget_s=1e9).width == 64


def test_any_failure_is_a_rejection_that_holds_nothing(monkeypatch):
    def fail(image, stage):
        raise MemoryError

    monkeypatch.setattr(images, "_to_8bit", fail)
    data = encode(photo_like(64, 48, np.random.default_rng(1)), "PNG")
    with pytest.raises(ImageError) as excinfo:
        convert_image(data)
    assert excinfo.value.code == "out_of_memory"
    assert excinfo.value.__context__ is None
    frames = [entry.name for entry in excinfo.traceback]
    assert frames[-1] == "convert_image", frames  # no frame of the conversion inside

    monkeypatch.setattr(images, "_to_8bit", lambda image, stage: 1 / 0)
    with pytest.raises(ImageError) as excinfo:
        convert_image(data)
    assert excinfo.value.code == "convert_failed"


_FAULTS_PER_CONVERSION = """
import os, resource, sys
from s3tfr.host import keep_freed_heap
from transforms.images import convert_image, parse_resize
applied = keep_freed_heap() if sys.argv[2] == "keep" else False
names = sorted(os.listdir(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for name in names:
    with open(os.path.join(sys.argv[1], name), "rb") as f:
        convert_image(f.read(), parse_resize("shorter:224"))
print(applied, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / len(names))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's malloc")
def test_keep_freed_heap_stops_faulting_in_memory_for_every_image(tmp_path):
    # PNGs: Pillow's path, which holds the whole decoded image (a resized JPEG is decoded
    # at a reduced DCT scale into buffers that stay under the trim threshold).
    rng = np.random.default_rng(5)
    for i in range(40):
        (tmp_path / f"{i:02d}.png").write_bytes(encode(photo_like(500, 375, rng), "PNG"))

    def faults(mode: str) -> tuple[str, float]:
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_PER_CONVERSION, str(tmp_path), mode],
            capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
        ).stdout.split()  # fmt: skip
        return out[0], float(out[1])

    default, kept = faults("default"), faults("keep")
    assert kept[0] == "True"
    # By default each 500x375 conversion in a fresh process faults its decoded and
    # resized images in anew (hundreds of pages). (A centre crop resamples only the crop, whose
    # smaller buffers stay under the trim threshold: ~20 pages either way.)
    assert default[1] > 100
    assert kept[1] < default[1] / 10


# The JPEG path (transforms.turbo): DCT-scaled decode, OpenCV warp, libjpeg-turbo encode.


def _pillow_path(monkeypatch, data: bytes, resize: Resize, **kwargs):
    """``convert_image`` with the JPEG path declined, as for a source it does not take."""
    with monkeypatch.context() as m:
        m.setattr(images.turbo, "fits", lambda *args: False)
        return convert_image(data, resize, **kwargs)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0**2 / np.mean((a.astype(np.float64) - b) ** 2)))


def _float_reference(data: bytes, resize: Resize) -> np.ndarray:
    """Full decode, float Lanczos resize of the whole image to the target, then the
    centre crop: independent of the converter's geometry code."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = resize.target(*image.size)
    pixels = np.asarray(image, np.float32)
    out = np.stack(
        [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(pixels[..., k]), "F").resize(
                    (width, height), Image.Resampling.LANCZOS
                )
            )
            for k in range(3)
        ],
        axis=-1,
    )
    if resize.mode == "crop":
        left, top = (width - resize.width) // 2, (height - resize.height) // 2
        out = out[top : top + resize.height, left : left + resize.width]
    return np.clip(out, 0, 255)


@pytest.mark.parametrize(
    "size, spec",
    [
        ((500, 375), "crop:224x224"),  # 5/8 DCT scale, a warp of ~1.05
        ((1600, 1200), "crop:224x224"),  # 2/8, then 1.34 source pixels an output one: blur
        ((3000, 2000), "crop:64x64"),  # 1/8, then 3.9: blur
        ((120, 90), "crop:224x224"),  # upscaled
        ((640, 480), "shorter:256"),
        ((640, 480), "fit:200x150"),
        ((375, 500), "crop:224x160"),
    ],
)
def test_jpeg_path_is_as_close_to_a_float_reference_as_pillow(size, spec, monkeypatch):
    resize = parse_resize(spec)
    data = encode(photo_like(*size, np.random.default_rng(11)), "JPEG", quality=92)
    fast = convert_image(data, resize)
    slow = _pillow_path(monkeypatch, data, resize)
    assert (fast.width, fast.height) == (slow.width, slow.height)
    assert fast.encoded != slow.encoded  # the two paths really differ
    reference = _float_reference(data, resize)
    fast_psnr = _psnr(_decode(fast.encoded), reference)
    slow_psnr = _psnr(_decode(slow.encoded), reference)
    assert fast_psnr > slow_psnr - 0.5, (fast_psnr, slow_psnr)
    assert fast_psnr > 28


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_path_applies_every_exif_orientation(orientation, monkeypatch):
    image = photo_like(96, 64, np.random.default_rng(orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(image, "JPEG", quality=95, exif=exif.tobytes())
    for spec in ("crop:48x40", "fit:60x60"):
        fast = convert_image(data, parse_resize(spec))
        slow = _pillow_path(monkeypatch, data, parse_resize(spec))
        assert (fast.width, fast.height) == (slow.width, slow.height)
        difference = np.abs(
            _decode(fast.encoded).astype(np.float64) - _decode(slow.encoded)
        ).mean()
        assert difference < 6, (spec, difference)  # a wrong rotation differs by ~40


def test_jpeg_path_gray_channels_and_png_output(monkeypatch):
    rgb = encode(photo_like(300, 200, np.random.default_rng(2)), "JPEG", quality=90)
    gray = encode(photo_like(300, 200, np.random.default_rng(2)).convert("L"), "JPEG")
    crop = parse_resize("crop:100x100")
    for data, channels, image_format in itertools.product(
        (rgb, gray), (1, 3), ("jpeg", "png")
    ):
        fast = convert_image(data, crop, channels=channels, image_format=image_format)
        slow = _pillow_path(
            monkeypatch, data, crop, channels=channels, image_format=image_format
        )
        pixels = _decode(fast.encoded)
        assert pixels.shape == _decode(slow.encoded).shape
        assert pixels.shape == ((100, 100) if channels == 1 else (100, 100, 3))
        assert Image.open(io.BytesIO(fast.encoded)).format == image_format.upper()
        difference = np.abs(pixels.astype(np.float64) - _decode(slow.encoded)).mean()
        assert difference < 4, (channels, image_format, difference)


def test_jpeg_path_leaves_damaged_and_odd_jpegs_to_pillow():
    crop = parse_resize("crop:64x64")
    with pytest.raises(ImageError) as excinfo:
        convert_image(_truncated_jpeg(), crop)
    assert excinfo.value.code == "truncated"
    tiny = encode(_solid("RGB", (9, 7), (10, 200, 30)), "JPEG")  # below turbo.MIN_SIDE
    assert _decode(convert_image(tiny, crop).encoded).shape == (64, 64, 3)
    cmyk = encode(_solid("CMYK", (80, 80), (0, 255, 255, 0)), "JPEG")
    assert _decode(convert_image(cmyk, crop).encoded)[32, 32, 0] > 200  # red


def test_jpeg_path_gives_the_same_bytes_from_every_thread():
    from concurrent.futures import ThreadPoolExecutor

    sources = [
        encode(photo_like(500, 375, np.random.default_rng(k)), "JPEG", quality=90)
        for k in range(8)
    ]
    crop = parse_resize("crop:224x224")
    expected = [convert_image(d, crop).encoded for d in sources]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            got = list(pool.map(lambda d: convert_image(d, crop).encoded, sources))
            assert got == expected
