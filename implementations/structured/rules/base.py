"""The rule contract: what a layer rule of ``structured`` must provide, and the checks every rule's output passes.

A rule turns the recorded calls of one planned module (or of the torch functions reading its parameters) into
that module's term of the kernel Θ. The plan (``plan.py``) picks the rule: the table (``table.py``) maps a
module type to its rule; parameters read by torch functions become linear ops or taps; everything else takes
the generic rule. Adding a rule is one file here, one line in the table and one row in the rule tests' table.

Layouts used throughout (N: the side's samples, O: the model's outputs, P: a parameter's numel):

- G, an output gradient: ``(O, *Z.shape)`` with Z the recorded output; ``G[o]`` = ∂(Σ_n f[n, o])/∂Z.
- a Jacobian block: ``(N, O, P)`` per parameter slot, P in the parameter's own flattened (row-major) layout, so
  that the blocks of one parameter used several times can be summed before contracting. A block may be a
  non-contiguous view (``KernelSum.add_jacobians`` reads either row order).
- a summed Jacobian: ``(O, P)`` = Σ_n of the block (the plan's check compares it with autograd's gradient).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ...core.base import UnsupportedModelError
from ...core.costs import Layer


class RuleError(UnsupportedModelError):
    """A rule's output broke its own invariants (a shape or an order): a bug in the rule, reported naming the
    module instead of computing a wrong kernel."""


@dataclasses.dataclass(frozen=True)
class Options:
    """Switches of a ``Structured`` instance, passed down to the rules (tests and ablations set them per
    instance; nothing reads a module global).

    ``order``: None takes each Gram-capable weight in the order its FLOPs favour; "gram" or "jacobian" forces that
    order wherever it applies. ``embedding_sparse_below``: an Embedding's Gram term sums its equal-id token pairs
    one by one when they are fewer than this fraction of all token pairs, else through the dense index-equality
    matrix (1.0: always pairs; a negative number: always dense).
    """

    order: str | None = None
    embedding_sparse_below: float = 1 / 16

    def __post_init__(self):
        if self.order not in (None, "gram", "jacobian"):
            raise ValueError(f"order must be None, 'gram' or 'jacobian', not {self.order!r}")


@dataclasses.dataclass
class LayerCost:
    """One layer's share of ``Structured.estimate`` for an N x M block: its FLOPs; the numbers its Gram order holds
    at once (the largest such intermediate is what counts), the numbers of its Jacobian blocks (they add up), the
    numbers of its input patches per sample (the largest counts), and G's numbers per (sample, output) it
    records (they add up over layers)."""

    flops: float
    gram_held: float = 0
    jac_held: float = 0
    patches: float = 0
    g_numbers: float = 0


def order_of(o: int, mode: str) -> int:
    """O² in full mode, O in trace and diagonal: the output pairs a contraction produces per sample pair."""
    return o * o if mode == "full" else o


def trainable_names(module: nn.Module) -> set[str]:
    """The names of ``module``'s own trainable parameters."""
    return {k for k, p in module._parameters.items() if p is not None and p.requires_grad}


