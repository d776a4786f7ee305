"""A small regression gate with pytest-benchmark (not part of `make test`).

    make benchmark-save      # store a baseline under .benchmarks/
    make benchmark-compare   # fail when a case's median is >20% slower than the baseline
                             # (BENCHMARK_TOLERANCE=50% on a noisy shared CPU: medians drift by 20-40% there)

Each benchmark is one runner case, timed in pedantic mode with CUDA
synchronised inside the timed call; the case goes into ``extra_info``.
"""

from __future__ import annotations

import pytest
import torch

from ntk_bench import implementations
from ntk_bench.bench import measure
from ntk_bench.bench.sweeps import Case, Problem

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

CASES = [
    Case("explicit_mlp", Problem("mlp", (("depth", 2), ("in_features", 64), ("out", 10), ("width", 256)), 64, None), "full", "float32", DEVICE),
    Case("jacobian_contraction", Problem("mlp", (("depth", 2), ("in_features", 64), ("out", 10), ("width", 256)), 16, None), "full", "float32", DEVICE),
    Case("ntk_vector_products", Problem("cnn", (("channels", 8), ("image", 8), ("out", 4)), 8, 4), "full", "float32", DEVICE),
    Case("backpack_batchgrad", Problem("tutorial_cnn", (), 4, None), "full", "float32", DEVICE),
    Case("backpack_sqrtggn", Problem("cnn", (("channels", 8), ("image", 8), ("out", 4)), 16, None), "trace", "float32", DEVICE),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_speed(benchmark, case):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    _, model, x1, x2 = measure.build_problem(case.problem, measure.DTYPES[case.dtype], case.device)
    plugin = implementations.get(case.impl)

    def call():
        out = plugin.compute(model, x1, x2, mode=case.mode)
        if case.device == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.extra_info.update(measure.case_fields(case))
    out = benchmark.pedantic(call, rounds=30, warmup_rounds=3, iterations=1)
    assert out.shape[0] == case.problem.n
