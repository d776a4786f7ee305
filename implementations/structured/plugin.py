"""Structured: the NTK layer by layer from each layer's structure, never the whole model's Jacobian.

One forward pass records every planned layer's input X and output Z; one backward pass vmapped over the O output
basis vectors (torch.func.vmap over autograd.grad) gives G = ∂f_o/∂Z for all of them. Each layer then adds its
term by its rule (the catalogue: ``table.py``; the contract: ``rules/base.py``), and the plan (``plan.py``, made
once per model and input shape, and checked against autograd) says which rule covers which parameter.

Per use, the rule makes one side's data (``Rule.side``); two sides give the kernel: Gram-capable rules add their
term in the cheaper order (``Rule.costs``, ``Rule.add_gram``), the rest give Jacobian blocks, which are
contracted together, small ones concatenated into one GEMM; a parameter used more than once has its per-use
blocks summed first. The output Linear's G is the identity: no backward for it, its term (X1 X2ᵀ + 1) ⊗ I.

Costs: one forward and one O-wide backward per input batch (the first call for a model and input shape: two
forwards on N and N + 1 samples to plan, and a check: one forward and two plain backward passes), G and X per layer in memory, and the Jacobian-order
blocks. On the CPU, the first call for a conv net's shapes taking under 50 ms also runs it five times each with
oneDNN's convolutions and PyTorch's own, and keeps the faster. On a GPU, calls replay a captured CUDA graph
(cuda_graphs).
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import torch
from torch import nn

from ..core import onednn
from ..core.base import NTKPlugin, StaleFactors, UnsupportedModelError
from ..core.contractions import KernelSum, input_gram, kernel_shape
from ..core.module_walks import submodules
from ..core.tolerances import tolerance
from . import rewrites, table
from .plan import Plan, Use, _Replan, discover, layer_costs, record, structure_key
from .rules.base import Options
from .rules.generic import GenericRule

# CPU convolutions and Gram GEMMs: oneDNN's or PyTorch's own kernels (MKL's GEMM), whichever ran the kernel faster,
# per model and shapes (``onednn.is_faster``).
_BACKEND: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

# Jacobian-order blocks under this many numbers are concatenated (fewer, larger GEMMs); larger ones are contracted
# one at a time (no copy, and only one layer's concatenation alive).
_CONCAT_NUMEL = 1 << 17


class _StalePlan(Exception):
    """The forward on ``x`` did not follow the plan's calls."""

    def __init__(self, reason, x):
        super().__init__(reason)
        self.x = x


class _Shortcut:
    """The output Linear: its G is the identity, its term (X1 X2ᵀ + 1) ⊗ I (or, for one output, J = [X, 1])."""

    __slots__ = ("x", "bias", "o")

    def __init__(self, x, bias, o):
        self.x, self.bias, self.o = x, bias, o


BACKWARD_CHUNK_NUMEL, BACKWARD_CHUNK_FROM = 1 << 20, 1 << 18