class Rule(abc.ABC):
    """How one kind of layer adds its term to Θ (the contract every rule implements).

    Class attributes:

    - ``name``: the rule's name in plans, messages and the cost view ("linear", "conv", "norm", ...).
    - ``level``: how the plan records a use. "forward": the module's own ``forward`` is wrapped; a use holds its
      one input (``use.leaves[0]``) and one output (``use.outs[0]``) as the layer saw them, before forward hooks.
      "call": the module's whole call, hooks included; every input leaf and output leaf (the generic rule).
      "op": every torch function call that reads the slots' parameters; a use holds that call's argument leaves
      and its one output (linear ops, taps).
    - ``gram_capable``: the rule offers the Gram order (``costs`` and ``add_gram``) besides the Jacobian blocks.
    - ``output_shortcut``: a use whose output is the model's own output on (N, K) may skip its backward: its G is
      the identity, its term (X1 X2ᵀ + 1) ⊗ I (only a plain Linear's weight and bias).

    An instance is made per planned entry, ``Rule(module, slots)``: ``slots`` maps slot names (the parameters'
    names relative to the module) to the parameters the entry covers.
    """

    name: ClassVar[str]
    level: ClassVar[str] = "forward"
    gram_capable: ClassVar[bool] = False
    output_shortcut: ClassVar[bool] = False

    def __init__(self, module: nn.Module, slots: dict[str, torch.Tensor]):
        self.module = module
        self.slots = dict(slots)

    # -- what the table asks before any call (class methods: no instance yet) ---------------------------------

    @classmethod
    def applies(cls, module: nn.Module, key: type) -> bool:
        """Whether ``module``, found in the table under ``key`` (a class in its MRO), is that layer as the rule
        computes it: ``key``'s own ``forward`` (a subclass overriding it is another function), its trainable
        parameters plain ``weight`` / ``bias`` (a parametrization or extra parameters, as old-style
        ``weight_norm`` adds, compute the weight otherwise). Rules with further conditions extend this."""
        from torch.nn.utils import parametrize

        return type(module).forward is key.forward and not parametrize.is_parametrized(module) and \
            trainable_names(module) <= {"weight", "bias"}

    @classmethod
    def problem(cls, module: nn.Module) -> str | None:
        """Why a module the rule applies to has no well-defined kernel at all (the plugin declines it, naming
        the module); None when it has one."""
        return None

    @classmethod
    def batched(cls, module: nn.Module, dx: int, dz: int, rank: int) -> bool:
        """Whether a "forward"-level call whose input's batch dimension is ``dx`` (of ``rank`` dimensions) and
        output's is ``dz`` is in the layout the rule computes (else the module takes the generic rule)."""
        return False

    @classmethod
    @abc.abstractmethod
    def layers(cls, entry: Any, flops_of) -> list[Layer]:
        """The cost records of a planned ``entry`` per sample (``entry.shapes``: each call's input and output
        shapes without the batch dimension, and whether the output is the model's): per call, or one for the
        entry, S output positions, K inputs per position, C outputs per position, P the parameters covered.
        ``flops_of(module)``: FLOPs of one forward of a module on one sample (for rules that rerun modules)."""

    @classmethod
    @abc.abstractmethod
    def estimate(cls, layer: Layer, n: int, m: int, o: int, mode: str, symmetric: bool) -> LayerCost:
        """The layer's cost on an N x M block with O outputs in ``mode`` (``symmetric``: x2 is x1, one side built):
        the order it would take, its FLOPs and what it holds."""

    # -- per call ------------------------------------------------------------------------------------------------

    def targets(self, use) -> list[int]:
        """The indices of ``use.outs`` whose output gradient G the rule needs (those that require grad)."""
        return [0] if use.outs[0].requires_grad else []

    @abc.abstractmethod
    def side(self, use, grads: list[torch.Tensor], checking: bool = False) -> Any:
        """One side's data for ``use``: ``grads`` holds G ``(O, *Z.shape)`` for each of ``targets(use)``, with the
        use's batch dimensions given by ``use.entry.in_dims[use.index]`` / ``out_dims``. The result is whatever
        ``jacobians``, ``summed`` and ``add_gram`` read (layer inputs and G in the rule's layout, or finished
        Jacobian blocks); it must not hold the forward's graph. ``checking``: the plan is being checked (a rule
        with alternatives may try them here)."""

    @abc.abstractmethod
    def check_side(self, side: Any, n: int, o: int) -> None:
        """Raise (``self.fail``) unless ``side`` holds ``n`` samples and ``o`` outputs in the rule's layout."""

    @abc.abstractmethod
    def jacobians(self, side: Any, slots: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per slot in ``slots`` that this use reaches (all of them, but for a tap whose op reads some): the
        per-sample Jacobian ``(N, O, P)`` (P in the parameter's layout)."""

    def summed(self, side: Any, slots: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per slot in ``slots``: Σ_n of its Jacobian, ``(O, P)`` (rules with a cheaper sum override this)."""
        return {k: v.sum(0) for k, v in self.jacobians(side, slots).items()}

    def costs(self, s1: Any, s2: Any, mode: str, symmetric: bool) -> tuple[float, float]:
        """Gram-capable rules: (FLOPs of the Gram order, FLOPs of the Jacobian order) for these two sides."""
        raise NotImplementedError(f"{self.name} has no Gram order")

    def add_gram(self, total, s1: Any, s2: Any, symmetric: bool, bias: bool, options: Options) -> list:
        """Gram-capable rules: add the weight's term Θ_W = Σ_{s,t} (X1 X2ᵀ)[s, t] ⊙ (G1 G2ᵀ)[s, t] to ``total``
        (a ``KernelSum``) without forming a Jacobian; with ``bias``, the bias's term too. Returns the Jacobian
        blocks ``[(J1, J2 or None when symmetric)]`` still to contract (a bias it leaves to the Jacobian order)."""
        raise NotImplementedError(f"{self.name} has no Gram order")

    # -- the checks every rule's output passes ---------------------------------------------------------------------

    def fail(self, what: str) -> None:
        """Raise a RuleError naming the module and the rule."""
        raise RuleError(f"structured: the {self.name} rule of {type(self.module).__name__} broke its invariant: "
                        f"{what}")

    def expect(self, what: str, got: tuple, expected: tuple) -> None:
        """``self.fail`` unless shape ``got`` equals ``expected`` (None in ``expected``: any size there)."""
        if len(got) != len(expected) or any(e is not None and g != e for g, e in zip(got, expected)):
            got = tuple(got)
            self.fail(f"{what} has shape {got}, expected {tuple('*' if e is None else e for e in expected)}")

    def checked_side(self, use, grads: list[torch.Tensor], n: int, o: int, checking: bool = False) -> Any:
        """``side`` followed by ``check_side`` (what the plugin calls)."""
        side = self.side(use, grads, checking)
        self.check_side(side, n, o)
        return side

    def checked_jacobians(self, side: Any, slots: dict[str, torch.Tensor], n: int, o: int) -> dict[str, torch.Tensor]:
        """``jacobians``, each block checked to be ``(N, O, P)`` for its slot's parameter."""
        out = self.jacobians(side, slots)
        if not set(out) <= set(slots):
            self.fail(f"Jacobians for {sorted(out)}, asked for {sorted(slots)}")
        for k, j in out.items():
            self.expect(f"the Jacobian of {k}", j.shape, (n, o, slots[k].numel()))
        return out

    def checked_summed(self, side: Any, slots: dict[str, torch.Tensor], o: int) -> dict[str, torch.Tensor]:
        """``summed``, each checked to hold (O, P) numbers for its slot."""
        out = self.summed(side, slots)
        if not set(out) <= set(slots):
            self.fail(f"summed Jacobians for {sorted(out)}, asked for {sorted(slots)}")
        for k, v in out.items():
            if v.numel() != o * slots[k].numel():
                self.fail(f"the summed Jacobian of {k} has {v.numel()} numbers, expected O·P = "
                          f"{o * slots[k].numel()}")
        return out


class CallShape(NamedTuple):
    """One call of a planned entry as the cost view sees it, per sample (batch dimension removed)."""

    x: tuple  # the (first) input's shape; for an op-level use, the op's (first) tensor argument's
    z: tuple  # the (first) output's shape
    is_output: bool = False  # the output is the model's own output


def batch_first(use, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A one-input, one-output use's input with its batch dimension first, and its G ``(O, *Z.shape)`` as
    ``(O, N, ...)``."""
    e = use.entry
    dx, dz = e.in_dims[use.index][0], e.out_dims[use.index][0]
    return use.leaves[0].movedim(dx, 0), g.movedim(1 + dz, 1)


def per_sample(shape: tuple, dim: int | None) -> tuple:
    """``shape`` without its batch dimension ``dim``."""
    return tuple(s for i, s in enumerate(shape) if i != dim)


def numel(shape) -> int:
    """The number of elements of a tensor of ``shape``."""
    return math.prod(shape)


def covered(slots: dict) -> int:
    """The parameters' numbers the slots hold."""
    return sum(p.numel() for p in slots.values())
