"""Translate a torch model into a JAX function with the same weights, op by op over its core-ATen graph.

``torch.export.export`` with a dynamic batch dimension, then ``run_decompositions()``, gives a graph of about
fifty distinct core-ATen ops for the model zoo (convolution, addmm, native norms, embedding, softmax, views,
elementwise ops; LSTM and GRU unrolled into them). Each op has one JAX rule (``aten_rules.RULES``); an op
without one makes :class:`UnsupportedOpError` name every missing op of the graph at once.

Parameters are laid out as neural-tangents' structured derivatives want them, which does not change the
kernel (a fixed permutation of θ): a 2-D weight that the graph only ever transposes (a Linear's, consumed as
``addmm(b, x, permute(W, [1, 0]))``) is stored transposed, (in, out), so the layer is ``x @ W``, a
``dot_general`` whose structure neural-tangents recognises; and ``bmm`` of an activation with a weight
broadcast over a batch (how torch decomposes a Linear on 3-D input, as in LSTMs and attention) becomes one
``matmul`` of the activation with the 2-D weight. Convolution kernels keep torch's OIHW layout, which
neural-tangents handles as fast as stax's HWIO (``scripts/nt_fairness.py``). Buffers and frozen parameters become
constants; the trainable parameters are the JAX parameters, keyed by torch's names (a shared parameter once).
"""

from __future__ import annotations

import dataclasses
import warnings
import weakref

import numpy as np
import torch
from torch import nn


class UnsupportedOpError(NotImplementedError):
    """The model cannot be translated: its export failed, ops of its graph have no rule, or a check failed."""


