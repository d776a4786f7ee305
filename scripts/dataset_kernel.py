"""The trace kernel of a dataset: ours (``kernel_matrix``, tiles on disk) against neural-tangents' structured
derivatives under ``nt.batch`` on the same translated model, and our per-phase times against N.

    python scripts/dataset_kernel.py --model cnn --N 256,512,1024 --out results/DIR [--threads 1]

Both sides run in this process, alternating (ours, nt, nt, ours: the better of two each), at the same thread count
(torch ``set_num_threads``; neural-tangents on as many cores: ``NTK_BENCH_XLA_THREADS``), float32, trace mode.
neural-tangents' time excludes its compilation (``nt.batch`` is called once first on the same shapes, then
timed); ours is a fresh kernel each time (its plan and the oneDNN choice included), its tile phases recorded
(``factors_s``: the per-sample forward/backward work, ``contract_s``: the contractions). The peak resident memory
of each call is sampled, and each call's process CPU time (``cpu_s``) is recorded beside its wall time: on a shared
machine the CPU time is the fairer number. ``--side ours`` or ``--side nt`` runs one side alone in this process,
so its peak memory above the process's baseline (``baseline_rss_bytes``) is that side's alone. Writes ``OUT/dataset_kernel.jsonl`` (a row per model and N) and ``OUT/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("cnn", "mlp"), default="cnn",
                   help="cnn: the tutorial CNN (3x32x32, O=10); mlp: 3 x Dense(2048), input 3072, O=8")
    p.add_argument("--N", default="256,512", help="comma-separated N = M")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-gib", type=float, default=4.0, help="our memory budget")
    p.add_argument("--nt-batch", type=int, default=256, help="nt.batch's batch size (divides N)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (ours, nt) in alternating order")
    p.add_argument("--no-nt", action="store_true", help="ours only (the phase slopes); the same as --side ours")
    p.add_argument("--verify", type=int, default=3,
                   help="tiles our first round verifies in float64 besides the first (-1: none, so that its memory is "
                        "the tiles' alone: the check imports neural-tangents)")
    p.add_argument("--side", choices=("ours", "nt", "both"), default="both",
                   help="which side this process runs: both (alternating, default), or one alone (its memory above "
                        "this process's baseline, without the other side's buffers)")
    p.add_argument("--factors-disk", type=float, default=None, metavar="GIB",
                   help="disk our blocks' factors may take beside the kernel (kernel_matrix's factors_disk_bytes; "
                        "default: its default, 0: none)")
    p.add_argument("--nt-warmup-rows", type=int, default=0,
                   help="compile nt.batch on the first ROWS inputs (the same block shapes) instead of a whole first "
                        "call on N (0: the whole first call, timed as nt_first_call_s)")
    return p.parse_args()


class PeakRSS:
    """The process's peak resident memory during a block, sampled every 20 ms."""

    def __enter__(self):
        import psutil

        self._p, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.peak = self.start = self._p.memory_info().rss

        def watch():
            while not self._stop.wait(0.02):
                self.peak = max(self.peak, self._p.memory_info().rss)

        self._t = threading.Thread(target=watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._p.memory_info().rss)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _model(name):
    import torch

    from ntk_bench.bench.zoo import architectures

    torch.manual_seed(0)
    if name == "cnn":
        model, shape = architectures.tutorial_cnn()
    else:
        model, shape = architectures.mlp(in_features=3072, width=2048, depth=3, out=8)
    return model.eval(), shape


