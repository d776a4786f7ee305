"""ntk-bench's pytest plugin (entry point ``pytest11``): a plugin's benchmarks in pytest, stored by pytest-benchmark.

    from ntk_bench.bench.pytest_plugin import problem

    @pytest.mark.ntk_registry                    # one test per registered plugin of ours ("plugin" argument)
    def test_speed(ntk_case, plugin):
        ntk_case(plugin, problem("mlp", N=16, width=64))

``ntk_case(plugin, problem, mode="full", dtype="float32", device="cpu")`` does what the regression gate does for
one case (``ntk_bench.bench.measurement.gate``): builds the problem, runs the plugin once and checks its kernel against
``jacobian_contraction`` in float64 (a mismatch fails the test, a model the plugin declines skips it), then times
blocks of calls with the gate's clock (process CPU time on one torch thread on the CPU; wall time, synchronised,
on a GPU) through pytest-benchmark's ``benchmark`` fixture, so that ``--benchmark-autosave``,
``--benchmark-compare`` and the rest work as for any benchmark. The row the runner would write (case id, status,
agreement, per-block times) goes into the benchmark's ``extra_info``, which ``ntk-bench compare`` reads from
pytest-benchmark's saved JSON. Without pytest-benchmark the blocks are timed all the same and kept in the test's
``user_properties``.

``@pytest.mark.ntk_registry(origin="ours", tag=None, exclude=(), argname="plugin")`` parametrises a test over the
registry's plugin names (``origin="peer"`` for the peers, ``None`` for all; ``tag="fast"`` only those tagged so).

The module imports neither torch nor the registry until a test uses them: pytest loads it in every session of an
environment where ntk-bench is installed.
"""

from __future__ import annotations

import pytest

MARKER = "ntk_registry"
ROUNDS = 10  # blocks per case: compare's rank test needs 5 a side


def problem(arch: str, N: int, M: int | None = None, **params):
    """A problem of the zoo's ``arch`` (``ntk-bench list``) at ``params`` with N inputs (and M others; None: x2 = x1)."""
    from .sweeps import Problem

    return Problem(arch, tuple(sorted(params.items())), int(N), None if M is None else int(M))


def pytest_configure(config):
    config.addinivalue_line("markers", f"{MARKER}(origin='ours', tag=None, exclude=(), argname='plugin'): run the test once per "
                                       "plugin of ntk-bench's registry (the name in the argument ``argname``)")


def pytest_generate_tests(metafunc):
    marker = metafunc.definition.get_closest_marker(MARKER)
    if marker is None:
        return
    origin = marker.kwargs.get("origin", marker.kwargs.get("kind", "ours"))  # (kind: the old name of origin)
    tag = marker.kwargs.get("tag")
    exclude = set(marker.kwargs.get("exclude", ()))
    argname = marker.kwargs.get("argname", "plugin")
    if argname not in metafunc.fixturenames:
        raise pytest.UsageError(f"@pytest.mark.{MARKER}: {metafunc.definition.nodeid} has no argument {argname!r} "
                                "to put the plugin's name in")
    from ntk_bench import implementations

    names = [n for n in implementations.names(origin, tag=tag) if n not in exclude]
    metafunc.parametrize(argname, names, ids=names)


class NTKCase:
    """What ``ntk_case`` timed: the runner's row (``row``: status, rel_err, first_call_s, time_blocks_s, ...)."""

    def __init__(self, row: dict):
        self.row = row

    @property
    def median_s(self) -> float:
        return self.row["time_median_s"]


def _run(request, plugin: str, prob, mode: str, dtype: str, device: str, budget_s: float, rounds: int) -> NTKCase:
    import statistics

    import torch

    from ntk_bench.implementations.core.tolerances import tolerance

    from .measurement import gate
    from .sweeps import Case, Problem

    if not isinstance(prob, Problem):
        raise TypeError(f"ntk_case: problem must be ntk_bench.bench.pytest_plugin.problem(...), got {prob!r}")
    case = Case(plugin, prob, mode, dtype, device, time_budget_s=budget_s)
    timer, timer_name = gate.clock("cpu", device)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the gate's one thread: two on a shared core wait for each other
    try:
        got = gate.prepare(case, budget_s, rounds)
        if not isinstance(got, gate.Prepared):
            if got["status"] == "unsupported":
                pytest.skip(f"{plugin} declines {prob.id}: {got.get('error')}")
            pytest.fail(f"ntk_case: {plugin} on {prob.id}: {got['status']}: {got.get('error', '')}", pytrace=False)
        if got.row["status"] != "ok":
            pytest.fail(f"ntk_case: {plugin} on {prob.id}: kernel off by rel err {got.row['rel_err']:.3e} "
                        f"(tolerance {tolerance(dtype):g})", pytrace=False)
        got.kernel = None
        try:
            benchmark = request.getfixturevalue("benchmark")
        except pytest.FixtureLookupError:
            benchmark = None
        if benchmark is not None and getattr(benchmark, "disabled", False):  # --benchmark-disable, or under xdist
            benchmark = None
        if benchmark is not None:
            benchmark._timer = timer  # the gate's clock, not pytest-benchmark's default perf_counter
            benchmark.pedantic(got.call, rounds=rounds, iterations=got.number, warmup_rounds=0)
            blocks = list(benchmark.stats.stats.data)
        else:
            blocks = [gate.time_block(got, timer) for _ in range(rounds)]
    finally:
        torch.set_num_threads(threads)
    q = statistics.quantiles(blocks, n=4) if len(blocks) > 1 else [blocks[0]] * 3
    row = {**got.row, "time_median_s": statistics.median(blocks), "time_iqr_s": q[2] - q[0],
           "time_blocks_s": blocks, "time_repeats": got.number * len(blocks), "timer": timer_name, "cpu_threads": 1}
    if benchmark is not None:
        benchmark.extra_info.update({"ntk_bench": row})
    else:
        request.node.user_properties.append(("ntk_bench", row))
    return NTKCase(row)


@pytest.fixture
def ntk_case(request):
    """``ntk_case(plugin, problem, mode="full", dtype="float32", device="cpu", budget_s=0.2, rounds=10)``: check
    ``plugin``'s kernel on ``problem`` against the float64 reference, then time it as the regression gate does
    (stored by pytest-benchmark where it is installed); returns an :class:`NTKCase` with the runner's row."""
    used = []

    def run(plugin: str, prob, mode: str = "full", dtype: str = "float32", device: str = "cpu",
            budget_s: float = 0.2, rounds: int = ROUNDS) -> NTKCase:
        if used:  # pytest-benchmark's fixture times one thing per test
            raise pytest.UsageError("ntk_case: one case per test (parametrise the test for more)")
        used.append(plugin)
        return _run(request, plugin, prob, mode, dtype, device, budget_s, rounds)

    return run
