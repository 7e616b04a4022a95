"""Mutation fuzzing of :func:`convert_image`: every input gives an image or an ImageError.

Seed files come from real encoders: Pillow for every format and mode the product accepts,
plus a minimal PNG writer for what Pillow cannot write (Adam7 interlacing, 16-bit RGB).
Mutations truncate, flip bits, overwrite bytes, splice two files, corrupt length fields
(with PNG checksums repaired, so the mutation reaches the decoder) and zero or duplicate
ranges, from a fixed seed. Inputs that once broke the property are kept in
``tests/fuzz_corpus/`` and checked on every run.

A longer run, which writes what it finds into ``tests/fuzz_corpus/``::

    python -m tests.test_fuzz --minutes 10
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devtools.sample_data import encode, photo_like
from transforms import images
from transforms.images import ConvertedImage, ImageError, Resize, convert_image

CORPUS = Path(__file__).resolve().parent / "fuzz_corpus"
SEED = 20_260_118
MUTATIONS = 50_000
# Small enough that a mutated header claiming a large size costs milliseconds, large
# enough that every seed converts.
MAX_PIXELS = 1_000_000
SETTINGS = (
    {},
    {"resize": Resize("crop", 24, 24)},
    {"resize": Resize("fit", 16, 16), "image_format": "png", "channels": 1},
)
# Pillow's warnings about damaged files, ignored as transforms/images.py ignores them
# (pytest resets the filters that module sets).
pytestmark = pytest.mark.filterwarnings(r"ignore:::PIL\.")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Adam7 passes: first row, first column, row step, column step.
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2),
          (0, 1, 2, 2), (1, 0, 2, 1))  # fmt: skip


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def png_writer(array: np.ndarray, *, interlace: bool) -> bytes:
    """A PNG of ``array`` (HxW gray or HxWx3 RGB; uint8 or uint16), filter type 0."""
    height, width = array.shape[:2]
    depth = 16 if array.dtype == np.uint16 else 8
    samples = array.astype(array.dtype.newbyteorder(">"))
    raw = bytearray()
    for row0, col0, row_step, col_step in _ADAM7 if interlace else ((0, 0, 1, 1),):
        for row in samples[row0::row_step, col0::col_step]:
            if row.size:
                raw += b"\x00" + row.tobytes()
    header = struct.pack(
        ">IIBBBBB",
        width,
        height,
        depth,
        2 if array.ndim == 3 else 0,
        0,
        0,
        int(interlace),
    )
    return (
        _PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(bytes(raw)))
        + _chunk(b"IEND", b"")
    )


def _save_all(frames: list[Image.Image], fmt: str, **params) -> bytes:
    out = io.BytesIO()
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:], **params)
    return out.getvalue()


def seed_files() -> dict[str, bytes]:
    """One small file per format and mode the product accepts, from real encoders."""
    rng = np.random.default_rng(SEED)
    photo = photo_like(40, 30, rng)
    other = photo_like(40, 30, rng)
    gray = photo.convert("L")
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    palette = photo.quantize(16)
    deep = np.asarray(gray, np.uint16) * 257 + rng.integers(0, 257, gray.size[::-1])
    deep = deep.astype(np.uint16)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise
    frames = [photo, other, photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    return {
        "baseline.jpg": encode(photo, "JPEG", quality=85),
        "progressive.jpg": encode(photo, "JPEG", quality=85, progressive=True),
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG", quality=85),
        "gray.jpg": encode(gray, "JPEG", quality=85),
        "exif-rotated.jpg": encode(photo, "JPEG", quality=85, exif=exif.tobytes()),
        "rgb.png": encode(photo, "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "la.png": encode(rgba.convert("LA"), "PNG"),
        "palette.png": encode(palette, "PNG"),
        "palette-transparent.png": encode(palette, "PNG", transparency=0),
        "gray16.png": encode(Image.fromarray(deep), "PNG"),
        "bilevel.png": encode(gray.convert("1"), "PNG"),
        "exif-rotated.png": encode(photo, "PNG", exif=exif.tobytes()),
        "interlaced.png": png_writer(np.asarray(photo), interlace=True),
        "interlaced-gray16.png": png_writer(deep, interlace=True),
        "rgb16.png": png_writer(
            np.dstack([deep, deep[::-1], deep[:, ::-1]]), interlace=False
        ),
        "animated.png": _save_all(frames, "PNG", duration=40),
        "still.gif": encode(palette, "GIF"),
        "animated.gif": _save_all(
            [f.quantize(16) for f in frames],
            "GIF",
            duration=40,
            transparency=0,
            disposal=2,
        ),
        "lossy.webp": encode(photo, "WEBP", quality=70),
        "lossless-alpha.webp": encode(rgba, "WEBP", lossless=True),
        "animated.webp": _save_all(frames, "WEBP", duration=40, quality=70),
        "rgb.tif": encode(photo, "TIFF"),
        "lzw.tif": encode(photo, "TIFF", compression="tiff_lzw"),
        "gray16.tif": encode(Image.fromarray(deep), "TIFF", compression="tiff_deflate"),
        "float.tif": encode(Image.fromarray(deep.astype(np.float32) / 65535), "TIFF"),
        "group4.tif": encode(gray.convert("1"), "TIFF", compression="group4"),
        "rgb.bmp": encode(photo, "BMP"),
        "palette.bmp": encode(palette, "BMP"),
        "bilevel.bmp": encode(gray.convert("1"), "BMP"),
        "stereo.mpo": _save_all([photo, other], "MPO", quality=85),
    }


def _length_fields(data: bytes) -> list[tuple[int, int]]:
    """(offset, width in bytes) of the big-endian length fields of PNG chunks and JPEG
    segments, and of PNG's width and height."""
    fields = []
    if data.startswith(_PNG_SIGNATURE):
        pos = 8
        while pos + 8 <= len(data):
            fields.append((pos, 4))
            if data[pos + 4 : pos + 8] == b"IHDR":
                fields += [(pos + 8, 4), (pos + 12, 4)]
            pos += 12 + int.from_bytes(data[pos : pos + 4], "big")
    elif data.startswith(b"\xff\xd8"):
        pos = 2
        while pos + 4 <= len(data) and data[pos] == 0xFF:
            fields.append((pos + 2, 2))
            if data[pos + 1] == 0xDA:  # start of scan: entropy-coded data follows
                break
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return fields


