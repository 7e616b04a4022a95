"""The jobs: each module's ``run(argv)`` wires transforms and options into a pipeline."""
