"""The `real` sweep's cases against a committed baseline run, robustly to the machine's load: is any case slower?

    PYTHONPATH=. python scripts/real_regression.py ratio  [--cases ...] [--root OLD_CHECKOUT] [--out DIR]
    PYTHONPATH=. python scripts/real_regression.py interleaved --old-root OLD_CHECKOUT [--cases ...] [--rounds 15]
        [--procs 2] [--out DIR]
    PYTHONPATH=. python scripts/real_regression.py oldnew --old-root OLD_CHECKOUT [--cases ...] [--pairs 7] [--out DIR]
    PYTHONPATH=. python scripts/real_regression.py --list

Each case is one of the `real` sweep (bench/sweeps/real.toml) with two plugins: our fastest there and
neural-tangents' fastest there, as the baseline run (``--baseline``, default results/2026-11-23-real-cpu-4) found
them (``auto`` left out). Everything is timed on process CPU time with one compute thread (torch and XLA alike), so
that the time other processes hold the cores is not counted.

``ratio``: per case, a fresh process times ours and neural-tangents' peer (its prepared, jitted run, as the runner
times it) in alternating rounds (as ``paired.time_rounds`` did before its per-block warm-up: these cases' calls
take tenths of a second to seconds) after two warm-up calls each; the median over rounds of
ours / peer with its 95% band (``paired.median_band``) is set against the baseline's ratio. The baseline's ratio is
the ratio of two medians from separate processes of that run (wall clock, two threads), not a paired ratio: a
weak comparison, given for orientation. ``--root OLD_CHECKOUT`` times the old code's plugins the same way (the
peer is neural-tangents either way), for a paired old ratio taken on the same day.

``oldnew``: the direct check. Per case, our plugin on the code of ``--old-root`` (a checkout of the baseline's
commit) and on this checkout, in fresh processes that alternate old, new / new, old; each warms up (its first call)
and times ``--calls`` blocks of warm calls. The per-pair ratio new / old has a 95% band over the pairs: a band
wholly below 1 is faster, wholly above 1 slower, around 1 the same within the band. Both kernels' norms are
printed (the same model, seed and inputs: they must agree).

``interleaved``: the direct check with finer alternation. Per case and per process pair (``--procs``), one warm
process on each checkout; the parent asks them in turn for a block of warm calls (``--block-s``; the other process
waits idle), the order reversed every round, for ``--rounds`` rounds: adjacent blocks seconds apart instead of
fresh processes a minute apart, so that a load that comes and goes hits both alike. The band is over all rounds
of all pairs; each pair's own median ratio is printed too.

Rows go to ``DIR/ratio.jsonl`` / ``DIR/oldnew.jsonl`` as each case finishes and a table to stdout.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# id: (arch, params as the sweep builds it, N, our fastest, neural-tangents' fastest) in the baseline run
CASES = {
    "mlp": ("mlp", {"depth": 3, "in_features": 3072, "out": 8, "width": 2048}, 16,
            "explicit_mlp", "nt_structured_derivatives"),
    "tutorial_cnn": ("tutorial_cnn", {}, 16, "structured", "nt_structured_derivatives"),
    "resnet18_32": ("resnet18", {"image": 32, "out": 10}, 8, "structured", "nt_structured_derivatives"),
    "resnet18_224": ("resnet18", {"image": 224, "out": 10}, 4, "structured", "nt_structured_derivatives"),
    "vit_tiny": ("vit_tiny", {"heads": 4, "hidden": 64, "image": 32, "layers": 4, "mlp": 128, "out": 10,
                              "patch": 4}, 16, "structured", "nt_jacobian_contraction"),
    "text_transformer": ("text_transformer", {"d_model": 64, "ff": 128, "heads": 4, "layers": 2, "out": 10,
                                              "seq": 32, "vocab": 1000}, 16, "structured", "nt_jacobian_contraction"),
    "lstm": ("lstm", {"features": 16, "hidden": 64, "out": 10, "seq": 32}, 16,
             "jacobian_contraction", "nt_structured_derivatives"),
}
SLOW = {"resnet18_224"}  # seconds a call: oldnew runs at most 5 pairs of it
SLOW_CALL_S = 1.0
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NTK_BENCH_XLA_THREADS": "1"}


def median_band(values, level: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): the distribution-free confidence band of the median (order statistics k and n+1-k),
    as ``bench.measurement.paired.median_band`` (repeated here so that a child on an old checkout needs nothing
    from it)."""
    xs = sorted(values)
    n = len(xs)
    med = statistics.median(xs)
    k, tail = 0, 0.0
    while k < n // 2:
        nxt = tail + math.comb(n, k) / 2 ** n
        if nxt > (1 - level) / 2:
            break
        tail, k = nxt, k + 1
    return (med, xs[0], xs[-1]) if k == 0 else (med, xs[k - 1], xs[n - k])


