"""Composite PTransforms of the jobs and the plain functions they call.

Modules that import Beam: listing, sharding, tfrecords, manifest. The rest (images, s3,
storage, records, host) do not, so the tf.data reader and the benchmarks can use them alone.
"""
