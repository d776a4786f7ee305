"""Module walks: what the plugins read off a model's module tree (its modules and trainable parameters, what is
shared, hooked, parametrised or in place) and caches keyed by its architecture. Walks go through ``_modules`` /
``_parameters`` directly: these run on every call, and ``named_modules()``'s generators (a name string and a memo
set per module) would cost more than the work they feed."""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterator

import torch
from torch import nn


def submodules(module: nn.Module) -> list[nn.Module]:
    """The module and all its submodules (a shared one as often as it is reached)."""
    out = [module]
    for child in module._modules.values():
        if child is not None:
            out.extend(submodules(child))
    return out


def module_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its first qualified name ('' for the model itself); for messages."""
    names: dict[int, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        names.setdefault(id(m), name)
    return names


def describe(model: nn.Module, module: nn.Module) -> str:
    """'layer1.0.relu (ReLU)', or 'the model itself (MyNet)'."""
    name = module_names(model).get(id(module))
    return f"{name or 'the model itself'} ({type(module).__name__})"


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters the NTK differentiates: every parameter that requires grad (a shared one once)."""
    return {k: p for k, p in model.named_parameters() if p.requires_grad}


def has_trainable_parameters(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` or its submodules requires grad."""
    return any(p is not None and p.requires_grad for m in submodules(model) for p in m._parameters.values())


def shared_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable parameters reached through more than one (module, attribute): a module used under two
    names, or one tensor assigned to two modules (``b.weight = a.weight``). Each use adds to the Jacobian."""
    seen: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.requires_grad:
            seen.setdefault(id(p), []).append(name)
    return [" = ".join(names) for names in seen.values() if len(names) > 1]


def reused_modules(model: nn.Module) -> list[str]:
    """Modules with parameters reachable under more than one name (and so, usually, called more than once)."""
    seen: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if any(p is not None for p in m._parameters.values()):
            seen.setdefault(id(m), []).append(name)
    return [" = ".join(names) for names in seen.values() if len(names) > 1]


def hooked_modules(model: nn.Module) -> list[str]:
    """Modules with forward (pre-)hooks or backward hooks, and global module hooks: a method that reads layers off
    the module tree instead of running the forward would ignore what they do. Old-style ``spectral_norm`` /
    ``weight_norm`` are forward pre-hooks too."""
    from torch.nn.modules import module as module_mod

    found = []
    for name, m in model.named_modules():
        kinds = [k for k, hooks in (("forward", m._forward_hooks), ("forward pre", m._forward_pre_hooks),
                                    ("backward", m._backward_hooks),
                                    ("backward pre", getattr(m, "_backward_pre_hooks", {}))) if hooks]
        if kinds:
            found.append(f"{name or 'the model itself'} ({type(m).__name__}: {', '.join(kinds)} hooks)")
    for label, hooks in (("global forward", module_mod._global_forward_hooks),
                         ("global forward pre", module_mod._global_forward_pre_hooks),
                         ("global backward", module_mod._global_backward_hooks)):
        if hooks:
            found.append(f"{label} hooks")
    return found


def parametrized_modules(model: nn.Module) -> list[str]:
    """Modules whose parameters go through ``torch.nn.utils.parametrize`` (the new spectral_norm, weight_norm,
    orthogonal): their ``weight`` is computed from other parameters."""
    from torch.nn.utils import parametrize

    return [f"{name or 'the model itself'} ({type(m).__name__})" for name, m in model.named_modules()
            if parametrize.is_parametrized(m)]


def inplace_modules(model: nn.Module) -> list[str]:
    """Modules set to overwrite their input (``ReLU(inplace=True)``, torchvision's default)."""
    return [f"{name} ({type(m).__name__})" for name, m in model.named_modules() if getattr(m, "inplace", False) is True]


def _parameter_signature(module: nn.Module) -> tuple:
    """(shape, requires_grad) of every parameter."""
    return tuple((p.shape, p.requires_grad) for m in submodules(module) for p in m._parameters.values() if p is not None)


def shape_keyed_cache(store: "weakref.WeakKeyDictionary", model: nn.Module, key: tuple, make: Callable):
    """``make()`` cached per model (weakly) and per ``key`` plus the model's parameter shapes.

    For facts that depend on the architecture and input shapes, not on the weights.
    """
    per_model = store.setdefault(model, {})
    full_key = (_parameter_signature(model), *key)
    if full_key not in per_model:
        per_model[full_key] = make()
    return per_model[full_key]


def functional_single(model: nn.Module) -> tuple[dict[str, torch.Tensor], Callable]:
    """Detached trainable parameters and f(params, x_single) -> (O,) for torch.func."""
    params = {k: v.detach() for k, v in trainable_parameters(model).items()}

    def f(p, x):
        return torch.func.functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    return params, f


def structure_problem(model: nn.Module, plugin: str, what: str = "reads layers off the module tree") -> str | None:
    """Why a plugin that ``what`` cannot be sure of the model: forward hooks (they change what a module returns),
    parametrisations (a module's ``weight`` computed from other parameters) or parameters used more than once
    (their Jacobian is the sum over the uses); None when there is none of these."""
    for found, why in ((hooked_modules(model), "hooks can change what a module computes"),
                       (parametrized_modules(model), "its weight is computed from other parameters"),
                       (shared_parameters(model), "a parameter used more than once adds up its uses"),
                       (reused_modules(model), "a module used more than once adds up its uses")):
        if found:
            return f"{plugin}: {what} and cannot take {found[0]}: {why}"
    return None


@contextlib.contextmanager
def composite_attention() -> Iterator[None]:
    """Attention through composite ops that torch.func can differentiate in both modes: MultiheadAttention's
    fused fast path off and scaled_dot_product_attention on its math backend (the fused CPU and GPU kernels have
    no forward-mode derivative, and no vmap rule for a batch of one). Same function, other kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


_VMAP_FAILS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def per_sample(model: nn.Module, fn: Callable, x: torch.Tensor, *rest) -> torch.Tensor:
    """``vmap(fn)(x, *rest)`` over the samples of ``x``; where the model's forward cannot be vmapped (nn.LSTM and
    nn.GRU create their initial state from the batch size, which vmap hides), a loop over the samples, remembered
    per model and input shape. An error of the loop itself propagates."""
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    failed = _VMAP_FAILS.setdefault(model, set())
    if key not in failed:
        try:
            return torch.func.vmap(fn)(x, *rest)
        except (RuntimeError, NotImplementedError, ValueError) as exc:
            if "out of memory" in str(exc).lower():
                raise
            failed.add(key)
    from torch.utils import _pytree

    outs = [fn(x[i], *[r[i] for r in rest]) for i in range(x.shape[0])]
    leaves, spec = zip(*(_pytree.tree_flatten(o) for o in outs))
    return _pytree.tree_unflatten([torch.stack(col) for col in zip(*leaves)], spec[0])