def _repair_png_crcs(data: bytearray) -> None:
    pos = 8
    while pos + 12 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 8 + length
        if end + 4 > len(data):
            return
        data[end : end + 4] = struct.pack(
            ">I", zlib.crc32(data[pos + 4 : end]) & 0xFFFFFFFF
        )
        pos = end + 4


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    """One to three random mutations of ``data``."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        if not out:
            break
        n = len(out)
        kind = rng.randrange(7)
        if kind == 0:  # truncate
            del out[rng.randrange(1, n) if n > 1 else 1 :]
        elif kind == 1:  # flip bits
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif kind == 2:  # overwrite bytes with boundary values
            for _ in range(rng.randint(1, 4)):
                out[rng.randrange(n)] = rng.choice(
                    (0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256))
                )
        elif kind == 3:  # splice: this file's head, another's tail
            other = rng.choice(seeds)
            out = out[: rng.randrange(n)] + other[rng.randrange(len(other)) :]
        elif kind == 4:  # corrupt a length field (or any 2 bytes)
            offset, width = rng.choice(_length_fields(out) or [(rng.randrange(n), 2)])
            old = int.from_bytes(out[offset : offset + width], "big")
            top = (1 << (8 * width)) - 1
            value = rng.choice(
                (0, 1, old - 1, old + 1, old * 2, top, rng.randint(0, top))
            )
            out[offset : offset + width] = (value & top).to_bytes(width, "big")
        elif kind == 5:  # zero a range
            start = rng.randrange(n)
            end = min(n, start + rng.randint(1, 64))
            out[start:end] = bytes(end - start)
        else:  # duplicate a range somewhere else
            start = rng.randrange(n)
            piece = out[start : start + rng.randint(1, 256)]
            at = rng.randrange(n)
            out[at:at] = piece
    if out.startswith(_PNG_SIGNATURE) and rng.random() < 0.7:
        _repair_png_crcs(out)
    return bytes(out)


def failure(
    module, data: bytes, settings: dict, max_pixels: int = MAX_PIXELS
) -> BaseException | None:
    """What ``module.convert_image`` raised other than its ImageError, if anything."""
    try:
        out = module.convert_image(data, max_pixels=max_pixels, **settings)
    except module.ImageError:
        return None
    except Exception as e:  # noqa: BLE001 - the property: nothing else may escape
        return e
    if not isinstance(out, module.ConvertedImage):
        return TypeError(f"convert_image returned {type(out).__name__}")
    return None


def fuzz(
    module,
    rng: random.Random,
    keep_going: Callable[[int], bool],
    on_failure: Callable[[bytes, dict, BaseException], None],
) -> int:
    """Mutates seed files while ``keep_going(count)``; returns how many it tried."""
    seeds = list(seed_files().values())
    count = 0
    while keep_going(count):
        data = mutate(rng.choice(seeds), rng, seeds)
        settings = rng.choice(SETTINGS)
        error = failure(module, data, settings)
        if error is not None:
            on_failure(data, settings, error)
        count += 1
    return count


def minimize(data: bytes, fails: Callable[[bytes], bool]) -> bytes:
    """A shorter input that still ``fails``: tail cuts, then removed ranges."""
    step = len(data) // 2
    while step:
        cut = data[: len(data) - step]
        if cut and fails(cut):
            data = cut
        else:
            step //= 2
    step = max(1, len(data) // 8)
    while step:
        start = 0
        while start < len(data):
            shorter = data[:start] + data[start + step :]
            if shorter and fails(shorter):
                data = shorter
            else:
                start += step
        step //= 2
    return data


def save_crasher(data: bytes, settings: dict, module=images) -> Path:
    """Writes a minimised crasher into the corpus folder; returns its path."""
    kind = type(failure(module, data, settings))

    def fails(candidate: bytes) -> bool:
        return type(failure(module, candidate, settings)) is kind

    data = minimize(data, fails) if kind is not type(None) else data
    CORPUS.mkdir(exist_ok=True)
    path = CORPUS / f"crash-{hashlib.sha256(data).hexdigest()[:12]}.bin"
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------- tests


def test_seed_files_are_real_images_that_convert():
    seeds = seed_files()
    formats = set()
    for name, data in seeds.items():
        formats.add(Image.open(io.BytesIO(data)).format)
        for settings in SETTINGS:
            assert isinstance(convert_image(data, **settings), ConvertedImage), name
    assert formats == {"JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP", "MPO"}
    photo = photo_like(40, 30, np.random.default_rng(SEED))
    interlaced = Image.open(io.BytesIO(seeds["interlaced.png"]))
    assert interlaced.info.get("interlace") == 1
    assert np.array_equal(np.asarray(interlaced), np.asarray(photo))


def test_mutated_inputs_give_an_image_or_an_image_error():
    failures = []
    rng = random.Random(SEED)
    tried = fuzz(
        images,
        rng,
        lambda count: count < MUTATIONS,
        lambda data, settings, error: failures.append((data, settings, error)),
    )
    assert tried == MUTATIONS
    assert not failures, [
        (len(d), s, type(e).__name__, str(e)[:80]) for d, s, e in failures[:5]
    ]


def test_mutations_reach_the_decoders():
    """The fuzzer is worth running only if mutated files get past identification."""
    rng = random.Random(SEED + 1)
    seeds = list(seed_files().values())
    codes = {}
    for _ in range(300):
        try:
            convert_image(mutate(rng.choice(seeds), rng, seeds), max_pixels=MAX_PIXELS)
            codes["converted"] = codes.get("converted", 0) + 1
        except ImageError as e:
            codes[e.code] = codes.get(e.code, 0) + 1
    assert codes.get("converted", 0) > 30 and codes.get("truncated", 0) > 30, codes


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*")), ids=lambda p: p.name)
def test_corpus_file_gives_an_image_or_an_image_error(path):
    data = path.read_bytes()
    assert len(data) < 20_000
    for settings in SETTINGS:
        assert failure(images, data, settings) is None
        assert failure(images, data, settings, images.DEFAULT_MAX_PIXELS) is None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Fuzz convert_image for a while; new crashers go to tests/fuzz_corpus/."
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="how long to run")
    parser.add_argument(
        "--seed", type=int, default=None, help="random seed (default: from the clock)"
    )
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else time.time_ns()
    deadline = time.monotonic() + args.minutes * 60
    found = []

    def on_failure(data: bytes, settings: dict, error: BaseException) -> None:
        path = save_crasher(data, settings)
        found.append(path)
        print(f"crasher: {type(error).__name__} with {settings} -> {path}", flush=True)

    tried = fuzz(images, random.Random(seed), lambda _: time.monotonic() < deadline,
                 on_failure)  # fmt: skip
    print(f"seed {seed}: {tried:,} mutations, {len(found)} crashers")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
