import functools
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

pytest_plugins = ["pytester"]

# float32 checks are against float64 with TF32 off.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@functools.lru_cache(maxsize=None)
def reference_full(problem_id: str) -> torch.Tensor:
    """neural-tangents' full float64 kernel for a problem, computed once per process."""
    import reference
    from problems import BY_ID

    p = BY_ID[problem_id]
    x1, x2 = p.inputs()
    return reference.ntk(p.model(), x1, x2, mode="full")


@pytest.fixture(scope="session")
def nt_available():
    import reference

    reason = reference.available()
    if reason is not None:
        if os.environ.get("NTKBENCH_REQUIRE_REFERENCE") == "1":  # make test: a missing reference is a failure
            pytest.fail(reason)
        pytest.skip(reason)
