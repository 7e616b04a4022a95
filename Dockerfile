# Worker image for Flink, Spark, Dataflow and Dask: Beam's own Python SDK image (its boot
# entrypoint speaks the SDK-harness contract) with this project and its pinned
# dependencies installed, so workers start without pip installs.
#
#   docker build -t REGISTRY/s3-tfrecords-worker:0.1.0 .
#   docker push REGISTRY/s3-tfrecords-worker:0.1.0
#   ... --sdk_container_image=REGISTRY/s3-tfrecords-worker:0.1.0
#
# Keep the tag equal to apache-beam in requirements.txt: the launcher's Beam version and
# the workers' must match.
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/s3-tfrecords

# Dependencies first, in their own layer: code changes rebuild only the last layers.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY setup.py MANIFEST.in README.md ./
COPY s3tfr ./s3tfr
COPY beam_jobs ./beam_jobs
COPY transforms ./transforms
COPY tfdata_reader ./tfdata_reader
COPY runners ./runners
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import s3tfr, beam_jobs.convert, beam_jobs.upload, beam_jobs.analyze, runners.dask, tfdata_reader"

# Workers run Beam's boot (the base image's ENTRYPOINT); nothing to override. The same
# image also runs a Dask worker: docker run IMAGE ... with --entrypoint dask.
