"""Where the float64 reference's time goes on a big graph: export, the forward check, tracing neural-tangents'
kernel, XLA's compile and the run, each in wall and process CPU time (a loaded machine inflates wall time).

    python scripts/reference_compile_time.py                       # timm efficientnet_b0, 3x32x32, N = 2
    python scripts/reference_compile_time.py --options '{}' '{"xla_backend_optimization_level": 0}'
    python scripts/reference_compile_time.py --implementations structured_derivatives,jacobian_contraction

Every variant (an implementation, or a dict of XLA compile options) is compiled from the same traced program in
one process, in the order given, and its kernel compared with the first variant's. ``--brute-force`` also checks
the first kernel against the float64 torch brute force (``bench/measurement/bruteforce.py``; minutes on
efficientnet's depthwise convolutions). The machine's load average is printed with every line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class Clock:
    """Wall and process CPU time since the last lap (a loaded machine inflates the first, not the second)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self) -> str:
        """The time since the last lap (or the start) as ``W s (cpu C s)``; starts the next lap."""
        wall, cpu = time.perf_counter(), time.process_time()
        text = f"{wall - self.wall:.1f} s (cpu {cpu - self.cpu:.1f} s)"
        self.wall, self.cpu = wall, cpu
        return text


def main() -> None:
    """The command line: see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet_b0", help="a timm model name (random weights)")
    parser.add_argument("--n", type=int, default=2)
    parser.add_argument("--image", type=int, default=32)
    parser.add_argument("--implementations", default="structured_derivatives")
    parser.add_argument("--options", nargs="*", default=["{}"], help="XLA compile options, one JSON dict each")
    parser.add_argument("--brute-force", action="store_true")
    args = parser.parse_args()

    import numpy as np
    import timm
    import torch

    from ntk_bench import reference
    from ntk_bench.reference import translate

    def load() -> str:
        return f"load {os.getloadavg()[0]:.1f}"

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=10).double().eval()
    x = torch.randn(args.n, 3, args.image, args.image, dtype=torch.float64)
    print(f"{args.model}, x {tuple(x.shape)} float64; {load()}", flush=True)
    clock = Clock()
    prog = translate.program(model, x)
    print(f"export: {clock.lap()}; {load()}", flush=True)
    reason = reference.supports(model, x)
    print(f"forward check: {clock.lap()} ({reason or 'passed'}); {load()}", flush=True)
    if reason:
        return
    params, constants = translate.weights(model, prog)
    first = None
    for implementation in args.implementations.split(","):
        fn = reference.kernel_fn(model, x, implementation, "full", "float64")
        jitted = prog.kernels[(implementation, "full", "float64")]
        a = fn.convert(x)
        clock.lap()
        lowered = jitted.lower(a, None, params, constants)
        print(f"{implementation}: trace {clock.lap()}; {load()}", flush=True)
        for options in map(json.loads, args.options):
            clock.lap()
            compiled = lowered.compile(options or None)
            compile_time = clock.lap()
            k = np.asarray(compiled(a, None, params, constants))
            run_time = clock.lap()
            first = k if first is None else first
            diff = float(np.abs(k - first).max() / np.abs(first).max())
            print(f"{implementation} {options}: compile {compile_time}, run {run_time}, max |k - first| / max |first| "
                  f"{diff:.1e}; {load()}", flush=True)
    if args.brute_force:
        from ntk_bench.bench.measurement import bruteforce

        kb = bruteforce.ntk(model, x, None).numpy()
        err = float(np.linalg.norm(first - kb) / np.linalg.norm(kb))
        print(f"first kernel against the brute force: relative error {err:.1e}; {clock.lap()}", flush=True)


if __name__ == "__main__":
    main()
