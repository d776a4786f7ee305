"""Rewrites that let torch.func.vmap batch attention and recurrent layers, scoped to a call.

vmap has no batching rule for the fused CPU attention kernel, softmax's backward, aten::lstm or aten::gru: it
would run them sample by sample and output by output. Inside ``batchable()`` (a torch function mode, so local to
the calling thread and undone on exit; nothing in torch.nn.functional is reassigned):

- ``multi_head_attention_forward`` (what nn.MultiheadAttention calls) goes to ``projected_mha`` where ``covers``
  accepts the call (self-attention: both projections become ``F.linear`` calls on tokens, which the plan takes as
  linear ops), else to a copy of PyTorch's function whose softmax and attention are the batchable forms;
- the model's own softmax and scaled_dot_product_attention calls go to ``softmax`` / ``attention`` (when the plan
  found such calls: the mode costs a few microseconds on every torch call);
- any other attention runs PyTorch's math kernel.

The mode counts what it rewrote (``projected``, ``attention_calls``, ``direct_hits``): discovery reads its own mode's
counts. ``functional_rnn`` is nn.RNN / LSTM / GRU's forward in per-step ops, for the generic rule.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

_F_SOFTMAX, _F_ATTENTION, _F_MHA = F.softmax, F.scaled_dot_product_attention, F.multi_head_attention_forward


def softmax(x, dim, dtype=None):
    """softmax as exp(x - max) / sum: its backward is made of ops vmap batches (``_softmax_backward_data`` has no
    batching rule: vmap runs it per sample and output)."""
    if dtype is not None:
        x = x.to(dtype)
    e = torch.exp(x - x.detach().amax(dim, keepdim=True))
    return e / e.sum(dim, keepdim=True)


def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """scaled_dot_product_attention's math form (PyTorch's reference formula) with ``_softmax``."""
    scale = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        keep = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return softmax(scores, -1) @ value


def _batchable_softmax(x, dim=None, _stacklevel=3, dtype=None):
    return softmax(x, dim, dtype) if dim is not None and x.is_floating_point() else \
        _F_SOFTMAX(x, dim, _stacklevel, dtype)


def _batchable_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False):
    if dropout_p or enable_gqa:
        return _F_ATTENTION(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    return attention(query, key, value, attn_mask, dropout_p, is_causal, scale)


def covers(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
           add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
           need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
           k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
           is_causal=False) -> bool:
    """Whether ``projected_mha`` computes this call of ``multi_head_attention_forward``: self-attention with
    packed projections on batched (L, N, E) input, masks of the shapes PyTorch merges, no dropout while training;
    anything else (cross-attention, separate projection weights, bias_k/bias_v, zero attention, static keys,
    unbatched input) is PyTorch's function."""
    e = query.shape[-1] if query.dim() == 3 else None
    return not (query.dim() != 3 or not (query is key and key is value) or use_separate_proj_weight or
                in_proj_weight is None or bias_k is not None or bias_v is not None or add_zero_attn or
                static_k is not None or static_v is not None or (training and dropout_p > 0) or
                e != embed_dim_to_check or e % num_heads or (is_causal and attn_mask is None) or
                (attn_mask is not None and tuple(attn_mask.shape[-2:]) != (query.shape[0],) * 2) or
                (attn_mask is not None and attn_mask.dim() == 3 and attn_mask.shape[0] != query.shape[1] * num_heads) or
                (attn_mask is not None and attn_mask.dim() not in (2, 3)) or
                (key_padding_mask is not None and tuple(key_padding_mask.shape) != tuple(query.shape[1::-1])))


