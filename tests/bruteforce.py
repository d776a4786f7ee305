"""The brute-force oracle, for the tests: it lives in the package (``ntk-bench check`` uses it too)."""

from ntk_bench.bench.measurement.bruteforce import jacobian, ntk  # noqa: F401
