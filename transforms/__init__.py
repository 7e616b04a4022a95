"""Composite PTransforms of the jobs and the plain functions they call.

Modules that import Beam: analyze, listing, manifest, report (through verify), sharding,
tfrecords, upload, verify. The rest (examples, host, images, records, s3, storage,
uploader) do not, so the tf.data reader and the benchmarks can use them alone.
"""
