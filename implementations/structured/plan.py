"""The structured plugin's plan: which rule covers which parameter, found once per model structure and input shape.

Discovery (the first call for a model's structure, input shape, dtype and device) runs the model's real forward
twice, on the batch and on the batch plus one sample, with every module's ``forward`` wrapped, and reads off:

- which modules are called, how often, and the batch dimension of each of their tensor inputs and outputs (the
  dimension whose size follows the batch: N, then N + 1);
- which recorded tensors are changed in place later (``ReLU(inplace=True)``, ``out += identity``): those inputs
  are copied and those outputs cloned when recorded, so downstream in-place ops hit the copy;
- where each trainable parameter is used. A parameter whose owners are all modules the rule table
  (``table.rule_for``) gives a rule, each called on batched inputs in the layout its rule computes
  (``Rule.batched``), is covered by those layers, once per call. Any other parameter (a module without a rule,
  a raw ``nn.Parameter`` used in a parent's forward such as ViT's class token, a module never called through
  its forward such as MultiheadAttention's ``out_proj``, a parametrization's originals) goes to the generic
  rule of the nearest module above all its owners that is called on batched inputs: that module's per-sample
  vjp covers every use inside it.

Parameters of a generic module that it reads only as ``F.linear(x, weight, bias)`` on an input with a batch
dimension (MultiheadAttention's projections: ``rewrites.batchable`` computes self-attention by
``rewrites.projected_mha``, whose two projections are such calls; the plan then compares the model's output with
its own forward) become "linear ops": the Linear rule on each call's recorded input and output. The rest of a
generic module's parameters, when each is read only by single torch functions with one batched output, become
"taps".

A parameter covered more than once (a module called twice, one tensor in two modules) is "shared": its
per-use Jacobian blocks are summed before contracting, so the cross terms between uses are kept.

The plan is then checked against autograd on the discovery batch (``Structured._check``): for every parameter,
Σ_{n,o} R[n,o]·J[n,o] with the rules' per-sample Jacobians J and random weights R must equal autograd's gradient
of Σ_{n,o} R[n,o]·f[n,o]. A parameter that fails (used in a way no hook sees: a parameter read in a parent's
forward besides its module's call, a module called through ``forward`` of another) is moved to the generic rule
of the whole model and checked again; a parameter that still fails makes the model unsupported, naming it.

Recording (every call) touches only the planned modules, and removes what it adds. A layer with a rule has its
``forward`` wrapped (an instance attribute): the wrapper sees the input after forward pre-hooks and the layer's
own output before any forward hook, so hooks that change the output are autograd's business like any other op.
A generic module is recorded around its whole call (a forward pre-hook run first, a forward hook run last), and
its vjp runs the call again, hooks included: pre-hooks that compute a weight (old-style ``weight_norm``) count.
Version counters of everything kept are checked after the forward; a change not planned for re-records.

The plan is the only classifier of parameters: the cost model's view of the layers (``layer_costs``) is the plan
discovered on one sample, each entry's rule turning its calls into cost records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..core.base import UnsupportedModelError
from ..core.module_walks import submodules
from ..core.tolerances import tolerance
from . import rewrites, table
from .rules.base import CallShape, Rule, per_sample
from .rules.generic import GenericRule
from .rules.linear import LinearOpRule
from .rules.taps import TapRule


@dataclasses.dataclass
class Entry:
    """One planned module (or, for linear ops and taps, the torch function calls reading some of its parameters)
    and the rule that covers its parameters.

    ``module``: the module; ``name``: its name in the model, for messages; ``rule``: the rule instance
    (``Rule(module, slots)``); ``slots``: slot name -> the parameter it covers (names relative to the module; a
    linear op's are "weight" and "bias"); ``calls``: how many uses one forward makes. Per call: ``in_dims`` and
    ``out_dims``, per input and output leaf its batch dimension or None (a "forward"-level rule: one input and one
    output; a linear op or a tap: no input dims, its op's one output); ``shapes``: the call's input and output
    shapes per sample (``CallShape``), what the cost view reads. ``copy_in`` / ``clone_out``: a recorded input is
    copied, an output cloned, because the forward changes them in place later. ``ops``: linear ops and taps, per
    call, (the torch function, the slots it reads).
    """

    module: nn.Module
    name: str
    rule: Rule
    slots: dict
    calls: int
    in_dims: list
    out_dims: list
    copy_in: bool = False
    clone_out: bool = False
    ops: list = dataclasses.field(default_factory=list)
    shapes: list = dataclasses.field(default_factory=list)

    @property
    def kind(self) -> str:
        """The rule's name ("linear", "conv", "embedding", "norm", "linear_op", "tap", "generic", ...)."""
        return self.rule.name


@dataclasses.dataclass
class Plan:
    """Which rule covers which trainable parameter of a model, for inputs of one per-sample shape.

    ``entries``: in module order, each entry's calls in call order (what ``record`` returns uses in);
    ``shared``: ids of parameters covered by more than one use (their Jacobian blocks are summed before
    contracting); ``names``: id(parameter) -> its name in the model; ``validated``: the check against autograd
    passed; ``uncalled``: modules with parameters the discovery saw no call of (a call later means the forward
    took another path: plan again); ``direct_softmax``: the model calls softmax / scaled_dot_product_attention
    itself, ``attention``: it calls MultiheadAttention's function (which rewrites ``rewrites.batchable`` needs).
    """

    entries: list
    shared: set
    names: dict
    validated: bool = False
    uncalled: list = dataclasses.field(default_factory=list)
    direct_softmax: bool = True
    attention: bool = True


@dataclasses.dataclass
class Use:
    """One call of a planned entry on one side (what a rule's ``side`` reads).

    ``entry``, ``index``: the entry and which of its calls; ``leaves``, ``spec``: its inputs as pytree leaves
    (detached; copies where ``copy_in``) and treespec ("forward" level: ``leaves[0]`` the layer's input; "op"
    level: the op's argument leaves, parameters included); ``outs``: its output leaves (attached to the graph
    until the side is made); ``returned``: what it gave back to the model (a clone where ``clone_out``);
    ``func``, ``params``: "op" level, the torch function and which argument leaves are the parameters (slot ->
    leaf index); ``version``: ``returned``'s version counter when it was returned (a later in-place change
    means its G is not the identity).
    """

    entry: Entry
    index: int
    leaves: list
    spec: object
    outs: list
    returned: object
    func: object = None
    params: dict = dataclasses.field(default_factory=dict)
    version: int = 0


def _leaf_info(leaves):
    return [(tuple(v.shape), v.requires_grad) if isinstance(v, torch.Tensor) else None for v in leaves]


def _batch_dim(a, b, n):
    """The dimension whose size is n in shape ``a`` and n + 1 in shape ``b`` (all others equal); None if the
    shapes are equal; "mixed" when the shape changes otherwise (a batch merged with another dimension)."""
    if a == b:
        return None
    if len(a) != len(b):
        return "mixed"
    diff = [i for i, (p, q) in enumerate(zip(a, b)) if p != q]
    if len(diff) == 1 and a[diff[0]] == n and b[diff[0]] == n + 1:
        return diff[0]
    return "mixed"


class _Wrapped:
    """Replaces ``module.forward`` by ``wrapper`` until ``restore()`` (the module's own instance attribute, if it
    had one, is put back)."""

    def __init__(self, module, wrapper):
        self.module = module
        self.had = "forward" in module.__dict__
        self.before = module.__dict__.get("forward")
        module.__dict__["forward"] = wrapper

    def restore(self):
        if self.had:
            self.module.__dict__["forward"] = self.before
        else:
            self.module.__dict__.pop("forward", None)




class _Replan(Exception):
    """The recorded forward did not follow the plan: record again (``in_place``: with the copies now planned), or
    plan again (calls, batch sizes: the forward takes another path than the discovery saw)."""

    def __init__(self, reason, in_place=False):
        super().__init__(reason)
        self.in_place = in_place


def _tripwire(module, name):
    def hook(mod, args):
        raise _Replan(f"{name} has parameters and was called, but not when the plan was made")
    return hook


def _tensor_leaves(leaves):
    return [v for v in leaves if isinstance(v, torch.Tensor)]


class _Observer:
    """Discovery: every module's calls, at the forward level (rules) and the call level (generic), with their
    leaves' shapes and the in-place changes made to them after they were seen."""

    def __init__(self, modules):
        self.modules = modules
        self.fwd = {m: [] for m in modules}  # per call: (input leaf info, output leaf info)
        self.call = {m: [] for m in modules}
        self.watch = []  # (module, level, "in"/"out", tensor, version)
        self.undo = []
        self.order = []  # (module, its output leaves), in the order the forward calls finish
        self.returned = {m: [] for m in modules}  # per forward-level call: a weak reference to its first output

    def __enter__(self):
        for m in self.modules:
            self.undo.append(_Wrapped(m, self._forward(m, m.forward)))
            self.undo.append(m.register_forward_pre_hook(self._pre(m), prepend=True, with_kwargs=True))
            self.undo.append(m.register_forward_hook(self._post(m), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for u in reversed(self.undo):
            u.restore() if isinstance(u, _Wrapped) else u.remove()

    def _see(self, module, level, kind, leaves):
        for v in _tensor_leaves(leaves):
            self.watch.append((module, level, kind, v, v._version))

    def _forward(self, module, original):
        def forward(*args, **kwargs):
            leaves = pytree.tree_leaves((args, kwargs))
            self._see(module, "fwd", "in", leaves)
            out = original(*args, **kwargs)
            outs = pytree.tree_leaves(out)
            self.fwd[module].append((_leaf_info(leaves), _leaf_info(outs)))
            self.returned[module].append(weakref.ref(outs[0]) if outs and isinstance(outs[0], torch.Tensor) else None)
            self.order.append((module, [v.detach() if isinstance(v, torch.Tensor) else None for v in outs]))
            self._see(module, "fwd", "out", outs)
            return out
        return forward

    def _pre(self, module):
        def hook(mod, args, kwargs):
            leaves = pytree.tree_leaves((args, kwargs))
            self.call[module].append([_leaf_info(leaves), None])
            self._see(module, "call", "in", leaves)
        return hook

    def _post(self, module):
        def hook(mod, args, kwargs, out):
            outs = pytree.tree_leaves(out)
            open_calls = [c for c in self.call[module] if c[1] is None]
            open_calls[-1][1] = _leaf_info(outs)
            self._see(module, "call", "out", outs)
        return hook

    def changed(self):
        """{(module, level, "in"/"out")} whose tensors changed after they were seen."""
        return {(m, level, kind) for m, level, kind, v, version in self.watch if v._version != version}


def _mentions(args, kwargs, ids) -> bool:
    """Whether a parameter in ``ids`` is among the arguments (a quick look first: most ops take none)."""
    # (by id alone: the parameters in ``ids`` are alive, so no other object has their id; ``isinstance(v,
    # nn.Parameter)`` runs a Python metaclass check on every argument of every op)
    for v in args:
        if id(v) in ids:
            return True
        if isinstance(v, (list, tuple)) and any(id(u) in ids for u in v):
            return True
    return bool(kwargs) and any(isinstance(v, torch.Tensor) and id(v) in ids for v in pytree.tree_leaves(kwargs))


def _linear_args(func, args, kwargs):
    """(id of the weight, id of the bias or None) of ``F.linear(x, weight, bias)`` called positionally on a
    parameter weight and a non-parameter input; None for any other call."""
    if func is not F.linear or kwargs or len(args) < 2 or not isinstance(args[1], nn.Parameter) or \
            not isinstance(args[0], torch.Tensor) or isinstance(args[0], nn.Parameter):
        return None
    bias = args[2] if len(args) > 2 else None
    return id(args[1]), (id(bias) if isinstance(bias, torch.Tensor) else None)


class _ParamOps(TorchFunctionMode):
    """Discovery: every torch function called with a trainable parameter itself among its arguments: (function,
    ids of those parameters, output leaf info, ``_linear_args``); outputs watched for in-place changes."""

    def __init__(self, param_ids):
        super().__init__()
        self.param_ids, self.ops, self.watch = param_ids, [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not _mentions(args, kwargs, self.param_ids):
            return out
        hit = tuple(id(v) for v in pytree.tree_leaves((args, kwargs))
                    if isinstance(v, torch.Tensor) and id(v) in self.param_ids)
        outs = pytree.tree_leaves(out)
        if hit and any(isinstance(v, torch.Tensor) and v.requires_grad for v in outs):  # (else: no derivative)
            self.ops.append((func, hit, _leaf_info(outs), _linear_args(func, args, kwargs)))
            self.watch.extend((len(self.ops) - 1, v, v._version) for v in _tensor_leaves(outs))
        return out


def _observe(model, x, modules):
    """One forward of ``model`` on ``x`` observed: (the observer, the output, the in-place changes seen). The
    rewrites' mode is entered last, so that the parameter ops' mode sees the ``F.linear`` calls of the
    attention it rewrites; it counts what the model called (``direct_softmax``, ``attention``, ``projected``)."""
    param_ids = {id(p) for m in modules for p in m._parameters.values() if p is not None and p.requires_grad}
    ops = _ParamOps(param_ids)
    with _Observer(modules) as obs, torch.enable_grad(), ops, rewrites.batchable(direct=True, attention=True) as mode:
        y = model(x)
    changed = obs.changed() | {("op", i) for i, v, version in ops.watch if v._version != version}
    obs.watch, obs.ops = [], ops.ops
    obs.direct_softmax, obs.attention, obs.projected = mode.direct_hits > 0, mode.attention_calls > 0, mode.projected
    obs.is_output = {m: [r is not None and r() is y for r in refs] for m, refs in obs.returned.items()}
    obs.returned = None
    return obs, y, changed


def _dims(info_a, info_b, n):
    """Per leaf: its batch dimension, None (not a tensor, or the same shape at both batch sizes), "mixed"."""
    if len(info_a) != len(info_b):
        return None
    out = []
    for a, b in zip(info_a, info_b):
        if a is None or b is None:
            out.append(None if a is None and b is None else "mixed")
        else:
            out.append(_batch_dim(a[0], b[0], n))
    return out


def _same(a, b) -> bool:
    tol = tolerance(a.dtype, "repeat")
    return a.shape == b.shape and (not a.is_floating_point() or
                                   torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max() if a.numel() else 0)))


def _first_mixing(obs_a, obs_b, n, names) -> str:
    """The first module (in the order calls finish) whose output for the first N samples changed when one more
    sample was added: where samples first mix. The whole model when no module shows it."""
    for (m, outs_a), (_, outs_b) in zip(obs_a.order, obs_b.order):
        for a, b in zip(outs_a, outs_b):
            if a is None or b is None or a.dim() != b.dim():
                continue
            d = _batch_dim(tuple(a.shape), tuple(b.shape), n)
            if isinstance(d, int) and not _same(a, b.narrow(d, 0, n)):
                return f"{names[m]} ({type(m).__name__})"
    return "the model"


def structure_key(model: nn.Module) -> tuple:
    """What a plan depends on besides the input: modules, their parameters (identity, trainable), modes, hooks."""
    return tuple((id(m), type(m), m.training, len(m._forward_pre_hooks), len(m._forward_hooks),
                  tuple((k, id(p), p.requires_grad) for k, p in m._parameters.items() if p is not None))
                 for m in submodules(model))


def _rule_batched(rule, module, fwd_a, fwd_b, n):
    """The batch dimensions (input, output) of every forward-level call of a layer with a rule, or None where a call
    is not on a batch in the layout the rule computes (``Rule.batched``)."""
    dims = []
    for (ina, outa), (inb, outb) in zip(fwd_a, fwd_b):
        din, dout = _dims(ina[:1], inb[:1], n), _dims(outa, outb, n)
        if not din or len(dout) != 1 or not isinstance(din[0], int) or not isinstance(dout[0], int):
            return None
        if not rule.batched(module, din[0], dout[0], len(ina[0][0])):
            return None
        dims.append((din[0], dout[0]))
    return dims


def _generic_batched(call_a, call_b, n):
    """Per call (input dims, output dims) of a module's calls if each is on a batch (every tensor input batched or
    the same at both sizes, at least one batched, every output that needs a gradient batched), else None."""
    dims = []
    for (ina, outa), (inb, outb) in zip(call_a, call_b):
        if outa is None or outb is None:
            return None
        din, dout = _dims(ina, inb, n), _dims(outa, outb, n)
        if din is None or dout is None or "mixed" in din or not any(isinstance(d, int) for d in din):
            return None
        douts = []
        for info, d in zip(outa, dout):
            needs = info is not None and info[1]
            if needs and not isinstance(d, int):
                return None
            douts.append(d if needs else None)
        dims.append((din, douts))
    return dims


def discover(model: nn.Module, x: torch.Tensor, force_root: frozenset = frozenset()) -> Plan:
    """The plan for ``model`` on inputs shaped like ``x`` (see the module docstring); ``force_root``: ids of
    parameters to put in the generic rule of the whole model."""
    named = list(model.named_modules(remove_duplicate=True))
    modules = [m for _, m in named]
    names = {m: (k or f"the model ({type(m).__name__})") for k, m in named}
    parent = {}
    for _, m in named:
        for child in m._modules.values():
            if child is not None and child not in parent:
                parent[child] = m
    if any(isinstance(m, torch.jit.ScriptModule) for m in modules):
        bad = next(names[m] for m in modules if isinstance(m, torch.jit.ScriptModule))
        raise UnsupportedModelError(f"structured: {bad} is a TorchScript module; its calls cannot be recorded")
    n = x.shape[0]
    obs_a, y_a, changed = _observe(model, x, modules)
    obs_b, y_b, _ = _observe(model, torch.cat([x, x[:1]]), modules)
    if isinstance(y_a, torch.Tensor) and isinstance(y_b, torch.Tensor) and y_b.shape[1:] == y_a.shape[1:] and \
            not _same(y_a.detach(), y_b[:n].detach()):
        where = _first_mixing(obs_a, obs_b, n, names)
        raise UnsupportedModelError(f"structured: the output of {where} for a sample depends on the other samples "
                                    "of the batch or on randomness (one more sample changed it): the per-sample "
                                    "kernel is not defined (train-mode BatchNorm or Dropout? call model.eval())")
    if obs_a.projected and isinstance(y_a, torch.Tensor):  # (MultiheadAttention through projected_mha: as PyTorch's?)
        with torch.enable_grad():
            own = model(x)
        if not isinstance(own, torch.Tensor) or not _same(own.detach(), y_a.detach()):
            raise UnsupportedModelError("structured: the model's output with its MultiheadAttention computed as two "
                                        "Linears around the attention differs from its own forward")
    for m in modules:
        if len(obs_a.fwd[m]) != len(obs_b.fwd[m]) or len(obs_a.call[m]) != len(obs_b.call[m]):
            raise UnsupportedModelError(f"structured: {names[m]} is called a different number of times for a "
                                        "different batch size")

    owners, params = {}, {}
    for m in modules:
        for attr, p in m._parameters.items():
            if p is not None and p.requires_grad:
                owners.setdefault(id(p), []).append((m, attr))
                params[id(p)] = p
    pnames = {}
    for k, p in model.named_parameters(remove_duplicate=False):
        pnames.setdefault(id(p), k)

    kinds, rule_dims = {}, {}  # module -> its rule class, its calls' batch dimensions
    for m in modules:
        if not any(p is not None and p.requires_grad for p in m._parameters.values()):
            continue
        rule = table.rule_for(m)
        problem = rule.problem(m) if rule is not None else None
        if problem and obs_a.fwd[m]:
            raise UnsupportedModelError(f"structured: {names[m]}: {problem}")
        if rule is not None and obs_a.fwd[m]:
            dims = _rule_batched(rule, m, obs_a.fwd[m], obs_b.fwd[m], n)
            if dims is not None:
                kinds[m], rule_dims[m] = rule, dims

    call_dims = {}

    def generic_ok(m):
        if m not in call_dims:
            call_dims[m] = _generic_batched(obs_a.call[m], obs_b.call[m], n) if obs_a.call[m] else None
        return call_dims[m] is not None

    def ancestors(m):
        chain = [m]
        while chain[-1] in parent:
            chain.append(parent[chain[-1]])
        return chain

    hosts = {}  # generic module -> {id(p)}
    for pid, own in owners.items():
        if pid not in force_root and all(m in kinds for m, _ in own):
            continue
        if pid in force_root:
            host = model
        else:
            common = None
            for m, _ in own:
                chain = ancestors(m)
                common = chain if common is None else [a for a in common if a in chain]
            host = next((a for a in common if generic_ok(a)), None)
        if host is None or not generic_ok(host):
            raise UnsupportedModelError(
                f"structured: no module around {pnames[pid]} is called on a batch (cannot find the batch "
                "dimension of its inputs and outputs)")
        hosts.setdefault(host, set()).add(pid)
    for host in list(hosts):
        if host in kinds:  # a layer with a rule that also hosts others' parameters: all of it generic
            hosts[host] |= {id(p) for p in host._parameters.values() if p is not None and p.requires_grad}
            del kinds[host]
    covered = {pid for s in hosts.values() for pid in s}

    entries = []
    for m in modules:
        if m in kinds:
            slots = {a: p for a, p in m._parameters.items()
                     if p is not None and p.requires_grad and id(p) not in covered}
            if slots:
                dims = rule_dims[m]
                shapes = [CallShape(per_sample(ina[0][0], dx), per_sample(outa[0][0], dz), is_out)
                          for (ina, outa), (dx, dz), is_out in zip(obs_a.fwd[m], dims, obs_a.is_output[m])]
                entries.append(Entry(m, names[m], kinds[m](m, slots), slots, len(dims),
                                     [[d[0]] for d in dims], [[d[1]] for d in dims],
                                     copy_in=(m, "fwd", "in") in changed, clone_out=(m, "fwd", "out") in changed,
                                     shapes=shapes))
        if m in hosts:
            local = {}
            for k, p in m.named_parameters(remove_duplicate=False):
                if id(p) in hosts[m] and id(p) not in {id(q) for q in local.values()}:
                    local[k] = p
            dims = call_dims[m]
            entries.append(Entry(m, names[m], GenericRule(m, local), local, len(dims),
                                 [d[0] for d in dims], [d[1] for d in dims],
                                 copy_in=(m, "call", "in") in changed, clone_out=(m, "call", "out") in changed))
    entries = _taps(entries, obs_a, obs_b, n, changed, force_root)
    counts = {}
    for e in entries:
        for p in e.slots.values():
            counts[id(p)] = counts.get(id(p), 0) + e.calls
    uncalled = [m for m in modules if not obs_a.call[m] and not obs_a.fwd[m]
                and any(p is not None and p.requires_grad for p in m._parameters.values())]
    return Plan(entries, {pid for pid, c in counts.items() if c > 1}, pnames, uncalled=uncalled,
                direct_softmax=obs_a.direct_softmax or obs_b.direct_softmax,
                attention=obs_a.attention or obs_b.attention)


def _is_in_place(func) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")


def linear_ops(ops, pids):
    """{weight id: (bias id or None, [op indices])} for the parameters in ``pids`` that every op reading them reads
    as ``F.linear``'s weight (and its bias as that call's bias), each call reading no other parameter: Linears
    applied inside a module's forward (MultiheadAttention's projections through ``_projected_mha``, a user's
    ``F.linear(x, self.weight, self.bias)``)."""
    readers = {}
    for i, op in enumerate(ops):
        for pid in set(op[1]) & pids:
            readers.setdefault(pid, []).append(i)
    out = {}
    for w, idx in readers.items():
        lin = [ops[i][3] for i in idx]
        if any(a is None or a[0] != w for a in lin) or len({a[1] for a in lin}) != 1:
            continue
        b = lin[0][1] if lin[0][1] in pids else None
        if b is not None and sorted(readers[b]) != sorted(idx):
            continue
        if all(set(ops[i][1]) <= {w, b} for i in idx):
            out[w] = (b, idx)
    return out


def _taps(entries, obs_a, obs_b, n, changed, force_root=frozenset()):
    """Generic entries' parameters read only as ``F.linear``'s weight and bias on batched inputs (``linear_ops``)
    become "linear_op" entries, one per weight: the Linear rule on each call's input and output, in either order,
    instead of the module's vjp per sample. The rest of a generic entry's parameters, when each is read only by
    single ops giving one batched tensor (a class token's ``expand``, a positional embedding's ``+``, a scale's
    ``*``), become a "tap" entry: the rule takes those ops' outputs' gradients and each op's own per-sample vjp.
    Parameters in ``force_root`` (their plan failed the check once) stay with the generic rule."""
    if len(obs_a.ops) != len(obs_b.ops):
        return entries

    def batched(i):
        """The batch dimension of op i's one output, or None."""
        func, hit, info = obs_a.ops[i][:3]
        d = _dims(info, obs_b.ops[i][2], n)
        tensors = [k for k, v in enumerate(info) if v is not None and v[1]]
        if _is_in_place(func) or obs_b.ops[i][0] is not func or len(tensors) != 1 or len(info) != 1 or \
                not isinstance(d[0], int):
            return None
        return d[0]

    def shape(i, d):
        return CallShape((), per_sample(obs_a.ops[i][2][0][0], d))

    out = []
    for e in entries:
        if not isinstance(e.rule, GenericRule):
            out.append(e)
            continue
        by_id = {id(p): k for k, p in e.slots.items()}
        for w, (b, idx) in linear_ops(obs_a.ops, set(by_id) - set(force_root)).items():
            dims = [batched(i) for i in idx]
            if any(d is None or d >= len(obs_a.ops[i][2][0][0]) - 1 for d, i in zip(dims, idx)):
                continue
            slots = {"weight": e.slots[by_id.pop(w)]}
            if b is not None:
                slots["bias"] = e.slots[by_id.pop(b)]
            out.append(Entry(e.module, f"{e.name} (F.linear on {names_of(e, slots)})", LinearOpRule(e.module, slots),
                             slots, len(idx), [[d] for d in dims], [[d] for d in dims],
                             clone_out=any(("op", i) in changed for i in idx),
                             ops=[(F.linear, ("weight", "bias") if b is not None else ("weight",)) for _ in idx],
                             shapes=[shape(i, d) for i, d in zip(idx, dims)]))
        if not by_id:
            continue
        if len(by_id) < len(e.slots):
            rest = {k: e.slots[k] for k in by_id.values()}
            e = dataclasses.replace(e, slots=rest, rule=GenericRule(e.module, rest))
        pids = set(by_id)
        ops = [(i, op) for i, op in enumerate(obs_a.ops) if set(op[1]) & pids]
        dims = [batched(i) if set(op[1]) <= pids else None for i, op in ops]
        if not ops or None in dims or {pid for _, op in ops for pid in op[1]} != pids:
            out.append(e)
            continue
        clone = any(("op", i) in changed for i, _ in ops)
        out.append(Entry(e.module, e.name, TapRule(e.module, e.slots), e.slots, len(ops), [[] for _ in ops],
                         [[d] for d in dims], clone_out=clone,
                         ops=[(op[0], tuple(by_id[pid] for pid in op[1])) for _, op in ops],
                         shapes=[shape(i, d) for (i, _), d in zip(ops, dims)]))
    return out


def names_of(entry, slots):
    """The slots' parameters' names relative to the entry's module, for messages."""
    own = {id(p): k for k, p in entry.module.named_parameters(remove_duplicate=False)}
    return ", ".join(own.get(id(p), k) for k, p in slots.items())


def _clone_leaves(out):
    return pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) and v.requires_grad else v, out)


class _TapMode(TorchFunctionMode):
    """``record``'s mode for the plan's linear-op and tap entries: each call of a torch function on one of their
    parameters (``taps``: id(parameter) -> entry) is recorded as a use; ``state``, ``uses`` and ``watch`` are the
    recording's. Defined once (a class made per call costs more than many of the calls it records)."""

    def __init__(self, taps: dict, state: dict, uses: dict, watch: list):
        super().__init__()
        self.taps, self.state, self.uses, self.watch = taps, state, uses, watch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        taps = self.taps
        if not self.state["on"] or not _mentions(args, kwargs, taps) or \
                not any(isinstance(v, torch.Tensor) and v.requires_grad for v in pytree.tree_leaves(out)):
            return out
        leaves, spec = pytree.tree_flatten((args, kwargs))
        e = next((taps[id(v)] for v in leaves if isinstance(v, torch.Tensor) and id(v) in taps), None)
        if e is None:
            return out
        params = {k: i for i, v in enumerate(leaves) for k, p in e.slots.items() if v is p}
        kept = [(v.detach().clone() if e.copy_in and i not in params.values() else v.detach())
                if isinstance(v, torch.Tensor) else v for i, v in enumerate(leaves)]
        if not e.copy_in:
            self.watch.extend((e, "in", v, v._version) for v in _tensor_leaves(kept))
        returned = out.clone() if e.clone_out else out
        if not e.clone_out:
            self.watch.append((e, "out", out, out._version))
        uses = self.uses[id(e)]
        uses.append(Use(e, len(uses), kept, spec, [out], returned, func, params))
        return returned


def record(plan: Plan, model: nn.Module, x: torch.Tensor):
    """The model's forward with the planned modules recorded: (y, uses in order of the plan's entries, each
    entry's calls in order). Raises _Replan where the forward does not follow the plan."""
    n = x.shape[0]
    uses = {id(e): [] for e in plan.entries}
    watch, undo, state = [], [], {"on": True}

    def rule_forward(e, original):
        def forward(*args, **kwargs):
            if not state["on"]:
                return original(*args, **kwargs)
            xin = (args[0] if args else next(iter(kwargs.values()))).detach()
            if e.copy_in:
                xin = xin.clone()
            else:
                watch.append((e, "in", xin, xin._version))
            out = original(*args, **kwargs)
            returned = out.clone() if e.clone_out else out
            if not e.clone_out:
                watch.append((e, "out", out, out._version))
            uses[id(e)].append(Use(e, len(uses[id(e)]), [xin], None, [out], returned, version=returned._version))
            return returned
        return forward

    def generic_pre(e):
        def hook(mod, args, kwargs):
            if not state["on"]:
                return None
            leaves, spec = pytree.tree_flatten((args, kwargs))
            kept = [v.detach().clone() if e.copy_in else v.detach() if isinstance(v, torch.Tensor) else v
                    for v in leaves]
            if not e.copy_in:
                watch.extend((e, "in", v, v._version) for v in _tensor_leaves(kept))
            uses[id(e)].append(Use(e, len(uses[id(e)]), kept, spec, None, None))
            return None
        return hook

    def generic_post(e):
        def hook(mod, args, kwargs, out):
            if not state["on"]:
                return None
            use = next(u for u in reversed(uses[id(e)]) if u.outs is None)
            use.outs = pytree.tree_leaves(out)
            if e.clone_out:
                out = _clone_leaves(out)
            else:
                watch.extend((e, "out", v, v._version) for v in _tensor_leaves(use.outs))
            use.returned = out
            return out if e.clone_out else None
        return hook

    taps = {}
    for e in plan.entries:
        if e.rule.level == "op":
            for k, p in e.slots.items():
                taps[id(p)] = e

    mode = _TapMode(taps, state, uses, watch) if taps else contextlib.nullcontext()
    try:
        for m in plan.uncalled:
            undo.append(m.register_forward_pre_hook(_tripwire(m, type(m).__name__)))
        for e in plan.entries:
            if e.rule.level == "op":
                continue
            if e.rule.level == "call":
                undo.append(e.module.register_forward_pre_hook(generic_pre(e), prepend=True, with_kwargs=True))
                undo.append(e.module.register_forward_hook(generic_post(e), with_kwargs=True))
            else:
                undo.append(_Wrapped(e.module, rule_forward(e, e.module.forward)))
        with torch.enable_grad(), mode, rewrites.batchable():  # (the rewrites last: taps see their F.linear calls)
            y = model(x)
    finally:
        state["on"] = False
        for u in reversed(undo):
            u.restore() if isinstance(u, _Wrapped) else u.remove()
    for e, kind, v, version in watch:
        if v._version != version:  # changed in place after it was recorded: copy it from now on
            if kind == "out":
                e.clone_out = True
            else:
                e.copy_in = True
            raise _Replan(f"{e.name}: a recorded tensor was changed in place", in_place=True)
    out = []
    for e in plan.entries:
        got = uses[id(e)]
        if len(got) != e.calls:
            raise _Replan(f"{e.name} was called {len(got)} times, planned {e.calls}")
        for u in got:
            dims = e.in_dims[u.index]
            for v, d in zip(u.leaves, dims):
                if isinstance(d, int) and (not isinstance(v, torch.Tensor) or v.dim() <= d or v.shape[d] != n):
                    raise _Replan(f"{e.name}: an input's batch dimension does not have the batch's size")
            if e.rule.level == "call" and len(u.outs) != len(e.out_dims[u.index]):
                raise _Replan(f"{e.name}: its outputs changed")
            if e.rule.level == "op" and (u.func is not e.ops[u.index][0] or
                                    u.outs[0].shape[e.out_dims[u.index][0]] != n):
                raise _Replan(f"{e.name}: its parameters are read by other operations")
        out.extend(got)
    return y, out


def layer_costs(plan: Plan, flops_of) -> list:
    """The cost view of a plan (discovered on one sample): [(rule class, ``Layer``)], each entry's rule turning its
    calls into cost records (``Rule.layers``). ``flops_of(module)``: FLOPs of one forward of a module on one
    sample."""
    return [(type(e.rule), layer) for e in plan.entries for layer in e.rule.layers(e, flops_of)]
