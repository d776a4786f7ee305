"""The reference checks itself: its API, its refusals, the parameter layout, and neural-tangents' implementations
agreeing with each other (the zoo against a brute-force torch kernel is in ``test_reference_zoo.py``; every
op rule against torch in ``test_reference_rules.py``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ntk_bench import implementations
from ntk_bench.bench.measurement.bruteforce import ntk as brute_force_ntk
from ntk_bench.bench.measurement.problems import BY_ID, rel_err
from tests.conftest import reference_full

pytestmark = pytest.mark.usefixtures("nt_available")

ROOT = Path(__file__).resolve().parents[2]


def test_translation_as_a_jax_function():
    """``to_jax``'s apply_fn on a batch is the torch forward (the zoo's per-sample forwards: test_reference_zoo)."""
    from ntk_bench import reference

    p = BY_ID["resnet_tiny-O3-N2M3"]
    model = p.model()
    x1, _ = p.inputs()
    apply_fn, params = reference.to_jax(model, x1)
    out = np.asarray(apply_fn(params, reference.to_numpy(x1)))
    np.testing.assert_allclose(out, model(x1).detach().numpy(), rtol=1e-12, atol=1e-12)


# Each implementation on a few architectures (each case compiles; the tutorial CNN's JC, 6 s, is left out).
AGREE = [("mlp-relu-O3-N4M3", "jacobian_contraction"), ("mlp-relu-O3-N4M3", "ntk_vector_products"),
         ("mlp-relu-O3-N4M3", "auto"), ("mlp-gelu-nobias-O2-N3M2", "jacobian_contraction"),
         ("mlp-gelu-nobias-O2-N3M2", "ntk_vector_products"), ("tutorial_cnn-O10-N2M3", "ntk_vector_products"),
         ("cnn-O4-N2M3", "jacobian_contraction"), ("cnn-O4-N2M3", "ntk_vector_products"),
         ("resnet_tiny-O3-N2M3", "jacobian_contraction"), ("resnet_tiny-O3-N2M3", "ntk_vector_products")]


@pytest.mark.parametrize("problem,implementation", [(BY_ID[p], impl) for p, impl in AGREE],
                         ids=[f"{p}-{impl}" for p, impl in AGREE])
def test_neural_tangents_implementations_agree(problem, implementation):
    """reference_full is structured derivatives (the default); the other implementations agree with it."""
    from ntk_bench import reference

    x1, x2 = problem.inputs()
    k = reference.ntk(problem.model(), x1, x2, implementation=implementation)
    assert rel_err(k, reference_full(problem.id)) <= 1e-12


@pytest.mark.parametrize("mode", ["trace", "diagonal"])
def test_native_modes_match_the_reduced_full_kernel(mode):
    """neural-tangents' own trace_axes/diagonal_axes (used when timing it as a peer) mean what ours mean."""
    from ntk_bench import reference
    from ntk_bench.implementations.core.contractions import reduce_full

    p = BY_ID["mlp-relu-O3-N4M3"]
    x1, x2 = p.inputs()
    native = reference.kernel_fn(p.model(), x1, mode=mode)(x1, x2)
    assert rel_err(torch.from_numpy(np.array(native)), reduce_full(reference_full(p.id), mode)) <= 1e-12
    assert rel_err(reference.ntk(p.model(), x1, x2, mode=mode), reduce_full(reference_full(p.id), mode)) <= 1e-12


def test_reference_is_float64_in_plugin_shapes():
    p = BY_ID["cnn-O4-N2M3"]
    k = reference_full(p.id)
    assert k.dtype == torch.float64 and k.shape == (2, 3, 4, 4)


def test_a_model_returning_n_has_one_output():
    from ntk_bench import reference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double()
    x1, x2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    k = reference.ntk(model, x1, x2)
    assert k.shape == (3, 2, 1, 1)
    assert rel_err(k, brute_force_ntk(model, x1, x2)) <= 1e-12
    assert reference.ntk(model, x1, x2, mode="trace").shape == (3, 2)


