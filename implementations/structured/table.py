"""The rule table: module type -> the rule that computes its term, and the catalogue of rules (the one copy).

``structured`` computes Θ = Σ over parameters of J1 J2ᵀ layer by layer: one forward records each planned layer's
input X and output Z, one backward vmapped over the O outputs gives G = ∂f_o/∂Z, and each layer adds its term
by its rule. Which rule covers which parameter is the plan's decision (``plan.py``), made once per model
structure and input shape and checked against autograd on the first batch.

===================================  =============================================  =============================
what                                 term                                           order
===================================  =============================================  =============================
Linear over any leading dimensions   Σ_{s,t} (X1[n,s]·X2[m,t]) (G1[o,n,s]·G2[p,m,t]) the cheaper by FLOPs of Gram
(``linear``; tokens are positions)   over output positions s, t                     2·N·M·S·T·(K + O·C) +
                                                                                    2·N·M·S·O²·C and Jacobian
                                                                                    2·(N·S + M·T)·O·C·K +
                                                                                    2·N·M·O²·C·K (``order_costs``)
the output Linear (its output is     (X1 X2ᵀ + 1) ⊗ I: G is the identity            no backward, no G Gram
the model's (N, O))
Conv1d/2d/3d (``conv``: groups,      as Linear over output pixels, X the padded      as Linear, K = C_in/groups ·
dilation, stride, padding modes)     input's patches per group                      kernel
Embedding (``embedding``)            X1·X2 is [id1[n,s] = id2[m,t]]; the padding     Gram or Jacobian over the
                                     row has no gradient                            vocabulary, the cheaper
eval BatchNorm, GroupNorm,           J_weight = Σ_positions x̂ ⊙ G, J_bias = Σ G      Jacobian
LayerNorm, RMSNorm (``norm``)        (x̂ the normalised input)
PReLU's weight (``prelu``)           J = Σ_positions min(x, 0) ⊙ G per channel      Jacobian
parameters read only as              as Linear on each call's input and output      as Linear
``F.linear``'s weight and bias on
batched tokens (``linear_op``):
self-attention's projections, a
user's ``F.linear(x, self.weight)``
parameters read only by single ops   each op's own vjp along G restricted to one    Jacobian
with one batched output (``tap``):   sample
a class token's ``expand``, a
positional embedding's ``+``, a
transposed convolution's weight
any other module with parameters     that module's per-sample vjp (torch.func: vmap  Jacobian
(``generic``): cross-attention,      of the vjp of ``functional_call``; recurrent
LSTM/GRU/RNN, a user's module, a     layers through a per-step forward; one sample
parametrized weight, a submodule     at a time where vmap cannot run the module)
used without being called
a parameter used more than once      the per-use Jacobians summed before            Jacobian
(a module called twice, tied         contracting (the cross terms count)
weights)
===================================  =============================================  =============================

The Jacobian-order blocks of all layers are contracted together, small ones concatenated into one GEMM.
Parameter-free glue (activations, pooling, residual sums, in-place ops) is autograd's. Attention runs in forms
vmap batches (``rewrites.py``). Declined, naming the module: a model whose output for a sample depends on the
other samples, BatchNorm with batch statistics, Embedding with ``max_norm`` or ``scale_grad_by_freq``,
TorchScript submodules, a parameter whose per-sample Jacobians do not add up to autograd's gradient.

The table below holds the module rules (``linear`` to ``prelu``); ``linear_op``, ``tap`` and ``generic`` are the
plan's own for parameters no table entry covers. A module takes the rule of the first class in its MRO that the
table holds, when that rule ``applies`` to it (the class's own ``forward``, plain ``weight``/``bias``, no
parametrization); otherwise it is generic. Register a rule for your own module type with ``register_rule``.
"""

from __future__ import annotations

from torch import nn

from .rules.base import Rule
from .rules.conv import ConvRule
from .rules.embedding import EmbeddingRule
from .rules.generic import GenericRule
from .rules.linear import LinearOpRule, LinearRule
from .rules.norms import BatchNormRule, GroupNormRule, LayerNormRule, RMSNormRule
from .rules.prelu import PReLURule
from .rules.taps import TapRule

TABLE: dict[type, type[Rule]] = {
    nn.Linear: LinearRule,
    nn.Conv1d: ConvRule,
    nn.Conv2d: ConvRule,
    nn.Conv3d: ConvRule,
    nn.Embedding: EmbeddingRule,
    nn.modules.batchnorm._BatchNorm: BatchNormRule,
    nn.GroupNorm: GroupNormRule,
    nn.LayerNorm: LayerNormRule,
    nn.PReLU: PReLURule,
    **({nn.RMSNorm: RMSNormRule} if hasattr(nn, "RMSNorm") else {}),
}

# The plan's rules for what no table entry covers (not keyed by a module type).
PLAN_RULES: tuple[type[Rule], ...] = (LinearOpRule, TapRule, GenericRule)

_RESOLVED: dict[type, tuple[type, type[Rule]] | None] = {}  # module type -> (its table key, rule) or None
_VERSION = 0  # bumped by every change of TABLE: plans and cost views made under an older table are not reused


def version() -> int:
    """The table's version: it changes with every ``register_rule``, so that a plan made before is made again."""
    return _VERSION


def changed() -> None:
    """Say that TABLE changed (``register_rule`` does): forget the resolved types, and the plans made before."""
    global _VERSION
    _RESOLVED.clear()
    _VERSION += 1


def register_rule(module_type: type, rule: type[Rule]) -> None:
    """Compute ``module_type``'s term (and its subclasses' that keep its ``forward``) with ``rule``.

    ``rule`` subclasses :class:`rules.base.Rule` and implements its contract (``side``, ``check_side``,
    ``jacobians``, ``layers``, ``estimate``, ``batched``; ``costs``/``add_gram`` for a Gram order). The plan then
    takes it for every module of that type whose parameters it ``applies`` to; its per-sample Jacobians are
    checked against autograd's gradient on the first batch like the built-in rules'. Test it as the built-in
    rules are tested (a row in ``tests/test_structured_rules.py``'s table, against the brute-force kernel).
    Plans made before are made again on their model's next call, with the rule.
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_rule: {module_type!r} is not an nn.Module subclass")
    if not isinstance(rule, type) or not issubclass(rule, Rule):
        raise TypeError(f"register_rule: {rule!r} is not a subclass of structured's Rule")
    TABLE[module_type] = rule
    changed()


def _resolve(cls: type) -> tuple[type, type[Rule]] | None:
    if cls not in _RESOLVED:
        _RESOLVED[cls] = next(((key, TABLE[key]) for key in cls.__mro__ if key in TABLE), None)
    return _RESOLVED[cls]


def rule_for(module: nn.Module) -> type[Rule] | None:
    """The rule the table gives ``module``, or None (the plan's generic rule, or a linear op or a tap)."""
    found = _resolve(type(module))
    if found is None:
        return None
    key, rule = found
    return rule if rule.applies(module, key) else None


def problem(module: nn.Module) -> str | None:
    """Why the rule the table gives ``module`` cannot compute it at all (``Rule.problem``), or None. (Called on
    every plugin call: rules without a ``problem`` of their own are not asked.)"""
    found = _resolve(type(module))
    if found is None or found[1].problem.__func__ is Rule.problem.__func__:
        return None
    key, rule = found
    return rule.problem(module) if rule.applies(module, key) else None


def all_rules() -> list[type[Rule]]:
    """Every rule: the table's (one each) and the plan's own."""
    return list(dict.fromkeys([*TABLE.values(), *PLAN_RULES]))