def op_name(target) -> str:
    """The rule-table name of a graph node's target: ``aten.addmm.default``, ``operator.getitem``."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or str(target)
    if module in ("_operator", "operator"):
        module = "operator"
    return f"{module}.{name}" if module else name


def _first_lines(exc: BaseException, limit: int = 600) -> str:
    text = " ".join(str(exc).strip().split("\n")[:6]).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


STOP_GRADIENT = "ntk_bench_reference.stop_gradient.default"  # the rule-table name of the marker below


def _stop_gradient_op():
    """An identity op torch's decompositions keep as it is, marking where the forward cuts the gradient.

    ``run_decompositions()`` inlines ``wrap_with_set_grad_enabled(False, ...)`` (a ``with torch.no_grad():``
    block) into plain ops and turns ``aten.detach`` into ``aten.alias``, so after it nothing says where torch's
    autograd stops. The marker is put on those places before decomposing, and translated as
    ``lax.stop_gradient``.
    """
    namespace = torch.ops.ntk_bench_reference
    if not hasattr(namespace, "stop_gradient"):
        @torch.library.custom_op("ntk_bench_reference::stop_gradient", mutates_args=())
        def stop_gradient(x: torch.Tensor) -> torch.Tensor:
            return x.clone()  # (a custom op's output may not alias its input)

        @stop_gradient.register_fake
        def _(x):
            return torch.empty_like(x)
    return torch.ops.ntk_bench_reference.stop_gradient.default


def _mark_gradient_stops(program) -> int:
    """Put the stop-gradient marker on every output of a grad-disabled region and on every ``detach`` of the
    exported (not yet decomposed) graph, its nested graphs included. A region that turns gradients back on
    inside a disabled one is refused: what it differentiates depends on the nesting, which inlining loses."""
    from torch._higher_order_ops.wrap import wrap_with_set_grad_enabled

    marker = _stop_gradient_op()
    count = 0
    modules = [m for m in program.graph_module.modules() if isinstance(m, torch.fx.GraphModule)]
    for gm in modules:
        graph, changed = gm.graph, False
        for node in list(graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is wrap_with_set_grad_enabled and not node.args[0]:
                region = getattr(gm, node.args[1].target)
                if any(n.op == "call_function" and n.target is wrap_with_set_grad_enabled and n.args[0]
                       for m in region.modules() if isinstance(m, torch.fx.GraphModule) for n in m.graph.nodes):
                    raise UnsupportedOpError("a torch.enable_grad() block inside a torch.no_grad() block: its "
                                             "gradient stops are not translated")
                outputs = [u for u in node.users]  # getitem nodes picking the region's outputs
            elif node.target is torch.ops.aten.detach.default:
                outputs = [node]
            else:
                continue
            for out in outputs:
                with graph.inserting_after(out):
                    stop = graph.call_function(marker, (out,))
                stop.meta.update(out.meta)
                out.replace_all_uses_with(stop, delete_user_cb=lambda user, stop=stop: user is not stop)
                count += 1
                changed = True
        if changed:
            gm.recompile()
    return count


def _export(model: nn.Module, example: torch.Tensor, dynamic: bool):
    """The exported program, gradient stops marked, decomposed to core ATen; UnsupportedOpError naming the
    step that failed."""
    from torch.export import Dim, export

    name = type(model).__name__
    how = "with a dynamic batch dimension" if dynamic else f"with a fixed batch of {example.shape[0]}"
    try:
        program = export(model, (example,), dynamic_shapes=({0: Dim("batch", min=1)},) if dynamic else None)
    except Exception as exc:  # torch.export raises many types (UserError, ConstraintViolation, Unsupported ...)
        raise UnsupportedOpError(f"torch.export cannot export {name} {how}: "
                                 f"{type(exc).__name__}: {_first_lines(exc)}") from exc
    try:
        _mark_gradient_stops(program)
    except UnsupportedOpError as exc:
        raise UnsupportedOpError(f"{name}: {exc}") from exc
    try:
        return program.run_decompositions()
    except Exception as exc:
        raise UnsupportedOpError(f"{name}: decomposing the exported graph ({how}) to core ATen failed: "
                                 f"{type(exc).__name__}: {_first_lines(exc)}") from exc


def export_model(model: nn.Module, example: torch.Tensor):
    """``(program, per_sample)``: ``torch.export`` with a dynamic batch dimension, decomposed to core ATen, with a
    stop-gradient marker (:data:`STOP_GRADIENT`) where the forward cuts the gradient (``torch.no_grad()`` blocks,
    ``detach``).

    Where that fails, the model is exported for one sample (a fixed batch of 1) and ``per_sample`` is True:
    neural-tangents evaluates the function one sample at a time anyway, and a batch is then that program
    vmapped. Some graphs only decompose with a concrete batch: transformers' ``Conv1D`` (GPT-2) reshapes a
    transposed (batch, seq, features) view, and with a symbolic batch torch cannot prove the view valid ("Cannot
    view a tensor with shape [s, 8, 32] and strides (32, 32*s, 1)"). The forward check still compares the
    per-sample translation with torch's batched forward, so a model mixing the samples of a batch is refused.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 1:
        raise ValueError(f"example must be a batched torch.Tensor, got {type(example).__name__}")
    dynamic_example = example if example.shape[0] >= 2 else torch.cat([example, example])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:  # (export specialises a size-1 dimension; any size >= 2 stays symbolic)
            return _export(model, dynamic_example, dynamic=True), False
        except UnsupportedOpError as dynamic_failure:
            try:
                return _export(model, example[:1], dynamic=False), True
            except UnsupportedOpError as static_failure:
                if all(str(f).startswith("torch.export cannot") for f in (static_failure, dynamic_failure)):
                    raise dynamic_failure from None  # (export itself failed both ways: one reason is enough)
                raise UnsupportedOpError(f"{dynamic_failure}; for one sample: {static_failure}") from None


def _is_transpose_2d(node) -> bool:
    if node.op != "call_function":
        return False
    name = op_name(node.target)
    if name == "aten.permute.default":
        return list(node.args[1]) == [1, 0]
    if name == "aten.t.default":
        return True
    if name == "aten.transpose.int":
        return sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    return False


def _val(node):
    return node.meta.get("val") if hasattr(node, "meta") else None


def _same_sizes(a, b) -> bool:
    """Two size lists (ints, SymInts or nodes computing them) are the same, symbol for symbol."""
    def key(v):
        if isinstance(v, torch.fx.Node):
            v = _val(v)
        return str(v)

    return len(a) == len(b) and all(key(x) == key(y) for x, y in zip(a, b))


def _unbroadcast(node, ndim_source: int):
    """The source of ``view(expand(source, S), S)`` when the source has ``ndim_source`` dims and the expand
    only adds leading dims (or none), else None."""
    if node.op != "call_function" or op_name(node.target) not in ("aten.view.default", "aten._unsafe_view.default"):
        return None
    expand = node.args[0]
    if not isinstance(expand, torch.fx.Node) or op_name(expand.target) != "aten.expand.default":
        return None
    source, size = expand.args[0], list(expand.args[1])
    val = _val(source)
    if val is None or val.dim() != ndim_source or not _same_sizes(size, list(node.args[1])):
        return None
    if not _same_sizes(size[len(size) - ndim_source:], list(val.shape)):
        return None
    return source


def _rewrite_broadcast_matmuls(graph) -> int:
    """bmm(view(expand(x)), view(expand(W, [B, k, m]))) with x 3-D unexpanded and W 2-D -> matmul(x, W)."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or op_name(node.target) != "aten.bmm.default":
            continue
        lhs, rhs = node.args
        x, w = _unbroadcast(lhs, 3), _unbroadcast(rhs, 2)
        if x is None or w is None:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.aten.matmul.default, (x, w))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        count += 1
    if count:
        graph.eliminate_dead_code()
    return count


@dataclasses.dataclass
class Program:
    """An exported model's graph, ready to evaluate in JAX: which placeholder is what, which weight is stored
    transposed, and the rule of every node. Built once per model and input shape; weights are read per call."""

    model_name: str
    nodes: list  # (node, kind, payload): placeholders and calls in graph order
    output: object  # the output node's user-output entry
    params: dict  # placeholder name -> canonical torch name of a trainable parameter
    constants: dict  # placeholder name -> ("model", fqn) / ("lifted", tensor)
    transposed: frozenset  # canonical names of parameters stored transposed
    integer_input: bool
    per_sample: bool = False  # exported for a batch of one sample (a batch is that program, vmapped)
    model_dtype: object = None  # the model's float dtype (torch); graph floats below it are casts kept as such
    reduced: set = dataclasses.field(default_factory=set)  # float dtypes below it the translation computes in
    kernels: dict = dataclasses.field(default_factory=dict)  # (impl, mode, dtype) -> jitted nt kernel
    check: object = None  # None until checked; then "" (passed) or the reason it failed
    tolerance: float | None = None  # what the check allowed: 1e-10, or looser where the model casts to float32
    forward: object = None  # the jitted per-sample forward (params, constants, x) -> (N, O), once built
    compiled: dict = dataclasses.field(default_factory=dict)  # executables compiled with QUICK_COMPILE


def _canonical_names(model: nn.Module) -> dict[str, str]:
    """Every name of every parameter -> the name ``named_parameters()`` gives it (the first, for a shared one)."""
    first = {}
    for name, p in model.named_parameters():
        first.setdefault(id(p), name)
    return {name: first[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}


def build_program(model: nn.Module, example: torch.Tensor) -> Program:
    from torch.export.graph_signature import InputKind, OutputKind

    from .aten_rules import HINTS, RULES

    name = type(model).__name__
    ep, per_sample = export_model(model, example)
    graph = ep.graph
    signature = ep.graph_signature
    canonical = _canonical_names(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}

    mutations = [s.target for s in signature.output_specs if s.kind != OutputKind.USER_OUTPUT]
    if mutations:
        raise UnsupportedOpError(f"{name}'s forward updates state ({', '.join(map(str, mutations[:5]))}); "
                                 "the NTK needs a pure function (call model.eval())")
    user_outputs = [s for s in signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    if len(user_outputs) != 1:
        raise UnsupportedOpError(f"{name} returns {len(user_outputs)} outputs; the NTK needs one tensor (N, O)")

    params, constants, user_inputs = {}, {}, []
    for spec in signature.input_specs:
        placeholder = spec.arg.name
        if spec.kind == InputKind.USER_INPUT:
            user_inputs.append(placeholder)
        elif spec.kind == InputKind.PARAMETER:
            fqn = canonical.get(spec.target, spec.target)
            if fqn in trainable:
                params[placeholder] = fqn
            else:
                constants[placeholder] = ("model", spec.target)
        elif spec.kind == InputKind.BUFFER:
            constants[placeholder] = ("model", spec.target)
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            constants[placeholder] = ("lifted", ep.constants[spec.target])
        else:
            raise UnsupportedOpError(f"{name}: the exported graph takes a {spec.kind.name} input "
                                     f"({spec.target}), which the translation cannot supply")
    if len(user_inputs) != 1:
        raise UnsupportedOpError(f"{name}'s exported graph takes {len(user_inputs)} inputs; expected one tensor")

    _rewrite_broadcast_matmuls(graph)

    # Weights only ever transposed are stored transposed: the layer becomes x @ W, as hand-written JAX has it.
    transposed, aliases = set(), {}
    for node in graph.nodes:
        if node.op == "placeholder" and node.name in params:
            val = _val(node)
            users = list(node.users)
            if val is not None and val.dim() == 2 and users and all(_is_transpose_2d(u) for u in users):
                transposed.add(params[node.name])
                aliases.update({u: node for u in users})

    missing: dict[str, int] = {}
    nodes = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.name in params:
                nodes.append((node, "param", params[node.name]))
            elif node.name in constants:
                nodes.append((node, "constant", node.name))
            else:
                nodes.append((node, "input", None))
        elif node.op == "call_function":
            if node in aliases:
                nodes.append((node, "alias", aliases[node]))
                continue
            key = op_name(node.target)
            if key not in RULES:
                missing[key] = missing.get(key, 0) + 1
                continue
            nodes.append((node, "call", (key, RULES[key])))
        elif node.op == "output":
            output = node
        else:
            missing[f"{node.op} {node.target}"] = missing.get(f"{node.op} {node.target}", 0) + 1
    if missing:
        listed = [f"{k} (x{v})" + (f": {HINTS[k]}" if k in HINTS else "") for k, v in sorted(missing.items())]
        raise UnsupportedOpError(f"{name}: no JAX rule for {len(missing)} op(s) of its core-ATen graph: "
                                 + "; ".join(listed))

    out_index = signature.output_specs.index(user_outputs[0])
    out = output.args[0]
    out = out[out_index] if isinstance(out, (tuple, list)) else out
    integer = not example.is_floating_point()
    floats = [t.dtype for t in (*model.parameters(), *model.buffers(), example) if t.is_floating_point()]
    model_dtype = max(floats, key=lambda d: torch.finfo(d).bits) if floats else None
    return Program(name, nodes, out, params, constants, frozenset(transposed), integer, per_sample, model_dtype)


def _contains_missing(value, missing_type):
    if isinstance(value, missing_type):
        return value
    if isinstance(value, (list, tuple)):
        for v in value:
            found = _contains_missing(v, missing_type)
            if found is not None:
                return found
    return None


class JaxFunction:
    """``apply_fn(params, x)``: the exported graph evaluated rule by rule in JAX; the output as (N, O).

    ``layouts`` names the parameters stored transposed (``"(in, out)"``): the kernel is the same, the layout
    is the one neural-tangents' structured derivatives handle best.
    """

    def __init__(self, program: Program, constants: dict, dtype):
        self.program = program
        self.constants = constants
        self.dtype = dtype
        self.layouts = {name: "(in, out)" for name in program.transposed}

    def __call__(self, params, x):
        """The model's output (N, O) at ``params`` for the batch ``x``: a program exported for one sample
        (``program.per_sample``, where the batched export failed) is vmapped over the batch."""
        if self.program.per_sample and x.shape[0] != 1:
            import jax

            return jax.vmap(lambda xi: self(params, xi[None])[0])(x)
        import jax.numpy as jnp
        from torch.fx.node import map_aggregate

        from . import aten_rules as R

        env = {}

        def load(arg):
            if isinstance(arg, torch.fx.Node):
                return env[arg]
            if isinstance(arg, torch.dtype):
                return R.jax_dtype(arg)
            if isinstance(arg, torch.Tensor):
                return R.to_jax(arg)
            return arg

        floor = np.finfo(self.dtype).eps
        with R.computing_in(self.dtype, self.program.model_dtype):
            for node, kind, payload in self.program.nodes:
                if kind == "call":
                    key, fn = payload
                    args = map_aggregate(node.args, load)
                    kwargs = map_aggregate(node.kwargs, load)
                    # (getitem picks from a multi-output op's tuple; what it picks is checked where it is used)
                    missing = None if key == "operator.getitem" else \
                        _contains_missing(list(args) + list(kwargs.values()), R.MISSING)
                    if missing is not None:
                        raise UnsupportedOpError(f"{self.program.model_name}: {key} uses {missing.what}, which "
                                                 "the translation does not compute")
                    try:
                        env[node] = fn(*args, **kwargs)
                        for value in (env[node] if isinstance(env[node], (tuple, list)) else (env[node],)):
                            dtype = getattr(value, "dtype", None)
                            if dtype is not None and jnp.issubdtype(dtype, jnp.floating) and \
                                    jnp.finfo(dtype).eps > floor:  # (seen while tracing: a cast the model makes)
                                self.program.reduced.add(np.dtype(dtype).name)
                    except UnsupportedOpError:
                        raise
                    except NotImplementedError as exc:
                        raise UnsupportedOpError(f"{self.program.model_name}: {key}: {exc}") from exc
                elif kind == "alias":
                    env[node] = env[payload]
                elif kind == "param":
                    env[node] = params[payload]
                elif kind == "constant":
                    env[node] = self.constants[payload]
                else:
                    env[node] = x
            y = env[self.program.output]
        if not hasattr(y, "ndim"):
            raise UnsupportedOpError(f"{self.program.model_name} returns {type(y).__name__}, not a tensor")
        if y.ndim == 1:
            return y[:, None]
        if y.ndim != 2:
            raise UnsupportedOpError(f"{self.program.model_name} returns shape {tuple(y.shape)}; "
                                     "the NTK needs (N, O) or (N,)")
        return y


_PROGRAMS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def program(model: nn.Module, example: torch.Tensor) -> Program:
    """The model's translated graph, built once per model, parameter shapes and per-sample input shape/dtype
    (exporting takes seconds); a failure is cached too, and raised again."""
    from ntk_bench.implementations.core.module_walks import shape_keyed_cache

    def make():
        try:
            return build_program(model, example)
        except UnsupportedOpError as exc:
            return exc

    key = ("program", tuple(example.shape[1:]), example.dtype, str(example.device))
    result = shape_keyed_cache(_PROGRAMS, model, key, make)
    if isinstance(result, UnsupportedOpError):
        raise UnsupportedOpError(str(result))
    return result


def weights(model: nn.Module, prog: Program, dtype=np.float64):
    """``(params, constants)`` as JAX arrays in ``dtype`` (floats), read from the model now."""
    from . import aten_rules as R

    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(dict(model.named_buffers(remove_duplicate=False)))
    with R.computing_in(dtype):
        params = {}
        for fqn in prog.params.values():
            value = named[fqn].detach()
            params[fqn] = R.to_jax(value.T if fqn in prog.transposed else value)
        constants = {}
        for placeholder, (where, what) in prog.constants.items():
            constants[placeholder] = R.to_jax(named[what] if where == "model" else what)
    return params, constants


def to_jax(model: nn.Module, example: torch.Tensor, dtype=np.float64):
    """``(apply_fn, params)``: the model as a JAX function of its trainable parameters (float64 by default)."""
    prog = program(model, example)
    params, constants = weights(model, prog, dtype)
    return JaxFunction(prog, constants, dtype), params


__all__ = ["JaxFunction", "Program", "UnsupportedOpError", "export_model", "op_name", "program", "to_jax",
           "weights"]