def test_float32_model_is_translated_with_float64_weights():
    from ntk_bench import reference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.GELU(), nn.Linear(6, 2))
    x = torch.randn(3, 5)
    k = reference.ntk(model, x)
    assert k.dtype == torch.float64
    assert rel_err(k, brute_force_ntk(model.double(), x.double())) <= 1e-12


def test_linear_weights_are_stored_in_out_and_shared_weights_are_one_parameter():
    """x @ W with W (in, out), the form neural-tangents' structured derivatives recognise; a tied weight once."""
    from ntk_bench import reference
    from ntk_bench.bench.zoo import architectures

    arch = architectures.build("mlp_tied", dtype=torch.float64, how="weight")
    x = architectures.inputs(arch, 2, dtype=torch.float64)
    apply_fn, params = reference.to_jax(arch.model, x)
    assert set(params) == {k for k, _ in arch.model.named_parameters()}
    assert "b.weight" not in params and "a.weight" in params
    assert apply_fn.layouts == {"inp.weight": "(in, out)", "a.weight": "(in, out)", "head.weight": "(in, out)"}
    assert params["inp.weight"].shape == (6, 8) and params["head.weight"].shape == (8, 10)
    np.testing.assert_array_equal(np.asarray(params["a.weight"]), arch.model.a.weight.detach().numpy().T)


