"""Per-phase log-log slopes and the cost model's prediction beside the measured time, from the rows that
``scripts/dataset_kernel.py`` wrote.

    python scripts/dataset_kernel_slopes.py results/2026-12-07-dataset-kernel-4 [more folders]

Reads every ``*/dataset_kernel.jsonl`` under the folders given (ours only); the prediction is ``kernel_matrix``'s
(``auto.predict`` for the plugin at that N and budget, the kernel's ``predicted_s``), computed again here for rows
written before the script recorded it.
"""

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def predicted(model_name, n, budget):
    from ntk_bench import implementations
    from ntk_bench.bench.execution import kernel_matrix as km
    from ntk_bench.bench.execution.tiles import Inputs
    from ntk_bench.bench.zoo import architectures

    torch.manual_seed(0)
    if model_name == "cnn":
        model, shape = architectures.tutorial_cnn()
        plugin = implementations.get("structured")
    else:
        model, shape = architectures.mlp(in_features=3072, width=2048, depth=3, out=8)
        plugin = implementations.get("explicit_mlp")
    x = Inputs(torch.randn(n, *shape), "x")
    return km._predicted_s(plugin, model.eval(), x, None, "trace", "cpu", torch.float32, budget)


def main():
    rows = []
    for f in sorted(p for d in sys.argv[1:] for p in Path(d).glob("*/dataset_kernel.jsonl")):
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if "ours" in r:
                rows.append((f"{f.parent.parent.name}/{f.parent.name}", r))
    by_model = {}
    for where, r in rows:
        o = r["ours"]
        pred = o.get("predicted_s") or predicted(r["model"], r["N"], r["budget_bytes"])
        print(f"{where} {r['model']} N={r['N']} tile={o['tile']} budget={r['budget_bytes'] / 2**30:g} GiB: "
              f"CPU {o['cpu_s']:.1f} s, wall {o['wall_s']:.1f} s, predicted {pred:.1f} s; phases CPU s: " +
              ", ".join(f"{k} {o[k]:.1f}" for k in ("factors_cpu_s", "contract_cpu_s", "whole_tiles_cpu_s",
                                                    "disk_cpu_s") if o.get(k)) +
              f"; blocks recorded/read/written {o.get('blocks_recorded')}/{o.get('blocks_read')}/"
              f"{o.get('blocks_written')}; load {r['load_before'][0]:.1f}-{r['load_after'][0]:.1f}")
        kind = "factors kept" if o.get("factors_cpu_s") else "whole tiles"
        by_model.setdefault((where.split("/")[0], r["model"], o["tile"], kind), []).append(o | {"N": r["N"]})
    for (folder, model, tile, kind), os_ in by_model.items():
        os_ = sorted(os_, key=lambda o: o["N"])
        for k in ("factors_cpu_s", "contract_cpu_s", "disk_cpu_s", "whole_tiles_cpu_s", "cpu_s"):
            pts = [(o["N"], o[k]) for o in os_ if o.get(k)]
            if len(pts) < 2:
                continue
            steps = ", ".join(f"{a[0]}->{b[0]}: {math.log(b[1] / a[1]) / math.log(b[0] / a[0]):.2f}"
                              for a, b in zip(pts, pts[1:]))
            print(f"{folder}: {model} tile {tile} ({kind}): log-log slope of {k} over N = {[n for n, _ in pts]}: "
                  f"{math.log(pts[-1][1] / pts[0][1]) / math.log(pts[-1][0] / pts[0][0]):.2f} first to last "
                  f"(steps {steps})")


if __name__ == "__main__":
    main()
