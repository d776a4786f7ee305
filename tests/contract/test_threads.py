"""Several threads computing the NTK of one model object: each call gets the kernel a single thread gets, and the
model is left as found (a call swaps parameters, wraps ``forward``, registers hooks while it runs: calls on one
model take turns, ``implementations.core.locking``). Every registered plugin, ours and the installed peers."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import ntk_bench
from ntk_bench import implementations
from ntk_bench.implementations.core.locking import model_claimed
from ntk_bench.implementations.core.state import _HOOK_DICTS

EVERY = implementations.names(origin=None)
THREADS, CALLS = 3, 20


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _snapshot(model: nn.Module):
    """What a call must leave as found: per module its instance attributes' names (a leftover ``forward``
    wrapper), hook dictionaries and flag; per parameter its object, value, grad and requires_grad."""
    modules = [(m, sorted(k for k in m.__dict__ if not k.startswith("_")),
                {h: dict(getattr(m, h, {}) or {}) for h in _HOOK_DICTS}, m.training) for m in model.modules()]
    params = [(name, p, p.detach().clone(), p.grad, p.requires_grad) for name, p in model.named_parameters()]
    return modules, params


def _assert_unchanged(model, before):
    modules, params = before
    for m, attrs, hooks, training in modules:
        assert "forward" not in m.__dict__, f"{type(m).__name__} keeps a forward wrapper"
        assert sorted(k for k in m.__dict__ if not k.startswith("_")) == attrs
        assert {h: dict(getattr(m, h, {}) or {}) for h in _HOOK_DICTS} == hooks, f"{type(m).__name__}'s hooks"
        assert m.training == training
    now = dict(model.named_parameters())
    for name, p, value, grad, requires_grad in params:
        assert now[name] is p and type(p) is nn.Parameter, name
        assert torch.equal(p.detach(), value) and p.grad is grad and p.requires_grad == requires_grad, name


@pytest.mark.parametrize("plugin_name", EVERY)
def test_threads_sharing_a_model_get_the_single_threaded_kernel(plugin_name):
    """3 threads x 20 calls on one model (wrong kernels without an error before: all-zero Jacobian contractions,
    4 of 60 NTK-vector products wrong, structured's forward wrappers left on the model)."""
    model, x = _tiny(), torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reason = implementations.get(plugin_name).supports(model)
    if reason is not None:
        pytest.skip(reason)
    expected = ntk_bench.ntk(model, x, impl=plugin_name)
    before = _snapshot(model)
    start = threading.Barrier(THREADS)
    wrong: list[str] = []

    def work():
        start.wait()
        for _ in range(CALLS):
            try:
                k = ntk_bench.ntk(model, x, impl=plugin_name)
            except Exception as exc:  # (collected: an exception in a thread would not fail the test)
                wrong.append(f"{type(exc).__name__}: {exc}")
                continue
            if not torch.allclose(k, expected, rtol=1e-10, atol=1e-12):
                wrong.append(f"max |dK| {float((k - expected).abs().max()):.3g}")

    threads = [threading.Thread(target=work) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, f"{len(wrong)} of {THREADS * CALLS} calls: {wrong[:3]}"
    _assert_unchanged(model, before)


def test_a_claim_is_reentrant_and_covers_shared_submodules():
    """A call inside a call of one thread goes through; a model sharing a submodule with a held one waits."""
    shared = nn.Linear(2, 2)
    a, b = nn.Sequential(shared, nn.Tanh()), nn.Sequential(nn.ReLU(), shared)
    entered = threading.Event()

    def claim_b():
        with model_claimed(b):
            entered.set()

    with model_claimed(a):
        with model_claimed(a):
            pass
        other = threading.Thread(target=claim_b)
        other.start()
        assert not entered.wait(0.2), "a model sharing a held submodule was claimed by a second thread"
    assert entered.wait(5), "the claim was not released"
    other.join()
    with model_claimed(b):  # (and nothing is left held)
        pass


PEERS = [n for n in implementations.names(origin="peer")
         if hasattr(implementations.get(n), "_setup")]  # (the peers whose prepared run calls into the model)


@pytest.mark.parametrize("plugin_name", PEERS)
def test_a_peers_prepared_run_waits_for_a_call_holding_the_model(plugin_name):
    """The runner times a peer's ``run`` after ``prepare``: it runs the library on the model, so it claims the
    model too, and waits while another thread's call holds it."""
    plugin = implementations.get(plugin_name)
    model, x = _tiny(), torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reason = plugin.supports(model)
    if reason is not None:
        pytest.skip(reason)
    run, to_torch = plugin.prepare(model, x)
    held, release, done = threading.Event(), threading.Event(), threading.Event()
    out = []

    def hold():
        with model_claimed(model):
            held.set()
            release.wait(10)

    def call():
        out.append(run())
        done.set()

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(5)
    caller = threading.Thread(target=call)
    caller.start()
    assert not done.wait(0.3), "the prepared run did not wait for the call holding the model"
    release.set()
    holder.join()
    assert done.wait(30)
    caller.join()
    assert torch.allclose(to_torch(out[0]), ntk_bench.ntk(model, x, impl=plugin_name), rtol=1e-10, atol=1e-12)


def test_threads_on_different_models_run_side_by_side():
    """One model per thread needs no turns, and the engine's shared caches hold up: 12 models with (N,) outputs
    (more than the engine keeps column wrappers for, so threads evict each other's), 4 threads."""
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    models = [nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).double() for _ in range(12)]
    expected = [ntk_bench.ntk(m, x, impl="jacobian_contraction") for m in models]
    start, wrong = threading.Barrier(4), []

    def work(mine):
        start.wait()
        for _ in range(10):
            for i in mine:
                try:
                    k = ntk_bench.ntk(models[i], x, impl="jacobian_contraction")
                except Exception as exc:  # (collected: an exception in a thread would not fail the test)
                    wrong.append(f"{type(exc).__name__}: {exc}")
                    continue
                if not torch.allclose(k, expected[i], rtol=1e-10, atol=1e-12):
                    wrong.append(f"model {i}: max |dK| {float((k - expected[i]).abs().max()):.3g}")

    threads = [threading.Thread(target=work, args=(range(t, 12, 4),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong, wrong[:3]
