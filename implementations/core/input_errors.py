"""Inputs a model cannot take, said in one line: the shape given against what the model's first layer takes, or
the token ids' range against an embedding's size, instead of the error torch raises deep inside the forward.

``named_input_errors(model, x, given)`` wraps a forward: an ``IndexError`` on integer inputs past an embedding's
size becomes :class:`InputMismatchError` naming the ids' range and the embedding; a ``RuntimeError`` of a forward
whose first layer expects another per-sample size becomes one naming both shapes. ``given`` says where the inputs
came from (``"x1"``, ``"--input-shape 3,32,32"``), so the caller's words appear in the message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

# torch's shape errors say one of these ("mat1 and mat2 shapes cannot be multiplied", "expected input[1, 4, 8, 8]
# to have 3 channels", "Expected 3D (unbatched) or 4D (batched) input", "The size of tensor a (5) must match")
_SHAPE_WORDS = ("shape", "size", "dimension", "xpected", "channels")


class InputMismatchError(ValueError, RuntimeError):
    """The inputs do not fit the model (the shape, or ids past the vocabulary); a RuntimeError too, as torch's
    own error was."""


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module, in registration order, that fixes the size of a sample: a Linear, a convolution, an
    embedding, a recurrent layer (a heuristic: a forward may call its modules in another order)."""
    kinds = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.Embedding, nn.EmbeddingBag, nn.RNNBase)
    for name, m in model.named_modules():
        if isinstance(m, kinds):
            return name, m
    return None


def first_layer_takes(model: nn.Module) -> str | None:
    """What the first layer takes, in words ("per-sample inputs whose last dimension is 10"), or None."""
    found = first_layer(model)
    if found is None:
        return None
    name, m = found
    label = f"{name or 'the model itself'} ({type(m).__name__})"
    if isinstance(m, nn.Linear):
        return f"its first layer {label} takes inputs whose last dimension is {m.in_features}"
    if isinstance(m, nn.modules.conv._ConvNd):
        dims = len(m.kernel_size)
        return (f"its first layer {label} takes per-sample inputs of shape ({m.in_channels}, "
                f"{', '.join(['size'] * dims)}): {m.in_channels} channels and {dims} spatial dimension"
                f"{'s' if dims > 1 else ''}")
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return f"its first layer {label} takes int64 token ids in [0, {m.num_embeddings})"
    if isinstance(m, nn.RNNBase):
        return (f"its first layer {label} takes per-sample sequences of shape (length, {m.input_size})"
                if m.batch_first else f"its first layer {label} takes inputs of size {m.input_size} per step")
    if isinstance(m, nn.Bilinear):
        return f"its first layer {label} takes two inputs of sizes {m.in1_features} and {m.in2_features}"
    return None


def embedding_problem(model: nn.Module, x: torch.Tensor) -> str | None:
    """The embedding whose size the integer inputs ``x`` exceed, with the ids' range, or None."""
    if x.is_floating_point() or x.numel() == 0:
        return None
    low, high = int(x.min()), int(x.max())
    for name, m in model.named_modules():
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and (low < 0 or high >= m.num_embeddings):
            return (f"token ids range over [{low}, {high}], and {name or 'the model itself'} "
                    f"({type(m).__name__}) has {m.num_embeddings} rows: ids must lie in [0, {m.num_embeddings - 1}]")
    return None


@contextlib.contextmanager
def named_input_errors(model: nn.Module, x: torch.Tensor, given: str) -> Iterator[None]:
    """Re-raise a forward's failure on ``x`` as :class:`InputMismatchError` when the inputs are the cause: ids
    past an embedding, or a per-sample shape the first layer does not take. Other errors pass unchanged."""
    try:
        yield
    except InputMismatchError:
        raise
    except (IndexError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        ids = embedding_problem(model, x)
        if ids is not None:
            raise InputMismatchError(f"{given}: {ids} ({type(exc).__name__}: {first})") from exc
        if isinstance(exc, IndexError) or not x.is_floating_point() or not any(
                word in str(exc) for word in _SHAPE_WORDS):
            raise
        takes = first_layer_takes(model)
        shape = tuple(x.shape)
        raise InputMismatchError(
            f"{given}: the model's forward fails on a batch of shape {shape} (per sample {shape[1:]})"
            f"{f'; {takes}' if takes else ''} ({type(exc).__name__}: {first})") from exc