def test_frozen_parameters_and_buffers_are_constants():
    from ntk_bench import reference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model[0].weight.requires_grad_(False)
    x1, x2 = torch.randn(3, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    _, params = reference.to_jax(model, x1)
    assert set(params) == {"0.bias", "1.weight", "1.bias", "3.weight", "3.bias"}
    assert rel_err(reference.ntk(model, x1, x2), brute_force_ntk(model, x1, x2)) <= 1e-12


def test_weights_changed_after_translation_are_read_again():
    """The export is cached per model and input shape; the weights are read per call."""
    from ntk_bench import reference

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    before = reference.ntk(model, x)
    with torch.no_grad():
        model[0].weight.mul_(2.0)
    after = reference.ntk(model, x)
    assert rel_err(after, before) > 1e-3
    assert rel_err(after, brute_force_ntk(model, x)) <= 1e-12


def test_every_missing_op_is_named():
    from ntk_bench import reference

    class TwoUnknownOps(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return torch.special.bessel_j0(self.lin(x)) + torch.lgamma(x[:, :2].abs() + 1)

    model = TwoUnknownOps().double()
    x = torch.randn(2, 3, dtype=torch.float64)
    reason = reference.supports(model, x)
    assert reason is not None and "bessel_j0" in reason and "lgamma" in reason and "TwoUnknownOps" in reason
    with pytest.raises(reference.UnsupportedOpError, match="lgamma.*bessel_j0"):
        reference.ntk(model, x)


def test_export_failure_is_reported():
    from ntk_bench import reference

    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else -self.lin(x)

    reason = reference.supports(DataDependent().double(), torch.randn(2, 3, dtype=torch.float64))
    assert reason is not None and reason.startswith("torch.export cannot export DataDependent")


def test_training_mode_batch_norm_says_eval():
    from ntk_bench import reference

    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double().train()
    reason = reference.supports(model, torch.randn(4, 3, dtype=torch.float64))
    assert reason is not None and "model.eval()" in reason


def test_a_model_mixing_the_batch_is_refused():
    """neural-tangents differentiates one sample at a time; a model whose outputs depend on the other samples
    would get a kernel that is not torch's, so it is refused."""
    from ntk_bench import reference

    class Centred(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            return self.lin(x - x.mean(0, keepdim=True))

    reason = reference.supports(Centred().double(), torch.randn(3, 3, dtype=torch.float64))
    assert reason is not None and "mixes the samples of a batch" in reason


def test_a_wrong_rule_is_caught_by_the_forward_check(monkeypatch):
    """Injected fault: a rule computing the wrong function. The translation's forward no longer matches torch's,
    and the reference refuses the model instead of returning a kernel."""
    import jax.numpy as jnp

    from ntk_bench import reference
    from ntk_bench.reference import aten_rules

    monkeypatch.setitem(aten_rules.RULES, "aten.tanh.default", jnp.sin)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(3, 3, dtype=torch.float64)
    reason = reference.supports(model, x)
    assert reason is not None and "differs from torch's" in reason
    with pytest.raises(reference.UnsupportedOpError, match="differs from torch's"):
        reference.ntk(model, x)


def test_unused_output_of_a_rule_is_refused_when_used():
    """A graph using an output the rules do not compute (a max pool's indices) is refused, naming it."""
    from ntk_bench import reference

    class UsesIndices(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool1d(2, return_indices=True)
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            values, indices = self.pool(x)
            return self.lin((values * indices.to(values.dtype)).flatten(1))

    reason = reference.supports(UsesIndices().double(), torch.randn(2, 2, 4, dtype=torch.float64))
    assert reason is not None and "indices" in reason


def test_bad_arguments():
    from ntk_bench import reference

    p = BY_ID["mlp-relu-O3-N4M3"]
    x1, _ = p.inputs()
    with pytest.raises(ValueError, match="unknown mode"):
        reference.ntk(p.model(), x1, mode="diag")
    with pytest.raises(ValueError, match="unknown neural-tangents implementation"):
        reference.kernel_fn(p.model(), x1, implementation="fast")
    with pytest.raises(ValueError, match="different per-sample shapes"):
        reference.ntk(p.model(), x1, torch.randn(2, 5, dtype=torch.float64))


def test_importing_the_reference_is_quiet_and_lazy():
    """No JAX at import; neural-tangents' import (TensorFlow, XLA) logs nothing."""
    code = ("import sys; import ntk_bench.reference as r; assert 'jax' not in sys.modules, 'jax imported'; "
            "assert r.available() is None, r.available()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    noise = [line for line in out.stderr.splitlines() if "external/" in line or "TF-TRT" in line
             or "Unable to register" in line or "tensorflow" in line.lower()]
    assert not noise, noise


# -- neural-tangents as peers -------------------------------------------------------------------------------------

PEERS = implementations.names(None, tag="neural_tangents")


@pytest.mark.parametrize("name,mode", list(zip(PEERS, ["full", "trace", "diagonal"])))
def test_peers_compute_the_reference(name, mode):
    from ntk_bench import implementations
    from ntk_bench.implementations.core.contractions import reduce_full

    plugin = implementations.get(name)
    assert plugin.origin == "peer" and implementations.origin_of(name) == "peer"
    p = BY_ID["cnn-O4-N2M3"]
    x1, x2 = p.inputs()
    k = plugin.compute(p.model(), x1, x2, mode=mode)
    assert k.dtype == torch.float64
    assert rel_err(k, reduce_full(reference_full(p.id), mode)) <= 1e-12
    run, to_torch = plugin.prepare(p.model(dtype=torch.float32), *p.inputs(dtype=torch.float32), mode=mode)
    k32 = to_torch(run())
    assert k32.dtype == torch.float32, "a float32 row times neural-tangents in float32"
    assert rel_err(k32, reduce_full(reference_full(p.id), mode)) <= 1e-4


def test_peers_take_token_ids_and_refuse_budgets_and_untranslatable_models():
    from ntk_bench import implementations
    from ntk_bench.bench.zoo import architectures
    from ntk_bench.implementations import UnsupportedModelError

    plugin = implementations.get("nt_structured_derivatives")
    arch = architectures.build("text_transformer", dtype=torch.float64, out=2, seq=4)
    x1 = architectures.inputs(arch, 2, seed=1)
    assert x1.dtype == torch.int64
    run, to_torch = plugin.prepare(arch.model, x1)
    k = to_torch(run())
    assert k.shape == (2, 2, 2, 2) and k.dtype == torch.float64
    assert rel_err(k, brute_force_ntk(arch.model, x1)) <= 1e-10
    with pytest.raises(UnsupportedModelError, match="memory budget"):
        plugin.prepare(arch.model, x1, memory_budget_bytes=2**30)

    class Sine(nn.Module):
        def forward(self, x):
            return torch.special.i0e(x)  # (differentiable in torch; no rule in the translator)

    model = nn.Sequential(nn.Linear(3, 2), Sine()).double()
    assert plugin.supports(model) is None  # the verdict needs an input
    with pytest.raises(UnsupportedModelError, match="nt_structured_derivatives: .*i0e"):
        plugin.prepare(model, torch.randn(2, 3, dtype=torch.float64))


_ON_CORES = r"""
import os, sys, time
import torch
torch.set_num_threads(1)
from ntk_bench import reference
jax = reference._jax()
import jax.numpy as jnp
a = jnp.ones((1200, 1200), dtype=jnp.float32)
f = jax.jit(lambda a: (a @ a).sum())
f(a).block_until_ready()
c0, w0 = time.process_time(), time.perf_counter()
for _ in range(8):
    f(a).block_until_ready()
cpu, wall = time.process_time() - c0, time.perf_counter() - w0
held = {len(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
print(reference.xla_threads(), max(held), cpu / wall)
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity") or len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="needs two cores to tell one from several")
def test_neural_tangents_computes_on_the_cores_ntk_bench_xla_threads_gives(monkeypatch):
    """XLA sizes its pool by the cores it may use, whatever XLA_FLAGS say: with NTK_BENCH_XLA_THREADS=1 the process
    is held to one core when JAX starts (a large jitted dot then takes no more CPU than wall time); unset, XLA keeps
    every core, and says so."""
    import os

    cores = len(os.sched_getaffinity(0))

    def run(value):
        env = {k: v for k, v in os.environ.items() if k != "NTK_BENCH_XLA_THREADS"}
        if value is not None:
            env["NTK_BENCH_XLA_THREADS"] = value
        out = subprocess.run([sys.executable, "-c", _ON_CORES], capture_output=True, text=True, cwd=ROOT, env=env,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        threads, held, cpu_over_wall = out.stdout.split()
        return int(threads), int(held), float(cpu_over_wall)

    threads, held, cpu_over_wall = run("1")
    assert (threads, held) == (1, 1) and cpu_over_wall < 1.1
    threads, held, _ = run(None)
    assert (threads, held) == (cores, cores)
    bad = subprocess.run([sys.executable, "-c", _ON_CORES], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "NTK_BENCH_XLA_THREADS": "two"}, timeout=300)
    assert bad.returncode != 0 and "NTK_BENCH_XLA_THREADS='two': expected a whole number, 1 or more" \
        in bad.stderr


_HELD_FOR_A_JOB = """
import os, time
import torch
torch.set_num_threads(1)
from ntk_bench import reference
jax = reference._jax()  # started unheld, as by a reference computed in this process before a timed job
import jax.numpy as jnp
threads = lambda: {len(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
before = (sorted(os.sched_getaffinity(0)), reference.xla_threads(), os.environ.get("NTK_BENCH_XLA_THREADS"))
f = jax.jit(lambda a: a @ a)
a = jnp.ones((1200, 1200), dtype=jnp.float32)
f(a).block_until_ready()
with reference.xla_threads_held(1):
    inside = (max(threads()), reference.xla_threads(), os.environ.get("NTK_BENCH_XLA_THREADS"))
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(8):
        f(a).block_until_ready()
    ratio = (time.process_time() - cpu) / (time.perf_counter() - wall)
after = (sorted(os.sched_getaffinity(0)), max(threads()), os.environ.get("NTK_BENCH_XLA_THREADS"),
         reference.xla_threads())
print(repr((before, inside, ratio, after)))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity") or len(__import__("os").sched_getaffinity(0)) < 2,
                    reason="needs two cores to tell one from several")
def test_a_job_on_the_cpu_clock_holds_a_started_backend_and_leaves_the_process_as_found():
    """A job timed on the CPU clock in a process whose JAX backend already started on every core (the inline
    executor's, after computing the reference) is held to one core while it runs (its calls take no more CPU than
    wall time), and after it the process's cores and environment are as they were."""
    import ast
    import os

    env = {k: v for k, v in os.environ.items() if k != "NTK_BENCH_XLA_THREADS"}
    out = subprocess.run([sys.executable, "-c", _HELD_FOR_A_JOB], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, inside, ratio, after = ast.literal_eval(out.stdout.strip().splitlines()[-1])
    cores = sorted(os.sched_getaffinity(0))
    assert before == (cores, len(cores), None)
    assert inside == (1, 1, "1") and ratio < 1.1
    assert after == (cores, len(cores), None, len(cores))
