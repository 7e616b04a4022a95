"""Real Flink and Spark engines on 127.0.0.1, for the tests and ``run_local.sh``.

Test and developer infrastructure, not part of the shipped packages: ``fetch`` brings
Beam's job servers (Maven Central) and the Flink and Spark distributions (PyPI's
``apache-flink`` / ``apache-flink-libraries`` and ``pyspark`` packages, unpacked, never
installed) into a git-ignored cache; ``clusters`` starts a Flink session cluster or a
Spark standalone cluster plus the matching Beam job server, and stops them.
"""
