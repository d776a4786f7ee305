"""Is neural-tangents as fast through the torch translation as on the same network hand-written in JAX?

Times neural-tangents' implementations on two networks, each through ``reference.kernel_fn`` (the torch model
exported and translated, as the ``nt_*`` peers run it) and hand-written in plain ``jax.numpy`` with the same
weights, in alternating blocks in one process (``bench.measurement.timers.time_paired``: a b, b a, ...), jitted, compile
excluded, ``block_until_ready``, CPU, float32:

- neural-tangents' notebook FCN: 3 x Dense(2048) + ReLU, then Dense(8); input 3072, N = M = 16;
- the PyTorch tutorial CNN (``architectures.build("tutorial_cnn")``), N = M = 16, hand-written both in torch's
  layouts (NCHW activations, OIHW kernels) and in stax's (NHWC, HWIO), and for structured derivatives also
  with torch's activations and stax's kernels (NCHW, HWIO); each is a baseline.

Structured derivatives and the CNN's Jacobian contraction at N = 16. The FCN's Jacobian contraction and
NTK-vector products would hold 16·8 rows of its 14.7M-parameter Jacobian (7.5 GB in float32) and take seconds
per sample: they are timed on one sample with itself (N = 1, x2 = None); the CNN's NTK-vector products (seconds
a call at N = 16) at N = M = 4. ``--naive``
also times the FCN hand-written with torch's (out, in) weights as ``x @ W.T`` (structured derivatives, one
call each at N = M = 4, where it takes 2.8 GB), the layout the translation avoids.

    python scripts/nt_fairness.py --out results/2026-11-23-nt-fairness/fairness.md
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def fcn_model() -> nn.Module:
    """The fully connected net of the comparison: 3072 -> 3 x (2048, ReLU) -> 8, seeded, in eval mode."""
    torch.manual_seed(0)
    layers, d = [], 3072
    for _ in range(3):
        layers += [nn.Linear(d, 2048), nn.ReLU()]
        d = 2048
    return nn.Sequential(*layers, nn.Linear(d, 8)).eval()


def fcn_hand_written(model: nn.Module, transposed: bool = True):
    """``x @ W + b`` per layer with W stored (in, out) (or torch's (out, in) and ``x @ W.T``)."""
    import jax
    import jax.numpy as jnp

    linears = [m for m in model if isinstance(m, nn.Linear)]
    params = [(jnp.asarray((m.weight.detach().T if transposed else m.weight.detach()).numpy()),
               jnp.asarray(m.bias.detach().numpy())) for m in linears]

    def apply(p, x):
        for i, (w, b) in enumerate(p):
            x = (x @ w if transposed else x @ w.T) + b
            if i < len(p) - 1:
                x = jax.nn.relu(x)
        return x

    return apply, params


def cnn_hand_written(model: nn.Module, activations: str, kernels: str = None):
    """The tutorial CNN in plain JAX: ``activations`` "NCHW" (torch's) or "NHWC" (stax's), ``kernels`` "OIHW"
    (torch's) or "HWIO" (stax's; the default for NHWC)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    kernels = kernels or {"NCHW": "OIHW", "NHWC": "HWIO"}[activations]
    convs = [model.conv1, model.conv2, model.conv3]
    dn = (activations, kernels, activations)
    bias_shape = (1, -1, 1, 1) if activations == "NCHW" else (1, 1, 1, -1)
    ks = [c.weight.detach() if kernels == "OIHW" else c.weight.detach().permute(2, 3, 1, 0) for c in convs]
    if activations == "NCHW":
        fc = model.fc.weight.detach().T  # flattening NCHW is torch's order
    else:  # torch flattens (C, H, W), NHWC (H, W, C): the readout's input rows permuted to match
        fc = model.fc.weight.detach().reshape(10, 32, 26, 26).permute(2, 3, 1, 0).reshape(-1, 10)
    params = {"convs": [(jnp.asarray(k.numpy()), jnp.asarray(c.bias.detach().numpy())) for k, c in zip(ks, convs)],
              "fc": (jnp.asarray(fc.numpy()), jnp.asarray(model.fc.bias.detach().numpy()))}

    def apply(p, x):
        if activations == "NHWC":
            x = jnp.transpose(x, (0, 2, 3, 1))
        for i, (k, b) in enumerate(p["convs"]):
            x = lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=dn) + b.reshape(bias_shape)
            if i < 2:
                x = jax.nn.relu(x)
        w, b = p["fc"]
        return x.reshape(x.shape[0], -1) @ w + b

    return apply, params


def nt_kernel(apply, implementation: str):
    """neural-tangents' jitted empirical NTK function of ``apply`` (full kernel, vmapped over samples) for one of its
    implementations."""
    import jax
    import neural_tangents as nt

    fn = nt.empirical_ntk_fn(apply, trace_axes=(), diagonal_axes=(), vmap_axes=0,
                             implementation=getattr(nt.NtkImplementation, implementation.upper()))
    return jax.jit(fn)


def compare(label, implementation, model, x1, x2, hand_written: dict, budget_s: float, rows: list, only=None):
    """Pair the translation against each hand-written version (agreement checked first); append table rows."""
    from ntk_bench import reference

    if only is not None and implementation != only:
        return
    from ntk_bench.bench.measurement.timers import time_paired

    translated = reference.kernel_fn(model, x1, implementation, "full", "float32")
    a, b = translated.convert(x1), translated.convert(x2)
    t0 = time.perf_counter()
    k_tr = np.asarray(translated.run(a, b).block_until_ready())
    compile_tr = time.perf_counter() - t0
    run_tr = lambda: translated.run(a, b).block_until_ready()  # noqa: E731
    for name, (apply, params) in hand_written.items():
        fn = nt_kernel(apply, implementation)
        t0 = time.perf_counter()
        k_hw = np.asarray(fn(a, b, params).block_until_ready())
        compile_hw = time.perf_counter() - t0
        agree = float(np.linalg.norm(k_tr - k_hw) / np.linalg.norm(k_hw))
        if not agree < 1e-4:
            raise SystemExit(f"{label} {implementation}: the translation's kernel differs from the hand-written "
                             f"{name} one by {agree:.1e}")
        run_hw = lambda: fn(a, b, params).block_until_ready()  # noqa: E731
        t_tr, t_hw, ratio = time_paired(run_tr, run_hw, budget_s)
        size = f"{x1.shape[0]}" + (" (x2 = x1)" if x2 is None else "")
        rows.append((label, implementation, size, name, t_tr, t_hw, ratio, agree, compile_tr, compile_hw))
        print(f"{label:14s} {implementation:24s} N={size:<3s} vs {name:28s} translated {t_tr * 1e3:9.2f} ms  "
              f"hand-written {t_hw * 1e3:9.2f} ms  paired ratio {ratio:.3f}  (agreement {agree:.1e})", flush=True)


def main(argv=None) -> int:
    """The command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of paired timing per comparison")
    parser.add_argument("--naive", action="store_true", help="also time the FCN as x @ W.T (torch's layout)")
    parser.add_argument("--only", choices=("fcn", "cnn"), help="one network only")
    parser.add_argument("--impl", choices=("structured_derivatives", "jacobian_contraction", "ntk_vector_products"),
                        help="one implementation only")
    args = parser.parse_args(argv)

    from ntk_bench import reference  # sets the log level before JAX loads

    reason = reference.available()
    if reason is not None:
        raise SystemExit(reason)

    from ntk_bench.bench.zoo import architectures

    rows = []
    g = torch.Generator().manual_seed(1)
    if args.only in (None, "fcn"):
        model = fcn_model()
        hand = {"x @ W + b, W (in, out)": fcn_hand_written(model)}
        x1, x2 = torch.randn(16, 3072, generator=g), torch.randn(16, 3072, generator=g)
        compare("FCN 3x2048", "structured_derivatives", model, x1, x2, hand, args.budget, rows, args.impl)
        for impl in ("jacobian_contraction", "ntk_vector_products"):
            compare("FCN 3x2048", impl, model, x1[:1], None, hand, args.budget, rows, args.impl)
        if args.naive and args.impl in (None, "structured_derivatives"):
            # one call each at N = M = 4: x @ W.T takes seconds and 2.8 GB there (7.5 GB at N = 16)
            a4, b4 = x1[:4], x2[:4]
            translated = reference.kernel_fn(model, a4, "structured_derivatives", "full", "float32")
            apply, params = fcn_hand_written(model, transposed=False)
            naive = nt_kernel(apply, "structured_derivatives")
            a, b = translated.convert(a4), translated.convert(b4)
            one = {"translated": lambda: translated.run(a, b).block_until_ready(),
                   "x @ W.T": lambda: naive(a, b, params).block_until_ready()}
            seconds = {}
            for name, fn in one.items():
                fn()
                t0 = time.perf_counter()
                fn()
                seconds[name] = time.perf_counter() - t0
            rows.append(("FCN 3x2048", "structured_derivatives", "4", "x @ W.T, W (out, in) (one call each)",
                         seconds["translated"], seconds["x @ W.T"], None, None, None, None))
            print(f"FCN at N = M = 4, one call: translated {seconds['translated'] * 1e3:.0f} ms, hand-written as "
                  f"x @ W.T {seconds['x @ W.T'] * 1e3:.0f} ms", flush=True)
    if args.only in (None, "cnn"):
        arch = architectures.build("tutorial_cnn", seed=0)
        model = arch.model
        x1, x2 = architectures.inputs(arch, 16, seed=1), architectures.inputs(arch, 16, seed=2)
        hand = {"NCHW / OIHW (torch's layout)": cnn_hand_written(model, "NCHW"),
                "NHWC / HWIO (stax's layout)": cnn_hand_written(model, "NHWC")}
        kernel_layout = {**hand, "NCHW / HWIO (stax's kernels)": cnn_hand_written(model, "NCHW", "HWIO")}
        compare("tutorial CNN", "structured_derivatives", model, x1, x2, kernel_layout, args.budget, rows, args.impl)
        compare("tutorial CNN", "jacobian_contraction", model, x1, x2, hand, args.budget, rows, args.impl)
        compare("tutorial CNN", "ntk_vector_products", model, x1[:4], x2[:4], hand, args.budget, rows, args.impl)

    if args.out:
        write_table(args.out, rows, argv if argv is not None else sys.argv[1:])
    return 0


def write_table(path: Path, rows, argv) -> None:
    """The results as Markdown at ``path``: the command, the versions, and a row per comparison."""
    import jax
    import neural_tangents

    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        "# neural-tangents through the torch translation vs hand-written JAX",
        "",
        f"Command: `python scripts/nt_fairness.py {' '.join(argv)}`",
        "",
        f"CPU float32, jitted, compile excluded, `block_until_ready`; jax {jax.__version__}, neural-tangents "
        f"{neural_tangents.__version__ if hasattr(neural_tangents, '__version__') else '0.6.5'}, torch "
        f"{torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads. "
        "Translated and hand-written were timed in alternating blocks in one process (`time_paired`: a b, b a, "
        "...; medians of the blocks); the ratio is the median of the per-pair ratios translated / hand-written. "
        "Agreement: ‖K_translated − K_hand‖/‖K_hand‖.",
        "",
        "| network | implementation | N = M | hand-written as | translated (ms) | hand-written (ms) | "
        "ratio (paired) | agreement | first call translated / hand (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, impl, n, name, t_tr, t_hw, ratio, agree, c_tr, c_hw in rows:
        fmt = lambda v, f: "—" if v is None else format(v, f)  # noqa: E731
        lines.append(f"| {label} | {impl} | {n} | {name} | {fmt(t_tr and t_tr * 1e3, '.2f')} | "
                     f"{fmt(t_hw * 1e3, '.2f')} | {fmt(ratio, '.3f')} | {fmt(agree, '.1e')} | "
                     f"{fmt(c_tr, '.1f')} / {fmt(c_hw, '.1f')} |")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