def projected_mha(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v,
                  add_zero_attn, dropout_p, out_proj_weight, out_proj_bias, training=True, key_padding_mask=None,
                  need_weights=True, attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None,
                  k_proj_weight=None, v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                  is_causal=False):
    """torch.nn.functional.multi_head_attention_forward for the calls ``covers`` accepts, written so that both
    projections are ``F.linear`` calls on (L, N, E) tensors: the plan sees the parameters as Linears over tokens
    (linear ops), where PyTorch's own code applies the output projection to (L·N, E) rows. The same operations
    otherwise, masks merged as PyTorch merges them, softmax and attention in their batchable forms."""
    e = query.shape[-1]
    length, n, _ = query.shape
    heads, hd = num_heads, e // num_heads
    key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                         other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                         target_type=query.dtype)
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)  # (1 or N·heads, L, L)
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(n, 1, 1, length).expand(-1, heads, -1, -1).reshape(n * heads, 1, length)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    proj = F.linear(query, in_proj_weight, in_proj_bias)  # (L, N, 3E)
    q, k, v = proj.unflatten(-1, (3, heads, hd)).permute(2, 1, 3, 0, 4)  # each (N, heads, L, hd)
    if need_weights:
        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)  # (N, heads, L, L)
        if attn_mask is not None:
            scores = scores + (attn_mask.view(n, heads, attn_mask.shape[-2], length) if attn_mask.shape[0] > 1
                               else attn_mask)
        weights = _batchable_softmax(scores, -1)
        out = weights @ v
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 else attn_mask.view(n, heads, -1, length)
        out = _batchable_attention(q, k, v, attn_mask, 0.0, is_causal)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(length, n, e), out_proj_weight, out_proj_bias)  # (L, N, E)
    if not need_weights:
        return out, None
    return out, weights.mean(dim=1) if average_attn_weights else weights