def main() -> int:
    """The command line: see the module docstring."""
    args = _args()
    os.environ["NTK_BENCH_XLA_THREADS"] = str(args.threads)  # neural-tangents on as many cores as torch's threads
    import numpy as np
    import torch

    import ntk_bench

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, shape = _model(args.model)
    budget = int(args.budget_gib * (1 << 30))
    if args.no_nt:
        args.side = "ours"
    rows = []
    for n in [int(v) for v in args.N.split(",")]:
        x = torch.randn(n, *shape, generator=torch.Generator().manual_seed(n))
        row = {"model": args.model, "N": n, "threads": args.threads, "mode": "trace", "dtype": "float32",
               "budget_bytes": budget, "factors_disk_gib": args.factors_disk, "side": args.side, "load_before": os.getloadavg(),
               "baseline_rss_bytes": _rss()}
        ours, nt_times = [], []
        nt_call = None if args.side == "ours" else _nt_batched(model, x, min(args.nt_batch, n))
        if nt_call is not None:
            t0, c0 = time.perf_counter(), time.process_time()
            if args.nt_warmup_rows:
                _nt_batched(model, x[:args.nt_warmup_rows], min(args.nt_batch, n))()
                row["nt_warmup"] = {"rows": args.nt_warmup_rows, "wall_s": time.perf_counter() - t0,
                                    "cpu_s": time.process_time() - c0}
            else:
                nt_call()
                row["nt_first_call_s"] = time.perf_counter() - t0
                row["nt_first_call_cpu_s"] = time.process_time() - c0
            row["baseline_rss_after_nt_setup_bytes"] = _rss()
        for r in range(args.rounds):
            order = ("ours", "nt") if r % 2 == 0 else ("nt", "ours")
            for side in order:
                if (side == "nt" and nt_call is None) or (side == "ours" and args.side == "nt"):
                    continue
                with tempfile.TemporaryDirectory(dir=out) as d, PeakRSS() as mem:
                    t0, c0 = time.perf_counter(), time.process_time()
                    if side == "ours":
                        k = ntk_bench.kernel_matrix(model, x, mode="trace", out=Path(d) / "K.zarr",
                                                    memory_budget_bytes=budget, progress=False,
                                                    factors_disk_bytes=None if args.factors_disk is None else
                                                    int(args.factors_disk * (1 << 30)),
                                                    verify=args.verify if r == 0 else -1)
                        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
                        run = k.attrs["timings"]["runs"][-1]
                        ours.append({"wall_s": wall, "cpu_s": cpu, "peak_rss_bytes": mem.peak,
                                     "start_rss_bytes": mem.start, "round": r, "verified": r == 0 and args.verify >= 0,
                                     "plugin": k.attrs["plugin"], "tile": k.tile,
                                     "predicted_s": k.attrs.get("predicted_s"), **run})
                        if r == 0 and args.verify >= 0:
                            row["verification"] = k.attrs["verification"]["worst_rel_error"]
                        if r == 0:
                            kern = np.asarray(k)
                    else:
                        kn = nt_call()
                        nt_times.append({"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0,
                                         "peak_rss_bytes": mem.peak, "start_rss_bytes": mem.start, "round": r})
                print(json.dumps({"N": n, "round": r, "side": side,
                                  **(ours if side == "ours" else nt_times)[-1]}, default=str), flush=True)
        if ours:
            best = min(ours, key=lambda o: o["wall_s"])
            row.update({"ours": best, "ours_all_s": [o["wall_s"] for o in ours],
                        "ours_all_cpu_s": [o["cpu_s"] for o in ours], "ours_rounds": ours})
        if nt_times:
            nb = min(nt_times, key=lambda o: o["wall_s"])
            row.update({"nt": nb, "nt_all_s": [o["wall_s"] for o in nt_times],
                        "nt_all_cpu_s": [o["cpu_s"] for o in nt_times], "nt_rounds": nt_times})
        if ours and nt_times:
            row.update({"ours_over_nt": best["wall_s"] / nb["wall_s"],
                        "ours_over_nt_cpu": min(o["cpu_s"] for o in ours) / min(o["cpu_s"] for o in nt_times),
                        "max_rel_diff_vs_nt": float(np.abs(kern - np.asarray(kn)).max() / np.abs(kern).max())})
        row["load_after"] = os.getloadavg()
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(out / "dataset_kernel.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    if len(rows) >= 2:
        ns = np.log([r["N"] for r in rows])
        for phase in ("factors_s", "contract_s", "whole_tiles_s"):
            ts = [r["ours"].get(phase, 0) if "ours" in r else 0 for r in rows]
            if all(t > 0 for t in ts):
                slope = np.polyfit(ns, np.log(ts), 1)[0]
                print(f"log-log slope of {phase} over N = {[r['N'] for r in rows]}: {slope:.2f}")
    return 0


def _nt_batched(model, x, batch):
    """neural-tangents' structured derivatives of the translated model under nt.batch (compiled on first call)."""
    import jax
    import numpy as np

    from ntk_bench import reference
    from ntk_bench.reference import translate

    nt = reference._nt()
    if x.shape[0] % batch:
        raise SystemExit(f"nt.batch needs batch sizes dividing N: {batch} does not divide {x.shape[0]}")
    prog = reference._checked_program(model, x[:2])
    params, constants = translate.weights(model, prog, np.dtype("float32"))
    apply_fn = translate.JaxFunction(prog, constants, np.dtype("float32"))
    fn = nt.empirical_ntk_fn(apply_fn, trace_axes=(-1,), vmap_axes=0,
                             implementation=nt.NtkImplementation.STRUCTURED_DERIVATIVES)
    batched = nt.batch(fn, batch_size=batch, store_on_device=False)
    xs = jax.device_put(x.numpy().astype(np.float32), jax.devices("cpu")[0])
    o = jax.eval_shape(apply_fn, params, xs[:1]).shape[-1]

    def call():
        return np.asarray(batched(xs, None, params)) * o  # nt's trace is a mean over outputs

    return call


if __name__ == "__main__":
    sys.exit(main())
