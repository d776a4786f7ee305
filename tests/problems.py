"""The correctness suite's problems, for the tests: they live in the package (``ntk-bench check`` runs them too)."""

from ntk_bench.bench.measurement.problems import (  # noqa: F401
    ALL_PROBLEMS, BY_ID, EXPECTED_UNSUPPORTED, FULL_MODE_ONLY, PROBLEMS, QUICK, REAL_PROBLEMS, SMALL_CNN, SMALL_MLP,
    TOLERANCE, Problem, rel_err,
)
