"""nsabench: the `nsa` command-line toolkit (validation, benchmarks, reports).

Uses the :mod:`nsa` library; the library never imports this package.
"""

__version__ = "0.1.0"
