"""What ``pip install`` gives: runtime dependencies only (extras for the Beam jobs and for
development), a reader that works without Beam, console scripts that say which extra is
missing, and the documented Python API (``s3tfr.convert(...)`` returning the manifest)."""

from __future__ import annotations

import ast
import email.parser
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile

import pytest

import s3tfr
from devtools import sample_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The packages the wheel installs (setup.py); devtools/, engines/, bench/ and tests/ are
# development only.
SHIPPED = ("s3tfr", "beam_jobs", "transforms", "tfdata_reader", "runners")

# Modules only the extras bring: an install without them must still read datasets.
EXTRA_MODULES = ("apache_beam", "tensorflow_transform", "PIL", "matplotlib", "rich",
                 "dask", "distributed", "moto", "pytest", "tensorflow_datasets")  # fmt: skip


def _requirement_name(line: str) -> str:
    name = line.split(";")[0]
    for stop in "<>=![ ":
        name = name.split(stop)[0]
    return name.strip().lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    # Built from a copy: setuptools leaves build/ in the source tree, and a stale build/lib
    # (a module since moved or deleted) would otherwise ride along into the wheel.
    source = tmp_path_factory.mktemp("source")
    for name in ("setup.py", "README.md", "MANIFEST.in"):
        shutil.copy(os.path.join(ROOT, name), source)
    for package in SHIPPED:
        shutil.copytree(os.path.join(ROOT, package), source / package,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--quiet", "-w", str(out), str(source)],
        check=True, cwd=source, timeout=300, capture_output=True,
    )  # fmt: skip
    (path,) = out.glob("*.whl")
    return str(path)


def test_wheel_ships_the_product_and_no_test_servers(wheel):
    with zipfile.ZipFile(wheel) as z:
        modules = [n for n in z.namelist() if n.endswith(".py")]
        sources = {n: z.read(n).decode() for n in modules}
    assert {n.split("/")[0] for n in modules} == set(SHIPPED)
    for name in ("local_s3", "s3proxy", "sample_data", "demo", "conftest"):
        assert not [n for n in modules if n.endswith(f"/{name}.py")], name
    # No server of any kind: nothing imports moto or http.server.
    for name, source in sources.items():
        imported = {
            alias.name if isinstance(node, ast.Import) else node.module
            for node in ast.walk(ast.parse(source))
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
        }
        assert not {m for m in imported if m and m.split(".")[0] == "moto"}, name
        assert "http.server" not in imported, name


def test_wheel_requires_runtime_only_and_offers_extras(wheel):
    with zipfile.ZipFile(wheel) as z:
        (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(z.read(meta).decode())
    requires = metadata.get_all("Requires-Dist")
    base = {_requirement_name(r) for r in requires if "extra ==" not in r}
    assert base == {"tensorflow", "numpy", "boto3", "google-crc32c"}
    extras = {
        extra: {_requirement_name(r) for r in requires if f'extra == "{extra}"' in r}
        for extra in metadata.get_all("Provides-Extra")
    }
    assert {"apache-beam", "tensorflow-transform", "pillow"} <= extras["beam"]
    assert {"pytest", "ruff", "moto", "dask", "tensorflow-datasets"} <= extras["dev"]
    assert extras["beam"] <= extras["dev"]
    # No exact pins in what a user installs: ranges, so the package fits their environment.
    assert not [r for r in requires if "==" in r.split(";")[0]]


def test_console_scripts_are_the_launchers(wheel):
    with zipfile.ZipFile(wheel) as z:
        (entry,) = [n for n in z.namelist() if n.endswith("entry_points.txt")]
        text = z.read(entry).decode()
    for job in ("convert", "upload", "analyze", "inspect"):
        assert f"s3tfr-{job} = s3tfr.cli:{job}" in text


# Runs in a fresh interpreter where importing any extra's module fails, as after
# ``pip install s3-tfrecords`` without extras.
_WITHOUT_EXTRAS = textwrap.dedent(
    """
    import importlib.abc, sys
    BLOCKED = {blocked!r}

    class NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

    sys.meta_path.insert(0, NotInstalled())
    """
)


def _without_extras(code: str, *args: str) -> subprocess.CompletedProcess:
    script = _WITHOUT_EXTRAS.format(blocked=EXTRA_MODULES) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, *args], check=False, cwd=ROOT, capture_output=True,
        text=True, timeout=300, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    src = tmp_path_factory.mktemp("src")
    sample_data.write_sample_tree(str(src), per_class=4)
    out = str(tmp_path_factory.mktemp("out") / "ds")
    s3tfr.convert(input=str(src), output=out, num_shards=2)
    return out


