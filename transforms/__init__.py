"""The writer's stages: composite PTransforms of the jobs and the plain functions they call.

Stages (Beam): ``listing`` (ListImages), ``sharding`` (AssignShards), ``tfrecords``
(WriteShards), ``manifest_writer`` (WriteManifest), ``verify`` (VerifyShards),
``statistics`` (AnalyzeImages, with tensorflow-transform), ``upload_files``
(UploadFiles), with ``commit`` (the output's lease and commit order), ``progress`` and
``report``. Plain functions without Beam: ``images`` (one image's conversion),
``examples`` (tf.train.Example and TFRecord framing), ``references`` (what travels
between stages), ``uploader`` (the upload plan), ``tfds_metadata``. What the writer and
the readers share (file names, the manifest schema, S3) is in the core package ``s3tfr``.
"""
