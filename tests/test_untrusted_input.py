"""The whole convert job on input nobody wrote by hand: mutated files of every format, a
credentials file and a link to a secret outside the tree.

Property: the job exits 0, every listed object is converted or rejected with a reason,
and no byte of a rejected input appears in the job's output or its logs.
"""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys

import numpy as np
from PIL import Image

from devtools.sample_data import photo_like
from s3tfr import storage
from s3tfr.manifest import load_info

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = "AKIAFUZZ0SECRET0TOKEN0e1b2c3d4"
SEED = 1804
MUTANTS_PER_SEED = 6


def _seeds() -> dict[str, bytes]:
    """One small file per format and mode the job accepts, from Pillow's encoders."""
    rng = np.random.default_rng(SEED)
    rgb = photo_like(40, 30, rng)
    out: dict[str, bytes] = {}

    def save(name: str, image: Image.Image, fmt: str, **params) -> None:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **params)
        out[name] = buffer.getvalue()

    save("baseline.jpg", rgb, "JPEG", quality=80)
    save("progressive.jpg", rgb, "JPEG", progressive=True)
    save("cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("alpha.png", rgb.convert("RGBA"), "PNG")
    save("palette.png", rgb.convert("P"), "PNG")
    save("interlaced.png", rgb, "PNG", interlace=True)
    save("sixteen.png", Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257),
         "PNG")  # fmt: skip
    save("bilevel.png", rgb.convert("1"), "PNG")
    save("anim.gif", rgb.convert("P"), "GIF", save_all=True,
         append_images=[rgb.rotate(90).convert("P")])  # fmt: skip
    save("lossy.webp", rgb, "WEBP")
    save("tiled.tif", rgb, "TIFF")
    save("plain.bmp", rgb, "BMP")
    return out


def _mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # truncate
        return data[: rng.randrange(1, len(data))]
    buf = bytearray(data)
    if kind == 1:  # flip bits
        for _ in range(rng.randrange(1, 8)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 2:  # overwrite a range with the secret
        at = rng.randrange(len(buf))
        buf[at : at + len(SECRET)] = SECRET.encode()
    else:  # zero a range
        at = rng.randrange(len(buf))
        buf[at : at + rng.randrange(1, 64)] = bytes(rng.randrange(1, 64))
    return bytes(buf)


def test_mutated_inputs_and_secrets_never_fail_or_leak(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    rng = random.Random(SEED)
    for name, data in _seeds().items():
        folder = src / name.split(".")[0]
        folder.mkdir(parents=True)
        (folder / name).write_bytes(data)
        for i in range(MUTANTS_PER_SEED):
            (folder / f"m{i}-{name}").write_bytes(_mutate(data, rng))
    secrets = src / "secrets"
    secrets.mkdir()
    (secrets / "credentials.jpg").write_text(f"[default]\naws_secret_access_key = {SECRET}\n")
    # Valid images whose metadata holds the secret: converted, metadata not carried.
    metadata = src / "metadata"
    metadata.mkdir()
    photo = photo_like(40, 30, np.random.default_rng(SEED))
    photo.save(metadata / "comment.jpg", "JPEG", comment=SECRET.encode())
    photo.convert("RGBA").save(metadata / "icc.png", "PNG", icc_profile=SECRET.encode() * 4)
    outside = tmp_path / "shadow"
    outside.write_text(f"root:{SECRET}:19000:0:99999:7:::\n")
    (secrets / "shadow.png").symlink_to(outside)

    log = tmp_path / "convert.log"
    with open(log, "wb") as f:
        code = subprocess.run(
            [sys.executable, "-m", "beam_jobs.convert", "--input", str(src), "--output",
             str(out), "--resize", "fit:32x32"],
            check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=f,
            stderr=subprocess.STDOUT, timeout=600,
        ).returncode  # fmt: skip
    text = log.read_text(errors="replace")
    assert code == 0, text[-4000:]
    info = load_info(str(out))
    counts = info["counts"]
    listed = sum(len(files) for _, _, files in os.walk(src))
    assert counts["listed"] == listed
    assert counts["listed"] == counts["converted"] + counts["rejected"]
    assert counts["converted"] >= len(_seeds()) + 2  # every unmutated seed, metadata/*
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {r["key"] for r in rejected} >= {"secrets/credentials.jpg", "secrets/shadow.png"}
    assert all(r["reason"] and r["code"] for r in rejected)
    assert not any(r["key"].startswith("metadata/") for r in rejected)
    # The secret is only in inputs that were rejected: no output file, no log line.
    for rel, _size in storage.walk(str(out)):
        assert SECRET.encode() not in (out / rel).read_bytes(), rel
    assert SECRET not in text


def test_a_fifo_is_refused_without_blocking(tmp_path):
    import threading

    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    outcome = []

    def read():
        try:
            storage.read_bytes(str(fifo))
        except OSError as e:
            outcome.append(type(e).__name__)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert outcome == ["IsADirectoryError"]


def test_link_loops_and_line_breaks_in_folder_names_are_rejected_not_fatal(tmp_path):
    from beam_jobs import convert

    src, out = tmp_path / "src", tmp_path / "out"
    (src / "cat").mkdir(parents=True)
    photo_like(20, 20, np.random.default_rng(0)).save(src / "cat" / "a.jpg", "JPEG")
    (src / "loop").symlink_to(src / "loop")  # a link to itself
    (src / "two\nlines").mkdir()
    photo_like(20, 20, np.random.default_rng(1)).save(src / "two\nlines" / "b.jpg", "JPEG")
    convert.run(["--input", str(src), "--output", str(out)])
    info = load_info(str(out))
    assert info["labels"] == ["cat"]
    rejected = {json.loads(line)["key"]: json.loads(line)["code"]
                for line in (out / "rejected.jsonl").read_text().splitlines()}  # fmt: skip
    assert rejected == {"loop": "no_class_folder", "two\nlines/b.jpg": "bad_name"}
    assert (out / "labels.txt").read_text() == "cat\n"