def baseline(run: Path) -> dict[str, dict]:
    """case id -> the baseline run's medians (and blocks) of its two plugins and their ratio."""
    rows = list(csv.DictReader((run / "results.csv").open()))
    out = {}
    for cid, (arch, params, n, ours, peer) in CASES.items():
        got = {}
        for r in rows:
            if r["arch"] == arch and int(r["N"]) == n and r["status"] == "ok" and r["impl"] in (ours, peer) \
                    and {k: v for k, v in json.loads(r["arch_params"]).items() if k != "out"} \
                    == {k: v for k, v in params.items() if k != "out"}:
                got[r["impl"]] = (float(r["time_median_s"]), json.loads(r["time_blocks_s"]))
        if ours in got and peer in got:
            (mo, bo), (mp, bp) = got[ours], got[peer]
            out[cid] = {"ours_s": mo, "peer_s": mp, "ratio": mo / mp,
                        "blocks_range": (min(bo) / max(bp), max(bo) / min(bp)),
                        "code": rows[0].get("code_sha1")}
    return out


# --- children (fresh processes) ---------------------------------------------------------------------------------

def _imports():
    """(architectures, implementations.get, keep_freed_memory) from whichever layout the checkout has."""
    from ntk_bench.implementations import get
    try:
        from ntk_bench.bench.zoo import architectures
    except ImportError:  # the layout before bench/ was split into subpackages
        from ntk_bench.bench import architectures
    try:
        from ntk_bench.bench.execution.worker import _keep_freed_memory
    except ImportError:
        from ntk_bench.bench.worker import _keep_freed_memory
    return architectures, get, _keep_freed_memory


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def child_time(cid: str, plugin: str, calls: int, block_s: float) -> dict:
    """One plugin on one case in this fresh process: the first call, then ``calls`` blocks of warm calls."""
    import torch

    torch.set_num_threads(1)
    architectures, get, keep = _imports()
    keep()
    arch_name, params, n, _, _ = CASES[cid]
    arch = architectures.build(arch_name, **params)
    x = architectures.inputs(arch, n)
    run, to_torch = get(plugin).prepare(arch.model, x, None, "full")
    c0 = time.process_time()
    k = to_torch(run())
    first = time.process_time() - c0
    c0 = time.process_time()
    run()
    one = time.process_time() - c0
    number = max(1, math.ceil(block_s / max(one, 1e-6)))
    if one > SLOW_CALL_S:  # seconds a call: fewer of them, the second call counted as the first block
        calls = min(calls, 3)
    times = [one] if number == 1 else []
    while len(times) < calls:
        c0 = time.process_time()
        for _ in range(number):
            run()
        times.append((time.process_time() - c0) / number)
    k = k.double()
    return {"case": cid, "plugin": plugin, "first_cpu_s": first, "warm_cpu_s": times, "per_block": number,
            "median_cpu_s": statistics.median(times), "kernel_norm": float(k.norm()),
            "kernel_sum": float(k.sum()), "peak_rss_gib": _peak_rss_gib(), "load": os.getloadavg()}


