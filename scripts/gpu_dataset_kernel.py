"""On a GPU: the trace kernel of the tutorial CNN on N CIFAR-size inputs (default 50 000: a 50k x 50k float32
kernel, 10 GB on disk), through ``kernel_matrix`` on one device, for at most --seconds; prints the rate (kernel
entries per second) and the time the whole kernel would take at that rate. Run it again with the same --kernel
path to go on where it stopped (the kernel resumes).

    python scripts/gpu_dataset_kernel.py --kernel /scratch/K.zarr --out $OUT --seconds 480

Random inputs stand in for CIFAR-10 (a kernel's cost does not depend on the pixel values; no download here).
A Python without the package's dependencies needs zarr (``pip install zarr`` or a carried wheelhouse); without
neural-tangents the verification uses the harness's float64 Jacobian contraction.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def main() -> int:
    """The command line: see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=50_000)
    p.add_argument("--tile", type=int, default=2048)
    p.add_argument("--kernel", required=True, help="the kernel's directory (large: on local disk, not under $OUT)")
    p.add_argument("--out", required=True, help="where the JSON summary goes")
    p.add_argument("--seconds", type=float, default=480)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    import torch

    import ntk_bench
    from ntk_bench.bench.zoo import architectures

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    model, shape = architectures.tutorial_cnn()
    x = torch.randn(a.N, *shape, generator=torch.Generator().manual_seed(1))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    def entries_done():
        if not Path(a.kernel, "zarr.json").is_file():
            return 0
        k = ntk_bench.open_kernel(a.kernel)
        return sum((s.stop - s.start) * (t.stop - t.start) for s, t in
                   (k.tile_slices(i, j) for i, j in k.tiles() if k.done(i, j)))

    before = entries_done()  # a resumed kernel: the rate counts this run's tiles only
    started = time.perf_counter()
    summary = {"N": a.N, "tile": a.tile, "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else
               "cpu", "torch": torch.__version__}

    def report(final: bool):
        if not Path(a.kernel, "zarr.json").is_file():
            summary.update({"elapsed_s": time.perf_counter() - started, "tiles_done": 0, "complete": False,
                            "note": "stopped before the first tile (plan, backend choice)"})
            (Path(a.out) / "gpu_dataset_kernel.json").write_text(json.dumps(summary, indent=1))
            print(json.dumps(summary), flush=True)
            return
        k = ntk_bench.open_kernel(a.kernel)
        done = len(k.tiles()) - len(k.missing())
        entries = entries_done() - before
        elapsed = time.perf_counter() - started
        total_entries = sum((s.stop - s.start) * (t.stop - t.start) for s, t in
                            (k.tile_slices(i, j) for i, j in k.tiles()))  # the upper triangle's tiles
        summary.update({"tiles_done": done, "tiles": len(k.tiles()), "elapsed_s": elapsed,
                        "entries_per_s": entries / elapsed if elapsed else None,
                        "whole_kernel_s_at_this_rate": total_entries / (entries / elapsed) if entries else None,
                        "complete": final})
        (Path(a.out) / "gpu_dataset_kernel.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(summary), flush=True)

    def stop_at_deadline():
        time.sleep(a.seconds)
        report(final=False)
        os._exit(0)

    threading.Thread(target=stop_at_deadline, daemon=True).start()
    ntk_bench.kernel_matrix(model, x, mode="trace", out=a.kernel, tile=a.tile, device=a.device, verify=3,
                            progress=True)
    report(final=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
