"""Packaging: the Beam jobs, their transforms and the tf.data reader in one distribution.

Workers on a cluster install it with ``--setup_file ./setup.py``.
"""

import pathlib

import setuptools

HERE = pathlib.Path(__file__).parent


def _requirements() -> list[str]:
    lines = (HERE / "requirements.txt").read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


setuptools.setup(
    name="s3-tfrecords",
    version="0.1.0",
    description="S3 image folders to sharded TFRecords with Apache Beam, and a tf.data reader",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["beam_jobs*", "transforms*", "tfdata_reader*"]),
    install_requires=_requirements(),
    entry_points={
        "console_scripts": [
            "s3tfr-analyze=beam_jobs.analyze:main",
            "s3tfr-convert=beam_jobs.convert:main",
            "s3tfr-inspect=beam_jobs.inspect:main",
            "s3tfr-upload=beam_jobs.upload:main",
        ],
    },
)
