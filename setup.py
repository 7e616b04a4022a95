"""Packaging: the tf.data reader (the base install), the Beam jobs (extra ``beam``), the
Dask runner (extra ``dask``) and the development tools (extra ``dev``).

    pip install s3-tfrecords            # tfdata_reader and the Python API's load_info
    pip install 's3-tfrecords[beam]'    # + the convert, upload, analyze, inspect jobs
    pip install -e '.[dev]'             # + tests, the local S3 server, ruff, Dask

Ranges start at the versions the test suite runs (requirements.txt pins those, for
./run_local.sh and CI). Workers on a cluster install it with ``--setup_file ./setup.py``
on top of the worker image (Dockerfile), which already holds every extra.
"""

import pathlib
import re

import setuptools

HERE = pathlib.Path(__file__).parent
# The one version string, read without importing the package.
VERSION = re.search(
    r'^VERSION = "(.+)"$', (HERE / "s3tfr" / "contract.py").read_text(), re.MULTILINE
)[1]

# The reader streams shards with TensorFlow and boto3 and checks TFRecord CRCs.
RUNTIME = [
    "tensorflow>=2.21,<3",
    "numpy>=2.0",
    "boto3>=1.34",
    "google-crc32c>=1.5",
]
BEAM = [
    "apache-beam[aws]>=2.77,<3",
    "tensorflow-transform>=1.21",
    "pillow>=12.0",
    # The JPEG path (transforms/turbo.py); the versions used are in each manifest.
    "simplejpeg>=1.9,<2",
    "opencv-python-headless>=4.10",
    "matplotlib>=3.9",
    "rich>=13",
]
DASK = ["dask>=2026.1", "distributed>=2026.1"]
DEV = [
    *BEAM,
    *DASK,
    "pytest>=8",
    "ruff>=0.15",
    "moto[server]>=5.1",
    "tensorflow-datasets>=4.9",
]

setuptools.setup(
    name="s3-tfrecords",
    version=VERSION,
    description="S3 image folders to sharded TFRecords with Apache Beam, and a tf.data reader",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(
        include=["s3tfr*", "beam_jobs*", "transforms*", "tfdata_reader*", "runners*"]
    ),
    install_requires=RUNTIME,
    extras_require={"beam": BEAM, "dask": DASK, "dev": DEV},
    entry_points={
        "console_scripts": [
            "s3tfr-analyze=s3tfr.cli:analyze",
            "s3tfr-convert=s3tfr.cli:convert",
            "s3tfr-inspect=s3tfr.cli:inspect",
            "s3tfr-upload=s3tfr.cli:upload",
        ],
    },
)
