"""Every tolerance of the package, by purpose and dtype: :func:`tolerance` is the one place a value is picked.

A computation in float64 throughout is held to the float64 value of its purpose; anything else (float32, and the
lower precisions a float32 model may cast to inside) to the float32 value. The purposes:

``"reference"``
    A kernel against the float64 reference (neural-tangents, or the harness's float64 Jacobian contraction), as
    the relative Frobenius error ‖K − K_ref‖ / ‖K_ref‖: 1e-10 in float64 (the reference's own precision: a
    float64 kernel that is right agrees to rounding, so 1e-10 leaves room only for summation order), 1e-4 in
    float32 (a float32 kernel is off by the accumulated float32 rounding of its sums, about 1e-6 to 1e-5 on the
    zoo; 1e-4 keeps a margin while a wrong kernel is off by far more). What the runner, the kernel store's
    verification, the gate, the pytest plugin and the correctness suite check.
``"repeat"``
    A plugin's own check that one computation done twice agrees with itself (the forward pass run again, a
    sample alone against the same sample in a batch, a rule's vmapped output against its per-sample loop,
    the plan's probe of a batch dimension), element by element (``allclose`` with ``atol`` this times the
    largest magnitude): 1e-9 in float64, 1e-4 in float32. The two sides differ only in the order of their sums,
    a few ulps each; a random forward pass or a batching rule that mixes samples is off by far more. Looser
    than ``"reference"`` in float64 because it is an element's error against the largest element, not a norm.
``"jacobian_batching"``
    Jacobian contraction's check of its vmapped per-sample Jacobians against one sample computed alone, as the
    relative Frobenius error over all parameters: the square root of the dtype's epsilon (1.5e-8 in float64,
    3.5e-4 in float32, 0.03 in float16). Batched and looped Jacobians differ only in the order of their sums; a
    batching rule that mixes vmap levels is off by O(1). A mismatch only makes the plugin loop (slower, never wrong), so the
    bound leans towards accepting the vmapped result.
``"gradient_sum"``
    ``structured``'s check of its plan: Σ B[n]·A[n,o]·J[n,o] over the rules' per-sample Jacobians with random
    weights (A on the outputs, in the backward; B on the samples, along each layer's batch dimension) against
    autograd's gradient of Σ B[n]·A[n,o]·f[n,o], per parameter, relative to the larger norm: 1e-9 in
    float64, 1e-3 in float32. Each side sums N·O terms per parameter in its own order, and in float32 that
    rounding grows with the batch; a missing or doubled use of a parameter, a wrong batch dimension or mixed
    samples change the sum by O(1), far above either value.
"""

from __future__ import annotations

from typing import Any, Literal

Purpose = Literal["reference", "repeat", "jacobian_batching", "gradient_sum"]

# (float64, every lower precision)
_VALUES: dict[str, tuple[float, float]] = {
    "reference": (1e-10, 1e-4),
    "repeat": (1e-9, 1e-4),
    "jacobian_batching": ((2.0 ** -52) ** 0.5, (2.0 ** -23) ** 0.5),  # √eps; the half precisions: their own √eps
    "gradient_sum": (1e-9, 1e-3),
}
PURPOSES = tuple(_VALUES)


def _name(dtype: Any) -> str:
    # torch.float64 prints as "torch.float64", numpy's dtype as "float64"
    return str(dtype).removeprefix("torch.")


def _is_float64(dtype: Any) -> bool:
    return _name(dtype) in ("float64", "double")


def tolerance(dtype: Any, purpose: Purpose = "reference") -> float:
    """The tolerance for a computation in ``dtype`` (a torch or numpy dtype, or its name) for ``purpose``.

    ``"reference"`` (the default): a kernel's relative error against the float64 reference. The other purposes
    and why each value is what it is: this module's docstring. ``dtype`` other than float64 gets the float32
    value (the lower precisions are held to float32's bound, never a looser one).
    """
    try:
        value64, value_lower = _VALUES[purpose]
    except KeyError:
        raise ValueError(f"unknown tolerance purpose {purpose!r}; valid: {', '.join(PURPOSES)}") from None
    if purpose == "jacobian_batching" and not _is_float64(dtype) and _name(dtype) != "float32":
        import torch

        return torch.finfo(getattr(torch, _name(dtype))).eps ** 0.5
    return value64 if _is_float64(dtype) else value_lower