def child_serve(cid: str, plugin: str, block_s: float) -> None:
    """One plugin on one case in this fresh process, warmed up, then a block of warm calls per ``run`` line read
    from stdin (its CPU seconds per call printed as a JSON line), until ``quit`` or the end of stdin."""
    import torch

    torch.set_num_threads(1)
    architectures, get, keep = _imports()
    keep()
    arch_name, params, n, _, _ = CASES[cid]
    arch = architectures.build(arch_name, **params)
    x = architectures.inputs(arch, n)
    run, to_torch = get(plugin).prepare(arch.model, x, None, "full")
    c0 = time.process_time()
    k = to_torch(run()).double()
    first = time.process_time() - c0
    c0 = time.process_time()
    run()
    number = max(1, math.ceil(block_s / max(time.process_time() - c0, 1e-6)))
    print(json.dumps({"first_cpu_s": first, "per_block": number, "kernel_norm": float(k.norm())}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            break
        c0 = time.process_time()
        for _ in range(number):
            run()
        print(json.dumps({"cpu_s": (time.process_time() - c0) / number}), flush=True)
    print(json.dumps({"peak_rss_gib": _peak_rss_gib()}), flush=True)


class _Server:
    """A ``child_serve`` process on one checkout."""

    def __init__(self, root: Path, cid: str, plugin: str, block_s: float):
        env = dict(os.environ, PYTHONPATH=str(root), **ONE_THREAD)
        self.proc = subprocess.Popen([sys.executable, __file__, "--child-serve", cid, plugin, "--block-s",
                                      str(block_s)], env=env, cwd=root, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        while True:  # (a line some library printed is skipped)
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"child_serve exited ({self.proc.wait()})")
            if line.startswith("{"):
                return json.loads(line)

    def block(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._read()["cpu_s"]

    def close(self) -> dict:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        out = self._read()
        self.proc.wait()
        return out


def _rounds(calls: dict, budget_s: float, max_rounds: int, min_rounds: int = 7, block_s: float = 0.05):
    """({name: per-round CPU seconds per call}, {name: calls per block}): rounds of one block each, the order
    reversed every other round, until ``budget_s`` CPU seconds are spent (as ``paired.time_rounds``, without its
    per-block warm-up, on the process's CPU time; here so that a child on an old checkout needs nothing from it)."""
    number = {}
    for name, fn in calls.items():
        c0 = time.process_time()
        fn()
        number[name] = max(1, math.ceil(block_s / max(time.process_time() - c0, 1e-6)))
    names, times = list(calls), {name: [] for name in calls}
    start, r = time.process_time(), 0
    while r < min_rounds or (r < max_rounds and time.process_time() - start < budget_s):
        for name in (names if r % 2 == 0 else names[::-1]):
            c0 = time.process_time()
            for _ in range(number[name]):
                calls[name]()
            times[name].append((time.process_time() - c0) / number[name])
        r += 1
    return times, number


def child_ratio(cid: str, budget_s: float, max_rounds: int) -> dict:
    """Ours against the peer on one case, in alternating rounds in this fresh process."""
    import torch

    torch.set_num_threads(1)
    architectures, get, keep = _imports()
    keep()
    arch_name, params, n, ours, peer = CASES[cid]
    arch = architectures.build(arch_name, **params)
    x = architectures.inputs(arch, n)
    calls, first, kernels = {}, {}, {}
    for name in (ours, peer):
        run, to_torch = get(name).prepare(arch.model, x, None, "full")
        c0 = time.process_time()
        kernels[name] = to_torch(run()).double()
        first[name] = time.process_time() - c0
        run()
        calls[name] = run
    rel = float((kernels[ours] - kernels[peer]).norm() / kernels[peer].norm())
    times, number = _rounds(calls, budget_s, max_rounds)
    ratios = [a / b for a, b in zip(times[ours], times[peer])]
    return {"case": cid, "ours": ours, "peer": peer, "first_cpu_s": first, "times_s": times, "per_block": number,
            "median_s": {k: statistics.median(v) for k, v in times.items()}, "ratio": median_band(ratios),
            "rounds": len(ratios), "rel_err_ours_vs_peer": rel, "peak_rss_gib": _peak_rss_gib(),
            "load": os.getloadavg()}


# --- parent ------------------------------------------------------------------------------------------------------

def _spawn(root: Path, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root), **ONE_THREAD)
    res = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, cwd=root)
    if res.returncode != 0:
        raise RuntimeError(f"child {args} on {root} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _verdict(band: tuple[float, float, float]) -> str:
    if band[2] < 1:
        return "faster"
    if band[1] > 1:
        return "slower"
    return "same within band"


def _fmt(b) -> str:
    return f"{b[0]:.3f} [{b[1]:.3f}-{b[2]:.3f}]"


def _append(out: Path | None, name: str, row: dict) -> None:
    if out:
        out.mkdir(parents=True, exist_ok=True)
        with (out / name).open("a") as f:
            f.write(json.dumps(row) + "\n")


def cmd_ratio(args, base: dict) -> None:
    print("| case | ours | nt | ours CPU ms | nt CPU ms | ours/nt paired (95% band) | rounds | baseline ours/nt "
          "(medians, blocks' range) | agreement |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cid in args.cases:
        root = Path(args.root).resolve() if args.root else ROOT
        row = _spawn(root, ["--child-ratio", cid, "--budget-s", str(args.budget_s), "--max-rounds", str(args.max_rounds)])
        row["baseline"] = base.get(cid)
        row["root"] = str(root)
        row["uptime_after"] = os.getloadavg()
        _append(args.out, "ratio.jsonl", row)
        b = base.get(cid) or {}
        bl = f"{b['ratio']:.3f} ({b['blocks_range'][0]:.3f}-{b['blocks_range'][1]:.3f})" if b else "-"
        print(f"| {cid} | {row['ours']} | {row['peer']} | {row['median_s'][row['ours']] * 1e3:.1f} | "
              f"{row['median_s'][row['peer']] * 1e3:.1f} | {_fmt(row['ratio'])} | {row['rounds']} | {bl} | "
              f"{row['rel_err_ours_vs_peer']:.1e} |", flush=True)


def cmd_interleaved(args) -> None:
    old = Path(args.old_root).resolve()
    print("| case | plugin | old CPU ms | new CPU ms | new/old paired (95% band) | rounds x process pairs | "
          "per pair | first call old / new CPU s | kernel norm old / new | verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cid in args.cases:
        plugin = CASES[cid][3]
        procs = args.slow_procs if cid in SLOW else args.procs
        rounds = min(args.rounds, 7) if cid in SLOW else args.rounds
        times, per_pair, ready, closed = {"old": [], "new": []}, [], {"old": [], "new": []}, []
        for i in range(procs):
            servers = {}
            for side in (("old", "new") if i % 2 == 0 else ("new", "old")):  # warmed up one after the other
                servers[side] = _Server(old if side == "old" else ROOT, cid, plugin, args.block_s)
                ready[side].append(servers[side].ready)
            got = {"old": [], "new": []}
            for r in range(rounds):
                for side in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    got[side].append(servers[side].block())
            closed.append({side: srv.close() for side, srv in servers.items()})
            per_pair.append(statistics.median(n / o for o, n in zip(got["old"], got["new"])))
            for side in got:
                times[side] += got[side]
        ratios = [n / o for o, n in zip(times["old"], times["new"])]
        band = median_band(ratios)
        med = {s: statistics.median(v) for s, v in times.items()}
        first = {s: statistics.median(r["first_cpu_s"] for r in v) for s, v in ready.items()}
        norm = {s: v[0]["kernel_norm"] for s, v in ready.items()}
        row = {"case": cid, "plugin": plugin, "old_root": str(old), "ratio_new_over_old": band,
               "verdict": _verdict(band), "median_cpu_s": med, "first_cpu_s": first, "kernel_norm": norm,
               "times_s": times, "per_pair_ratio": per_pair, "ready": ready, "closed": closed,
               "load_after": os.getloadavg()}
        _append(args.out, "interleaved.jsonl", row)
        print(f"| {cid} | {plugin} | {med['old'] * 1e3:.1f} | {med['new'] * 1e3:.1f} | {_fmt(band)} | "
              f"{rounds} x {procs} | {', '.join(f'{x:.3f}' for x in per_pair)} | "
              f"{first['old']:.2f} / {first['new']:.2f} | {norm['old']:.6g} / {norm['new']:.6g} | "
              f"{row['verdict']} |", flush=True)


def cmd_oldnew(args) -> None:
    old = Path(args.old_root).resolve()
    print("| case | plugin | old CPU ms (median of pairs) | new CPU ms | new/old paired (95% band) | pairs | "
          "first call old / new CPU s | kernel norm old / new | verdict |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cid in args.cases:
        plugin = CASES[cid][3]
        sides = {"old": [], "new": []}
        for i in range(min(args.pairs, 5) if cid in SLOW else args.pairs):
            for side in (("old", "new") if i % 2 == 0 else ("new", "old")):
                sides[side].append(_spawn(old if side == "old" else ROOT,
                                          ["--child-time", cid, plugin, "--calls", str(args.calls),
                                           "--block-s", str(args.block_s)]))
        ratios = [n["median_cpu_s"] / o["median_cpu_s"] for o, n in zip(sides["old"], sides["new"])]
        band = median_band(ratios)
        med = {s: statistics.median(r["median_cpu_s"] for r in v) for s, v in sides.items()}
        first = {s: statistics.median(r["first_cpu_s"] for r in v) for s, v in sides.items()}
        norm = {s: v[0]["kernel_norm"] for s, v in sides.items()}
        row = {"case": cid, "plugin": plugin, "old_root": str(old), "ratio_new_over_old": band,
               "verdict": _verdict(band), "median_cpu_s": med, "first_cpu_s": first, "kernel_norm": norm,
               "runs": sides, "load_after": os.getloadavg()}
        _append(args.out, "oldnew.jsonl", row)
        print(f"| {cid} | {plugin} | {med['old'] * 1e3:.1f} | {med['new'] * 1e3:.1f} | {_fmt(band)} | "
              f"{len(ratios)} | {first['old']:.2f} / {first['new']:.2f} | {norm['old']:.6g} / {norm['new']:.6g} | "
              f"{row['verdict']} |", flush=True)


def main() -> None:
    """The command line: see the module docstring."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="?", choices=("ratio", "oldnew", "interleaved"))
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--baseline", type=Path, default=ROOT / "results" / "2026-11-23-real-cpu-4")
    ap.add_argument("--old-root", help="a checkout of the baseline run's commit (oldnew)")
    ap.add_argument("--root", help="ratio: time the plugins of this checkout instead (the baseline's commit)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--budget-s", type=float, default=20.0, help="ratio: CPU-seconds of rounds per case (at least 7)")
    ap.add_argument("--max-rounds", type=int, default=21)
    ap.add_argument("--pairs", type=int, default=7, help="oldnew: fresh-process pairs per case")
    ap.add_argument("--calls", type=int, default=5, help="oldnew: timed blocks per process")
    ap.add_argument("--block-s", type=float, default=0.1, help="oldnew: fast calls repeated to about this long")
    ap.add_argument("--rounds", type=int, default=15, help="interleaved: rounds per process pair")
    ap.add_argument("--procs", type=int, default=2, help="interleaved: process pairs per case")
    ap.add_argument("--slow-procs", type=int, default=1, help="interleaved: process pairs of the slow case")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--child-serve", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--child-ratio", help=argparse.SUPPRESS)
    ap.add_argument("--child-time", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (args.child_ratio or args.child_serve or args.child_time) and hasattr(os, "sched_setaffinity"):
        # One core for the child, held before anything starts a thread: an old checkout reads no
        # NTK_BENCH_XLA_THREADS, and XLA sizes its pool by the cores the process may use.
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if args.child_ratio:
        print(json.dumps(child_ratio(args.child_ratio, args.budget_s, args.max_rounds)))
        return
    if args.child_serve:
        child_serve(args.child_serve[0], args.child_serve[1], args.block_s)
        return
    if args.child_time:
        print(json.dumps(child_time(args.child_time[0], args.child_time[1], args.calls, args.block_s)))
        return
    base = baseline(args.baseline)
    if args.list or not args.what:
        for cid, (arch, params, n, ours, peer) in CASES.items():
            b = base.get(cid)
            print(cid, arch, json.dumps(params), f"N={n}", ours, peer,
                  f"baseline {b['ours_s'] * 1e3:.1f} / {b['peer_s'] * 1e3:.1f} ms = {b['ratio']:.3f}" if b else "")
        return
    print(f"load {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)
    if args.what == "ratio":
        cmd_ratio(args, base)
    else:
        if not args.old_root:
            raise SystemExit(f"{args.what} needs --old-root (a checkout of the baseline's commit)")
        (cmd_oldnew if args.what == "oldnew" else cmd_interleaved)(args)
    print(f"load {os.getloadavg()}, {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", flush=True)


if __name__ == "__main__":
    main()
