"""Beam runners the jobs use that Beam does not ship in a usable form: :mod:`runners.dask`
(``--runner=DaskRunner``; ``dask worker --preload runners.dask``)."""