def test_reader_reads_a_dataset_without_beam_or_the_extras(dataset):
    done = _without_extras(
        f"""
        import sys
        import tfdata_reader, s3tfr
        ds = tfdata_reader.make_dataset(sys.argv[1], "train", batch_size=2,
                                        training=False)
        info = s3tfr.load_info(sys.argv[1])
        n = sum(int(labels.shape[0]) for _, labels in ds)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {EXTRA_MODULES!r})
        print(n, info["splits"]["train"]["examples"], loaded)
        """,
        dataset,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    count, expected, loaded = done.stdout.split(maxsplit=2)
    assert int(count) == int(expected) > 0
    assert loaded.strip() == "[]"


def test_console_script_without_beam_names_the_extra():
    done = _without_extras(
        "import sys; sys.argv = ['s3tfr-convert', '--help']\n"
        "from s3tfr import cli; cli.convert()"
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "convert: error: convert needs the Beam jobs' dependencies: "
        "pip install 's3-tfrecords[beam]'"
    )


def test_python_api_returns_the_manifest_and_raises_one_line_errors(dataset, tmp_path):
    info = s3tfr.load_info(dataset)
    assert info["num_classes"] == len(info["labels"]) > 1
    assert (
        sum(s["examples"] for s in info["splits"].values())
        == info["counts"]["converted"]
    )

    with pytest.raises(
        s3tfr.UserError, match="valdation_fraction.*validation_fraction"
    ):
        s3tfr.convert(input=dataset, output=str(tmp_path / "x"), valdation_fraction=0.3)
    assert not (tmp_path / "x").exists()
    with pytest.raises(s3tfr.UserError, match="not an option name"):
        s3tfr.convert(input=dataset, output=str(tmp_path / "x"), **{"a b": 1})
    # Flags: True alone, False/None left out, lists repeated.
    assert s3tfr.argv({"verify": True, "report": None, "x": False, "e": ["a", "b"]}) == [
        "--verify", "--e=a", "--e=b",
    ]  # fmt: skip


def test_python_api_verify_and_analyze(dataset):
    values = s3tfr.verify(dataset)
    info = s3tfr.load_info(dataset)
    assert values["shards_passed"] == sum(
        len(s["shards"]) for s in info["splits"].values()
    )
    assert values.get("shards_failed", 0) == 0
    stats = s3tfr.analyze(dataset)
    assert stats["labels"] == info["labels"]
    assert len(stats["pixel_mean"]) == 3


def test_python_api_upload_returns_the_report(s3_bucket, tmp_path):
    src = tmp_path / "src"
    sample_data.write_sample_tree(str(src), per_class=2, corrupt=False)
    files = sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())
    planned = s3tfr.upload(source=str(src), output=f"s3://{s3_bucket}/images/", dry_run=True)
    assert planned["dry_run"] and sorted(planned["would_upload"]) == files
    report = s3tfr.upload(source=str(src), output=f"s3://{s3_bucket}/images/")
    assert report["counts"] == {"uploaded": len(files)} and not report["failed"]
    again = s3tfr.upload(source=str(src), output=f"s3://{s3_bucket}/images/")
    assert again["counts"] == {"unchanged": len(files)}
