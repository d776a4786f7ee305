import functools
import os

import pytest
import torch

from ntk_bench.envvars import env

# runner_helpers: the runner tests' session fixtures (one smoke run, one reference)
pytest_plugins = ["pytester", "tests.helpers.runner_helpers"]

# float32 checks are against float64 with TF32 off.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# Under pytest-xdist (make test runs one worker per core) each worker computes with its share of the cores: two
# threads each on two shared cores wait for each other.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# NTK_BENCH_REFERENCE=harness, on a machine without neural-tangents (the GPU machines): the plugins are checked
# against the harness's own float64 CPU Jacobian contraction, which `make test` checks against neural-tangents.
HARNESS_REFERENCE = env("REFERENCE") == "harness"


def _use_harness_reference() -> bool:
    from ntk_bench import reference

    return HARNESS_REFERENCE and reference.available() is not None


@functools.lru_cache(maxsize=None)
def reference_full(problem_id: str) -> torch.Tensor:
    """The full float64 kernel of a problem (neural-tangents'), computed once per process."""
    from ntk_bench import reference
    from ntk_bench.bench.measurement.problems import BY_ID

    p = BY_ID[problem_id]
    x1, x2 = p.inputs()
    if _use_harness_reference():
        from ntk_bench import implementations

        return implementations.get("jacobian_contraction").compute(p.model(), x1, x2, mode="full")
    return reference.ntk(p.model(), x1, x2, mode="full")


def supported_model(plugin, problem, **kwargs):
    """The problem's model, or a skip naming why ``plugin`` declines it."""
    model = problem.model(**kwargs)
    reason = plugin.supports(model)
    if reason is not None:
        pytest.skip(reason)
    return model


def _require_neural_tangents():
    from ntk_bench import reference

    reason = reference.available()
    if reason is not None:
        if env("REQUIRE_REFERENCE") == "1":  # make test: a missing reference is a failure
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="session")
def nt_available():
    _require_neural_tangents()


@pytest.fixture(scope="session")
def kernel_reference():
    """neural-tangents, or with NTK_BENCH_REFERENCE=harness and no neural-tangents, the harness's float64 JC."""
    if not _use_harness_reference():
        _require_neural_tangents()