def _with_globals(fn, **names):
    """A copy of function ``fn`` whose global names ``names`` are rebound (the original is untouched)."""
    copy = types.FunctionType(fn.__code__, {**fn.__globals__, **names}, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


# PyTorch's multi_head_attention_forward, for the calls projected_mha does not cover, with batchable softmax and
# attention (vmap batches them; the same values).
pytorch_mha = _with_globals(_F_MHA, softmax=_batchable_softmax, scaled_dot_product_attention=_batchable_attention)


class BatchableMode(TorchFunctionMode):
    """The torch function mode of ``batchable``: ``attention``: MultiheadAttention's function rewritten;
    ``direct``: the model's own softmax / scaled_dot_product_attention calls rewritten (dropout and grouped-query
    attention left to PyTorch's own)."""

    SOFTMAX = (torch.softmax, _F_SOFTMAX, torch.Tensor.softmax, torch.special.softmax)
    ATTENTION = (_F_ATTENTION,)

    def __init__(self, direct: bool, attention: bool):
        super().__init__()
        self.direct, self.attention = direct, attention
        self.direct_hits = 0  # the model's own softmax / attention calls replaced
        self.attention_calls = 0  # multi_head_attention_forward calls seen
        self.projected = 0  # of those, computed by projected_mha

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _F_MHA and self.attention:
            self.attention_calls += 1
            if covers(*args, **kwargs):
                self.projected += 1
                return projected_mha(*args, **kwargs)
            return pytorch_mha(*args, **kwargs)
        if self.direct:
            if func in self.SOFTMAX and args and isinstance(args[0], torch.Tensor):
                self.direct_hits += 1
                rest = list(args[1:])
                dim = kwargs.get("dim", rest[0] if rest else None)
                dtype = kwargs.get("dtype", rest[2] if func is _F_SOFTMAX and len(rest) > 2 else
                                   (rest[1] if func is not _F_SOFTMAX and len(rest) > 1 else None))
                return _batchable_softmax(args[0], dim, dtype=dtype)
            if func in self.ATTENTION:
                self.direct_hits += 1
                return _batchable_attention(*args, **kwargs)
        return func(*args, **kwargs)


# What the plan found the model to call (direct softmax/attention, MultiheadAttention); unknown: both.
_NEEDED: contextvars.ContextVar = contextvars.ContextVar("structured_rewrites_needed", default=(True, True))


@contextlib.contextmanager
def needed(direct: bool, attention: bool):
    """Inside: ``batchable()`` rewrites the model's own softmax/attention calls only when ``direct``, and
    MultiheadAttention only when ``attention`` (what the plan found; a mode that rewrites nothing is not entered)."""
    token = _NEEDED.set((direct, attention))
    try:
        yield
    finally:
        _NEEDED.reset(token)


@contextlib.contextmanager
def batchable(direct: bool | None = None, attention: bool | None = None):
    """Attention in a form vmap batches, for the calls inside (see the module docstring); ``direct`` and
    ``attention`` default to what ``needed`` says. Yields the mode (its counts), or None when there is nothing to
    rewrite."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch without the context manager: the default kernels
        kernel = contextlib.nullcontext()
    else:
        kernel = sdpa_kernel([SDPBackend.MATH])
    want_direct, want_attention = _NEEDED.get()
    direct = want_direct if direct is None else direct
    attention = want_attention if attention is None else attention
    mode = BatchableMode(direct, attention) if direct or attention else None
    with kernel, (mode if mode is not None else contextlib.nullcontext()):
        yield mode


def rnn_supported(module) -> bool:
    """nn.RNN / LSTM / GRU configurations ``functional_rnn`` reproduces (no projections; inter-layer dropout only
    in eval mode)."""
    return type(module) in (nn.RNN, nn.LSTM, nn.GRU) and not getattr(module, "proj_size", 0) and \
        not (module.training and module.dropout > 0)


def functional_rnn(module, params, args, kwargs):
    """nn.RNN / LSTM / GRU's forward written with per-step ops that torch.func.vmap can batch (aten::lstm and
    aten::gru have no batching rule), taking the parameters from ``params`` where given. Same outputs as the
    module: (output, h_n) or (output, (h_n, c_n)). The generic rule checks it against the module's own output."""
    x = args[0] if args else kwargs["input"]
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    lstm, gru = isinstance(module, nn.LSTM), isinstance(module, nn.GRU)
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(1 if not module.batch_first else 0)
    if module.batch_first:
        x = x.transpose(0, 1)  # (T, N, F)
    t_len, n = x.shape[:2]
    dirs, h = (2 if module.bidirectional else 1), module.hidden_size
    if hx is None:
        h0 = x.new_zeros(module.num_layers * dirs, n, h)
        hx = (h0, h0) if lstm else h0
    elif unbatched:
        hx = tuple(v.unsqueeze(1) for v in hx) if lstm else hx.unsqueeze(1)
    h_all, c_all = (hx[0], hx[1]) if lstm else (hx, None)

    def w(name):
        return params[name] if name in params else getattr(module, name)

    act = torch.tanh if not isinstance(module, nn.RNN) or module.nonlinearity == "tanh" else torch.relu
    layer_in, h_out, c_out = x, [], []
    for layer in range(module.num_layers):
        outs = []
        for d in range(dirs):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = w("weight_ih" + sfx), w("weight_hh" + sfx)
            b_ih = w("bias_ih" + sfx) if module.bias else None
            b_hh = w("bias_hh" + sfx) if module.bias else None
            xi = F.linear(layer_in, w_ih, b_ih)  # (T, N, gates·H), all steps at once
            k = layer * dirs + d
            hs, cs = h_all[k], (c_all[k] if lstm else None)
            steps = [None] * t_len
            for t in (range(t_len - 1, -1, -1) if d else range(t_len)):
                hh = F.linear(hs, w_hh, b_hh)
                if lstm:
                    i, f, g, o = (xi[t] + hh).chunk(4, -1)
                    cs = torch.sigmoid(f) * cs + torch.sigmoid(i) * torch.tanh(g)
                    hs = torch.sigmoid(o) * torch.tanh(cs)
                elif gru:
                    xr, xz, xn = xi[t].chunk(3, -1)
                    hr, hz, hn = hh.chunk(3, -1)
                    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                    hs = (1 - z) * torch.tanh(xn + r * hn) + z * hs
                else:
                    hs = act(xi[t] + hh)
                steps[t] = hs
            outs.append(torch.stack(steps))
            h_out.append(hs)
            c_out.append(cs)
        layer_in = torch.cat(outs, -1) if dirs == 2 else outs[0]
    out = layer_in.transpose(0, 1) if module.batch_first else layer_in
    h_n = torch.stack(h_out)
    if unbatched:
        out, h_n = out.squeeze(0 if module.batch_first else 1), h_n.squeeze(1)
    if lstm:
        c_n = torch.stack(c_out)
        return out, (h_n, c_n.squeeze(1) if unbatched else c_n)
    return out, h_n


