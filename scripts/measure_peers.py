"""Time the peer libraries against our plugins on a few zoo models, in rounds that alternate in one process.

    PYTHONPATH=$PWD python scripts/measure_peers.py --out results/DATE-peers-cpu [--budget 20] [--threads 1]

Per case (CPU, float32, x2 = None so that nngeometry takes part, full mode): every implementation is
called once to warm up and checked against a float64 ``autograd_loop`` kernel of the same model (≤ 1e-4);
then rounds of one call each, in an order that rotates and reverses from round to round, until the
budget is spent (at least 5 rounds); an implementation whose first call took longer than --slow seconds is
timed on that call alone. Peers are timed through ``prepare``: their set-up is outside the timed call.
Writes ``peers_timing.md`` (median seconds, and the median over rounds of each time / the time of
``structured`` in the same round, or of ``jacobian_contraction`` where ``structured`` declines: "JC") and
``peers_timing.jsonl`` (every round's time).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from ntk_bench import implementations
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations.core.base import UnsupportedModelError

OURS = ("structured", "jacobian_contraction", "auto")
PEERS = ("asdl", "nngeometry", "curvlinops", "laplace")
BASELINES = ("structured", "jacobian_contraction")  # the ratios are to the first of these that ran
CASES = [
    ("mlp", dict(in_features=100, width=256, depth=2, out=10), (8, 32)),
    ("cnn", dict(channels=8, image=16, out=10), (8, 32)),
    ("tutorial_cnn", {}, (8,)),
    ("mlp_layernorm", dict(in_features=32, width=64, depth=2, out=10), (8, 32)),
    ("lstm", dict(features=8, seq=16, hidden=32, out=10), (8,)),
    ("resnet18", dict(image=32, out=10), (4,)),
]


def _fn(name, model, x):
    plugin = implementations.get(name)
    reason = plugin.supports(model)
    if reason is not None:
        raise UnsupportedModelError(reason)
    if plugin.origin == "peer":
        run, to_torch = plugin.prepare(model, x, None, "full")
        return run, to_torch
    return (lambda: plugin.compute(model, x, None, "full")), (lambda out: out)


def measure_case(arch_name, params, n, budget_s, slow_s):
    """One model at one N: each plugin and peer checked against the float64 autograd-loop kernel, then timed in
    alternating rounds for about ``budget_s`` seconds (one call only for those slower than ``slow_s``); the rows."""
    arch = architectures.build(arch_name, seed=0, **params)
    model = arch.model
    x = architectures.inputs(arch, n, seed=1)
    # the reference: the plainest kernel (one autograd.grad per sample and output), in float64
    ref = implementations.get("autograd_loop").compute(model.double(), x.double(), None, "full")
    model.float()
    rows, fns = {}, {}
    for name in OURS + PEERS:
        row = rows[name] = {"arch": arch_name, "params": params, "N": n, "O": arch.num_outputs,
                            "P": arch.num_parameters, "impl": name}
        try:
            t0 = time.perf_counter()
            run, to_torch = _fn(name, model, x)
            row["setup_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            k = to_torch(run())
            row["first_s"] = time.perf_counter() - t0
            row["rel_err"] = float(torch.linalg.vector_norm(k.double() - ref) / torch.linalg.vector_norm(ref))
            if name == "auto":
                row["auto_pick"] = implementations.get("auto").last_choice[0]
            if row["rel_err"] > 1e-4:
                row["status"] = "mismatch"
            elif row["first_s"] > slow_s:
                row["status"], row["median_s"] = "slow: one call", row["first_s"]
            else:
                row["status"], fns[name] = "ok", run
        except UnsupportedModelError as exc:
            row["status"], row["reason"] = "unsupported", str(exc)
        except Exception as exc:  # a row, not a crash: say what failed
            row["status"], row["reason"] = "error", f"{type(exc).__name__}: {exc}"[:300]
    names = list(fns)
    times = {name: [] for name in names}
    deadline, r = time.perf_counter() + budget_s, 0
    while names and (r < 5 or time.perf_counter() < deadline):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
        r += 1
    base = next((b for b in BASELINES if b in times), None)
    for name in names:
        rows[name].update(median_s=statistics.median(times[name]), rounds=r, times_s=times[name])
        if base is not None:
            rows[name]["baseline"] = base
            rows[name]["over_baseline"] = statistics.median(a / b for a, b in zip(times[name], times[base]))
    return list(rows.values())


def table(rows):
    """The rows as the Markdown table of peers_timing.md: median times, and each one over structured's (or
    jacobian_contraction's where structured declines)."""
    lines = ["| model | N | O | P | " + " | ".join(OURS + PEERS) + " |",
             "|---|---|---|---|" + "---|" * len(OURS + PEERS)]
    for key in dict.fromkeys((r["arch"], r["N"]) for r in rows):
        case = {r["impl"]: r for r in rows if (r["arch"], r["N"]) == key}
        first = next(iter(case.values()))
        cells = []
        for name in OURS + PEERS:
            r = case[name]
            if r["status"] == "ok":
                cell = f"{r['median_s'] * 1e3:.3g} ms"
                if "over_baseline" in r and name != r["baseline"]:
                    cell += f" ({r['over_baseline']:.2g}×{'' if r['baseline'] == 'structured' else ' JC'})"
                if name == "auto":
                    cell += f" [{r['auto_pick']}]"
            elif r["status"] == "slow: one call":
                cell = f"{r['median_s']:.3g} s (1 call)"
            elif r["status"] == "mismatch":
                cell = f"mismatch {r['rel_err']:.1e}"
            else:
                cell = r["status"]
            cells.append(cell)
        lines.append(f"| {key[0]} | {key[1]} | {first['O']} | {first['P']:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    """The command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=20.0, help="seconds of alternating rounds per case")
    ap.add_argument("--slow", type=float, default=5.0, help="time only one call of an implementation slower than this")
    ap.add_argument("--only", help="comma-separated architectures")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    rows = []
    with open(out / "peers_timing.jsonl", "w") as f:
        f.write(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                            "machine": platform.platform()}) + "\n")
        for arch_name, params, ns in CASES:
            if args.only and arch_name not in args.only.split(","):
                continue
            for n in ns:
                case_rows = measure_case(arch_name, params, n, args.budget, args.slow)
                for r in case_rows:
                    f.write(json.dumps(r) + "\n")
                    f.flush()
                rows += case_rows
                print(table(case_rows).splitlines()[-1], flush=True)
    reasons = sorted({(r["impl"], r["arch"], r.get("reason", "")) for r in rows
                      if r["status"] in ("unsupported", "error")})
    text = [table(rows), "", "Declined or failed:", ""] + [f"- {i} on {a}: {why}" for i, a, why in reasons]
    (out / "peers_timing.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))


if __name__ == "__main__":
    main()