def _output_grads(y2, targets, retain_graph=False):
    """∂(Σ_n y[n, o])/∂t for every target t and output o: (O, *t.shape) each (zeros where t does not reach y).

    One backward pass vmapped over the O basis vectors with torch.func.vmap, whose batching rules cover the
    backward ops of convolutions, norms, pooling and activations: ``is_grads_batched`` uses the older vmap,
    which runs most of those O times one by one (resnet18: every convolution_backward called O times).
    """
    if not targets:
        return []
    n, o = y2.shape
    if o == 1:
        got = torch.autograd.grad(y2, targets, grad_outputs=torch.ones_like(y2), allow_unused=True,
                                  materialize_grads=True, retain_graph=retain_graph)
        return [g.unsqueeze(0) for g in got]
    basis = torch.eye(o, dtype=y2.dtype, device=y2.device).unsqueeze(1).expand(o, n, o)
    # Where one output's largest gradient has BACKWARD_CHUNK_FROM numbers or more, the outputs go in chunks of
    # at most BACKWARD_CHUNK_NUMEL numbers: large convolution gradients ran faster in smaller batches, while
    # gradients of about 10^5 numbers per output lost to chunking (paired CPU-time measurements on the tutorial
    # CNN and resnet18).
    per_output = max(t.numel() for t in targets)
    fits = BACKWARD_CHUNK_NUMEL // max(per_output, 1) if per_output >= BACKWARD_CHUNK_FROM else o
    chunks = -(-o // max(1, min(o, fits)))
    chunk = -(-o // chunks)
    with rewrites.batchable(), warnings.catch_warnings():  # (ops without a batching rule run O times: slower, exact)
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return list(torch.func.vmap(lambda v: torch.autograd.grad(y2, targets, grad_outputs=v, allow_unused=True,
                                                                  materialize_grads=True,
                                                                  retain_graph=retain_graph or chunks > 1),
                                    chunk_size=chunk if chunks > 1 else None)(basis))


def _check_grads(y2, targets, params, dims):
    """The plan's check in two plain backward passes instead of an O-wide one: random weights A[n, o] on the
    outputs and B[n] on the samples. G_A = ∂(Σ_{n,o} A[n,o]·f[n,o])/∂Z for every target, each sample's slice of
    it then times B[n] along the target's own batch dimension ``dims`` (as the plan has it), one "output" wide;
    and autograd's gradient of Σ_{n,o} B[n]·A[n,o]·f[n,o] for every parameter. Where the plan is right (each
    use's batch dimension, no sample reaching another's output) the rules' Σ_n of per-sample Jacobians of G_A·B
    is that gradient; a missing or doubled use changes it, and so do a wrong batch dimension or mixed samples:
    B weighs a term by the sample of Z where autograd weighs it by the sample of the output."""
    gen = torch.Generator(device=y2.device).manual_seed(0)
    a = torch.rand(y2.shape, generator=gen, dtype=y2.dtype, device=y2.device) + 0.5
    b = torch.rand((y2.shape[0], 1), generator=gen, dtype=y2.dtype, device=y2.device) + 0.5
    grads = []
    if targets:
        got = torch.autograd.grad(y2, targets, grad_outputs=a, allow_unused=True, materialize_grads=True,
                                  retain_graph=True)
        grads = [_weighted(g.unsqueeze(0), b, d) for g, d in zip(got, dims)]
    pgrads = torch.autograd.grad(y2, params, grad_outputs=a * b, allow_unused=True, materialize_grads=True)
    return grads, pgrads


def _batch_dims(uses, wanted):
    """The batch dimension of every gradient target, in the order of the targets."""
    for u, idx in zip(uses, wanted):
        for j in idx or ():
            yield u.entry.out_dims[u.index][j]


def _weighted(g, weights, dim):
    """G (O, *Z.shape) times weights[n, o] along Z's batch dimension ``dim``."""
    w = weights.t().reshape((weights.shape[1],) + tuple(-1 if i == dim else 1 for i in range(g.dim() - 1)))
    return g * w


def _output_shortcut(plan: Plan, uses, y):
    """The use whose output is the model's own, a Linear on (N, K) with its weight (and bias) covered once."""
    for u in uses:
        e = u.entry
        if not e.rule.output_shortcut or u.returned is not y or y.dim() != 2 or e.in_dims[u.index][0] != 0 \
                or y._version != u.version:  # (changed in place after the layer: G is not the identity)
            continue
        bias = e.module.bias
        if "weight" not in e.slots or any(id(p) in plan.shared for p in e.slots.values()):
            return None
        if bias is not None and bias.requires_grad and "bias" not in e.slots:
            return None
        return u
    return None


def _add_to(acc: dict, key, value):
    acc[key] = value if key not in acc else acc[key] + value


def _contract(total: KernelSum, blocks, symmetric: bool):
    """Σ J1 J2ᵀ over the Jacobian-order blocks (N, O, P_i): small ones concatenated into one GEMM."""
    small1, small2 = [], []
    size = 0

    def flush():
        nonlocal size
        if small1:
            j1 = torch.cat(small1, 2) if len(small1) > 1 else small1[0]
            j2 = j1 if symmetric else (torch.cat(small2, 2) if len(small2) > 1 else small2[0])
            total.add_jacobians(j1, j2)
        small1.clear()
        small2.clear()
        size = 0

    for j1, j2 in blocks:
        j2 = j1 if symmetric else j2
        if j1.numel() >= _CONCAT_NUMEL:
            total.add_jacobians(j1, j2)
            continue
        small1.append(j1)
        small2.append(j2)
        size += j1.numel()
        if size >= _CONCAT_NUMEL:
            flush()
    flush()


# Dtypes whose rounding (8 and 11 significant bits) is the size of the errors the plan's check must catch.
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class Structured(NTKPlugin):
    """The structured plugin. ``order`` and ``embedding_sparse_below``: the switches of ``rules.base.Options``
    (tests and ablations make their own instance; the registry's has the defaults)."""

    name = "structured"
    capturable = True  # on a GPU, replayed from a CUDA graph (cuda_graphs)

    def __init__(self, order: str | None = None, embedding_sparse_below: float = Options.embedding_sparse_below):
        self.options = Options(order, embedding_sparse_below)
        self._plans: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

    def supports(self, model):
        # Per call, so a direct walk (named_modules' generators cost tens of us); names only for the message.
        # What only the forward shows (batch dimensions, how parameters are used) is checked in compute.
        for m in submodules(model):
            problem = None
            if isinstance(m, torch.jit.ScriptModule):
                problem = "is a TorchScript module; its calls cannot be recorded"
            elif m._parameters and any(p is not None and p.requires_grad for p in m._parameters.values()):
                problem = table.problem(m)
            if problem:
                name = next(name for name, mod in model.named_modules(remove_duplicate=False) if mod is m)
                return f"structured: {name or 'the model itself'}: {problem}"
            if m._parameters:
                low = next((p.dtype for p in m._parameters.values() if p is not None and p.requires_grad
                            and p.dtype in _LOW_PRECISION), None)
                if low is not None:
                    return (f"structured: its parameters are {low}: the check of its per-layer rules against "
                            "autograd cannot separate a wrong rule from rounding at that precision; use float32 "
                            "or float64")
        return None

    def estimate(self, stats, n, m, mode, symmetric):
        """Forward + O-wide backward per side, then per layer its rule's cost (``Rule.estimate``, on the layers of
        ``cost_view(stats)``); besides the FLOPs, the numbers the forward's operators write, (1 + 2·O) times per
        sample, and the operators' count (``Estimate.traffic``, ``Estimate.ops``). Peak: G and the inputs of every
        layer, the largest Gram intermediate, the Jacobian blocks, the kernel."""
        from ..core.costs import Estimate, kernel_numel

        view = self.cost_view(stats)
        own = view.stats  # (the forward as structured runs it: attention rewritten where the model has any)
        o = stats.o
        side = n if symmetric else n + m
        flops = side * (own.fp_flops + 2 * o * own.fp_flops)
        gram_held, jac_held, patches, widths = 0, 0, 0, 0
        for rule, layer in view.layers:
            cost = rule.estimate(layer, n, m, o, mode, symmetric)
            flops += cost.flops
            gram_held = max(gram_held, cost.gram_held)
            jac_held += cost.jac_held
            patches = max(patches, cost.patches)
            widths += cost.g_numbers
        inter = max(gram_held, 2 * jac_held)  # (the layers' J and their concatenation)
        peak = side * (o * widths + own.activations + patches) * stats.itemsize
        # The forward's memory-bound operators (norms, activations, depthwise convs, pooling) run again in the
        # O-wide backward of every sample, and each operator costs its dispatches whatever its size.
        traffic = side * (1 + 2 * o) * own.traffic
        return Estimate(flops, peak + (inter + 2 * kernel_numel(n, m, o, mode)) * stats.itemsize, traffic, own.ops)

    def layers(self, stats) -> list:
        """[(rule class, ``costs.Layer``)]: ``cost_view(stats).layers``."""
        return self.cost_view(stats).layers

    @staticmethod
    def cost_view(stats) -> "CostView":
        """How structured sees the model ``stats`` were measured on, read once per stats (``CostStats.view``):
        its layers, from the plan discovered on their one sample (``plan.layer_costs``), and the stats of the
        forward with the attention rewrites the plan needs (the stats themselves where it needs none). Where the
        plan cannot be made (the model declines, or the stats outlived their model): the whole model as one generic
        layer, the cost of its per-sample vjp."""
        from ..core.costs import Layer, measure

        def read(model, x_single):
            if model is not None:
                names = {mod: k for k, mod in model.named_modules()}
                try:
                    plan = discover(model, x_single)
                    own = stats
                    if plan.direct_softmax or plan.attention:
                        with rewrites.needed(plan.direct_softmax, plan.attention):
                            own = measure(model, x_single, rewrites.batchable)

                    def flops_of(module):
                        return own.module_flops.get(names.get(module), 0) or own.fp_flops

                    return CostView(layer_costs(plan, flops_of), own)
                except (UnsupportedModelError, RuntimeError, ValueError, TypeError):
                    pass
            return CostView([(GenericRule, Layer("generic", 1, stats.p, 1, False, p=stats.p, flops=stats.fp_flops))],
                            stats)

        return stats.view(f"structured, table {table.version()}", read)

    # -- the plan ----------------------------------------------------------------------------------------------

    def plan(self, model, x, again: bool = False) -> Plan:
        """The plan for ``model`` on inputs shaped like ``x`` (made and checked on the first call; ``again``: made
        anew on this batch)."""
        key = (structure_key(model), tuple(x.shape[1:]), x.dtype, x.device, table.version())
        per_model = self._plans.setdefault(model, {})
        if again:
            per_model.pop(key, None)
        if key not in per_model:
            if len(per_model) >= 8:  # (a model whose structure keeps changing: drop the oldest)
                per_model.pop(next(iter(per_model)))
            per_model[key] = self._checked_plan(model, x)
        return per_model[key]

    def _checked_plan(self, model, x) -> Plan:
        """discover(), then the per-sample Jacobians summed over the batch against autograd's gradients; the
        parameters that disagree go to the generic rule of the whole model, once."""
        force = frozenset()
        for attempt in range(2):
            plan = discover(model, x, force)
            with rewrites.needed(plan.direct_softmax, plan.attention):
                bad = self._check(plan, model, x)
            if not bad:
                plan.validated = True
                return plan
            force = force | {id(p) for p in bad}
        names = ", ".join(plan.names.get(id(p), "?") for p in bad)
        raise UnsupportedModelError(f"structured: the per-layer Jacobians of {names} do not add up to autograd's "
                                    "gradient (a use of the parameter no module call shows)")

    def _check(self, plan, model, x):
        """Trainable parameters for which Σ_{n,o} B[n]·A[n,o]·J[n,o], with the rules' per-sample Jacobians J and
        random weights A, B (``_check_grads``), differs from autograd's gradient of Σ_{n,o} B[n]·A[n,o]·f[n,o] on
        this batch (a missing or doubled use, a wrong batch dimension or sample mixing changes the weighted sum)."""
        params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
        items, uses, o, grads = self._side(plan, model, x, params=params)
        sums = {}
        with torch.no_grad():
            for u, item in zip(uses, items):
                if item is not None:
                    for k, v in u.entry.rule.checked_summed(item, u.entry.slots, o).items():
                        _add_to(sums, id(u.entry.slots[k]), v.reshape(o, -1).sum(0))
        tol = tolerance(params[0].dtype, "gradient_sum")
        # (a parameter whose true derivative is 0, a conv bias before an InstanceNorm, is rounding noise on both
        # sides: compared against a thousandth of the whole gradient)
        floor = 1e-3 * float(torch.stack([(g.to_dense() if g.is_sparse else g).norm() for g in grads]).norm())
        bad = []
        for p, g in zip(params, grads):
            ref = (g.to_dense() if g.is_sparse else g).reshape(-1)  # (an Embedding with sparse=True)
            ours = sums.get(id(p), torch.zeros_like(ref))
            scale = max(float(ref.norm()), float(ours.norm()), floor)
            if float((ours - ref).norm()) > tol * scale:
                bad.append(p)
        return bad

    # -- one side: record, backward, per-use rule data ----------------------------------------------------------

    def _record(self, plan, model, x):
        for _ in range(1 + 2 * len(plan.entries)):
            try:
                return record(plan, model, x)
            except _Replan as exc:
                if not exc.in_place:
                    raise _StalePlan(str(exc), x) from None
        raise UnsupportedModelError("structured: the model keeps changing recorded tensors in place")

    def _side(self, plan, model, x, params=None):
        """(rule data per use, the uses, O, [parameter gradients when ``params``])."""
        y, uses = self._record(plan, model, x)
        if not isinstance(y, torch.Tensor) or y.dim() not in (1, 2):
            raise ValueError("model output must have shape (N, O) or (N,)")
        y2 = y.unsqueeze(1) if y.dim() == 1 else y
        o = y2.shape[1]
        shortcut = None if params is not None else _output_shortcut(plan, uses, y)
        wanted = [None if u is shortcut else u.entry.rule.targets(u) for u in uses]
        targets = [u.outs[j] for u, idx in zip(uses, wanted) for j in idx or ()]
        pgrads = []
        if params is None:
            grads = _output_grads(y2, targets)
        else:
            grads, pgrads = _check_grads(y2, targets, params, list(_batch_dims(uses, wanted)))
            o = 1
        it = iter(grads)
        items, n = [], y2.shape[0]
        for u, idx in zip(uses, wanted):
            if idx is None:
                items.append(_Shortcut(u.leaves[0], "bias" in u.entry.slots, o))
                continue
            gs = [next(it) for _ in idx]
            if not gs or all(g is None for g in gs):
                items.append(None)
                continue
            items.append(u.entry.rule.checked_side(u, gs, n, o, checking=params is not None))
        for u in uses:  # (the recorded outputs hold the forward's graph: let it go)
            u.outs = u.returned = None
        return items, uses, o, pgrads

    # -- one block's factors, reused across the tiles of a dataset's kernel ----------------------------------------

    def factors(self, model, x) -> "Factors":
        """The per-layer data of one block of inputs (each rule's side: layer inputs and output gradients, or
        Jacobian blocks), which ``contract`` combines with another block's into their kernel. A dataset's kernel
        computes each block's factors once and contracts them against every other block's, instead of recording
        both sides of every tile (the forward and O-wide backward are linear in N, only the contraction is
        quadratic). Raises ``StaleFactors`` when this block's forward takes another path than the plan's."""
        plan = self.plan(model, x)
        with rewrites.needed(plan.direct_softmax, plan.attention):
            try:
                items, uses, o, _ = self._side(plan, model, x)
            except _StalePlan as exc:
                raise StaleFactors(str(exc)) from None
        p = next(p for p in model.parameters() if p.requires_grad)
        return Factors(plan, uses, items, o, x.shape[0], p.dtype, p.device)

    def factors_state(self, f: "Factors") -> dict:
        """What of ``f`` is kept on disk (``torch.save``): the rules' data and, per use, which entry and call of the
        plan it is (the plan and its modules are this process's, made again where the state is read back)."""
        index = {id(e): k for k, e in enumerate(f.plan.entries)}
        return {"items": f.items, "uses": [(index[id(u.entry)], u.index) for u in f.uses], "o": f.o, "n": f.n,
                "dtype": f.dtype, "plan": _plan_signature(f.plan)}

    def factors_from_state(self, model, x, state: dict) -> "Factors":
        """The factors ``factors_state`` kept, of the block ``x``, against this process's plan for ``model``. Raises
        ``StaleFactors`` when that plan is not the one they were recorded with (then record them again)."""
        plan = self.plan(model, x)
        if state.get("plan") != _plan_signature(plan) or state.get("n") != x.shape[0]:
            raise StaleFactors("the kept factors were recorded with another plan or block")
        uses = [Use(plan.entries[k], index, [], None, [], None) for k, index in state["uses"]]
        p = next(p for p in model.parameters() if p.requires_grad)
        if state["dtype"] != p.dtype:
            raise StaleFactors(f"the kept factors are {state['dtype']}, the model {p.dtype}")
        return Factors(plan, uses, state["items"], state["o"], state["n"], p.dtype, p.device)

    def contract(self, f1: "Factors", f2: "Factors | None", mode: str) -> torch.Tensor:
        """Θ of two blocks from their factors (``f2=None``: the block against itself, its symmetric path)."""
        if f2 is not None and f2.plan is not f1.plan:
            raise StaleFactors("the two blocks were recorded with different plans")
        total = _assemble(f1.plan, f1.uses, f1.items, f1.items if f2 is None else f2.items, mode, f2 is None,
                          self.options, f1.o)
        m = f1.n if f2 is None else f2.n
        if total.acc is None and total.identity is None:
            return torch.zeros(kernel_shape(f1.n, m, f1.o, mode), dtype=f1.dtype, device=f1.device)
        return total.result().detach()

    # -- the kernel ----------------------------------------------------------------------------------------------

    def _kernel(self, model, x1, x2, mode):
        if not onednn.usable(x1):  # (no float64 in oneDNN)
            return self._layer_sum(model, x1, x2, mode)
        key = (tuple(x1.shape), None if x2 is None else tuple(x2.shape), x1.dtype, mode)
        return onednn.on_faster_backend(_BACKEND, model, key, lambda: self._layer_sum(model, x1, x2, mode),
                                        prepare=lambda: self.plan(model, x1))

    def _layer_sum(self, model, x1, x2, mode):
        if x2 is not None and x2.shape[1:] != x1.shape[1:]:
            raise ValueError("x1 and x2 have different per-sample shapes")
        plan = self.plan(model, x1)
        with rewrites.needed(plan.direct_softmax, plan.attention):
            return self._planned_sum(plan, model, x1, x2, mode)

    def _planned_sum(self, plan, model, x1, x2, mode):
        try:
            items1, uses, o, _ = self._side(plan, model, x1)
            items2 = items1 if x2 is None else self._side(plan, model, x2)[0]
        except _StalePlan as stale:  # the forward took another path (the batch size decides one): plan on it, once
            plan = self.plan(model, stale.x, again=True)
            try:
                items1, uses, o, _ = self._side(plan, model, x1)
                items2 = items1 if x2 is None else self._side(plan, model, x2)[0]
            except _StalePlan as exc:
                raise UnsupportedModelError(f"structured: the model's forward takes different paths for different "
                                            f"batches ({exc}); no one plan covers both") from None
        total = _assemble(plan, uses, items1, items2, mode, x2 is None, self.options, o)
        if total.acc is None and total.identity is None:  # no parameter reaches the output
            m = x1.shape[0] if x2 is None else x2.shape[0]
            dtype = next(p for p in model.parameters() if p.requires_grad).dtype
            return torch.zeros(kernel_shape(x1.shape[0], m, o, mode), dtype=dtype, device=x1.device)
        return total.result().detach()


@dataclasses.dataclass(frozen=True)
class CostView:
    """What ``Structured.estimate`` reads of a model: ``layers``, [(rule class, ``costs.Layer``)] per planned call
    (or entry), and ``stats``, the model's stats with its forward as structured runs it."""

    layers: list
    stats: object


def _plan_signature(plan: Plan) -> list:
    """What identifies a plan across processes: per entry its module's name, its rule, slots and calls."""
    return [(e.name, e.rule.name, sorted(e.slots), e.calls) for e in plan.entries] + [len(plan.shared)]


@dataclasses.dataclass
class Factors:
    """One block's factors (``Structured.factors``): the plan they were recorded with, its uses, each use's rule
    data (None where no gradient reaches it), O and the block's N."""

    plan: Plan
    uses: list
    items: list
    o: int
    n: int
    dtype: torch.dtype
    device: torch.device

    def nbytes(self) -> int:
        """The bytes of the tensors the factors hold (what keeping them for later tiles costs); modules and
        parameters they refer to are the model's, not counted."""
        seen, storages, total, stack = set(), set(), 0, [(item, 0) for item in self.items]
        while stack:
            obj, depth = stack.pop()
            if obj is None or id(obj) in seen or depth > 4 or isinstance(obj, (nn.Module, nn.Parameter)):
                continue
            seen.add(id(obj))
            if isinstance(obj, torch.Tensor):
                # the storage a tensor keeps alive (a view of a larger buffer holds all of it), each once
                try:
                    storage = obj.untyped_storage()
                    if storage.data_ptr() not in storages:
                        storages.add(storage.data_ptr())
                        total += storage.nbytes()
                except (RuntimeError, NotImplementedError):
                    total += obj.numel() * obj.element_size()
            elif isinstance(obj, (list, tuple)):
                stack.extend((v, depth + 1) for v in obj)
            elif isinstance(obj, dict):
                stack.extend((v, depth + 1) for v in obj.values())
            elif hasattr(obj, "__dict__"):
                stack.extend((v, depth + 1) for v in vars(obj).values())
            # the rules' sides (PatchSide, _Shortcut, ...) keep their tensors in slots, not in a __dict__
            for name in getattr(type(obj), "__slots__", ()):
                stack.append((getattr(obj, name, None), depth + 1))
        return total


def _assemble(plan: Plan, uses, items1, items2, mode: str, symmetric: bool, options: Options, o: int) -> KernelSum:
    """Σ over uses of each rule's term (O outputs): Gram order or Jacobian blocks; shared parameters' blocks summed
    first."""
    total = KernelSum(mode)
    blocks, shared1, shared2 = [], {}, {}
    for u, a, b in zip(uses, items1, items2):
        if a is None or b is None:
            continue
        e = u.entry
        if isinstance(a, _Shortcut):
            if a.o == 1:  # J = [X, 1]
                ja = [a.x.unsqueeze(1)] + ([a.x.new_ones(a.x.shape[0], 1, 1)] if a.bias else [])
                jb = ja if symmetric else [b.x.unsqueeze(1)] + ([b.x.new_ones(b.x.shape[0], 1, 1)] if b.bias else [])
                blocks.extend(zip(ja, jb))
            else:
                total.add_identity_gram(input_gram(a.x, b.x, a.bias), a.o)
            continue
        rule = e.rule
        own = {k: p for k, p in e.slots.items() if id(p) not in plan.shared}
        shared = {k: p for k, p in e.slots.items() if id(p) in plan.shared}
        if shared:
            for k, j in rule.checked_jacobians(a, shared, a.n, o).items():
                _add_to(shared1, id(shared[k]), j)
            if not symmetric:
                for k, j in rule.checked_jacobians(b, shared, b.n, o).items():
                    _add_to(shared2, id(shared[k]), j)
        if not own:
            continue
        if rule.gram_capable and "weight" in own and options.order != "jacobian":
            gram, jac = rule.costs(a, b, mode, symmetric)
            if options.order == "gram" or gram <= jac:
                blocks.extend(rule.add_gram(total, a, b, symmetric, "bias" in own, options))
                continue
        ja = rule.checked_jacobians(a, own, a.n, o)
        jb = ja if symmetric else rule.checked_jacobians(b, own, b.n, o)
        blocks.extend((ja[k], jb[k]) for k in ja)
    blocks.extend((shared1[k], None if symmetric else shared2[k]) for k in shared1)
    _contract(total, blocks, symmetric)
    return total


plugin = Structured()
