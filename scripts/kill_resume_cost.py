"""What a kill and a resume cost: ``ntk-bench kernel`` on the tutorial CNN with local workers, run whole, and run
again SIGKILLed (the driver) once about half the tiles are recorded and then resumed; the work of the two against
the whole run's.

    python scripts/kill_resume_cost.py --N 512 --tile 64 --workers 2 --out results/DIR [--repeats 2]

Each run is the command line (``python -m ntk_bench kernel --executor local``), a child of this script. Its process
tree (driver and workers) is sampled every 0.1 s for CPU seconds (user + system, per process, the last sample kept;
the killed driver's workers are reaped by this script, their CPU exact to their end: they die with the driver). The kill
comes half a mean interval between tile records after the threshold is reached, so that tiles are in flight. The tile
records (``KernelArray.tile_info``) give each finished tile's seconds and CPU seconds, and the cumulative CPU of
the worker that wrote it: a worker's CPU at the kill minus its CPU at its last record is the work in flight, lost.
On a shared machine CPU seconds are the fair number (wall seconds depend on the load); both are written.

Writes ``OUT/kill_resume.jsonl`` (a row per run) and prints a summary: tile CPU seconds of the whole run against
the killed run's recorded tiles plus the resumed run's, the CPU lost in flight, and the processes' CPU in all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

FACTORIES = '''
import torch

from ntk_bench.bench.zoo import architectures


def model():
    torch.manual_seed(0)
    return architectures.tutorial_cnn()[0].eval()


def data():
    return torch.randn({n}, 3, 32, 32, generator=torch.Generator().manual_seed({n}))
'''


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--N", type=int, default=512)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--budget-gib", type=float, default=2.0, help="per worker")
    p.add_argument("--kill-at", type=float, default=0.5,
                   help="kill once this fraction of the tiles is recorded (0: whole runs only, no kill)")
    p.add_argument("--repeats", type=int, default=1, help="whole runs (their spread is the noise)")
    p.add_argument("--factors-disk", default="default",
                   help="comma-separated variants of the blocks' factors on disk (ntk-bench kernel --factors-disk): "
                        "default (the command's default), or GiB (0: none on disk); each variant runs its whole "
                        "runs (alternating with the other variants) and its own kill and resume")
    p.add_argument("--out", required=True)
    return p.parse_args()


class Tree:
    """CPU seconds of a process and its descendants, sampled; a process's last sample is kept after it ends."""

    def __init__(self, pid: int):
        import psutil

        self.root, self.cpu, self.names = psutil.Process(pid), {}, {}

    def sample(self) -> None:
        import psutil

        try:
            procs = [self.root] + self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self.cpu[p.pid] = t.user + t.system
                if p.pid not in self.names:
                    self.names[p.pid] = "driver" if p.pid == self.root.pid else "worker"
            except psutil.NoSuchProcess:
                pass

    def total(self, who: str | None = None) -> float:
        return sum(c for pid, c in self.cpu.items() if who is None or self.names.get(pid) == who)


def _tiles(out: Path) -> dict:
    from ntk_bench.bench.store.kernel_store import open_kernel

    if not (out / "zarr.json").is_file():
        return {}
    k = open_kernel(out)
    return {f"{i}-{j}": info for i, j in k.tiles() if (info := k.tile_info(i, j)) is not None}


def _run(cmd, env, out: Path, kill_at: int | None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tree, killed, first, kill_time = Tree(proc.pid), None, None, None
    while proc.poll() is None:
        tree.sample()
        done = sum(1 for p in (out / "tiles").iterdir() if not p.name.startswith(".")) \
            if (out / "tiles").is_dir() else 0
        now = time.perf_counter()
        if done and first is None:
            first = now
        if kill_at is not None and kill_time is None and done >= kill_at:
            # not right after a record (nothing would be in flight): half the mean interval between records later
            kill_time = now + 0.5 * (now - first) / max(1, done - 1)
        if kill_time is not None and now >= kill_time:
            tree.sample()
            workers = [pid for pid, who in tree.names.items() if who == "worker"]
            proc.send_signal(signal.SIGKILL)
            killed = time.perf_counter() - t0
            proc.wait()
            # The workers die with the driver (their parent-death signal) once the driver has exited, which under
            # load is a while after the signal: their CPU is read when they are reaped (this script is their
            # subreaper), exact to their end, not from the last sample.
            deadline = time.time() + 60
            while workers and time.time() < deadline:
                try:
                    pid, _, usage = os.wait4(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    time.sleep(0.01)
                    continue
                if pid in workers:
                    tree.cpu[pid] = usage.ru_utime + usage.ru_stime
                    workers.remove(pid)
            break
        time.sleep(0.1)
    log = proc.stdout.read() if proc.stdout else ""
    wall = time.perf_counter() - t0
    tiles = _tiles(out)
    row = {"wall_s": wall, "returncode": proc.returncode, "killed_at_s": killed,
           "cpu_s": tree.total(), "driver_cpu_s": tree.total("driver"), "workers_cpu_s": tree.total("worker"),
           "workers": {str(pid): c for pid, c in tree.cpu.items() if tree.names.get(pid) == "worker"},
           "tiles_recorded": len(tiles), "log_tail": log[-600:]}
    return row, tiles


def _tile_sums(tiles: dict, pids=None) -> dict:
    chosen = [t for t in tiles.values() if pids is None or t.get("pid") in pids]
    return {"tiles": len(chosen), "tile_s": sum(t["seconds"] for t in chosen),
            "tile_cpu_s": sum(t["cpu_s"] for t in chosen)}


def _subreaper() -> None:
    """Orphaned descendants (the killed driver's workers) become this process's children, reaped with their CPU."""
    import ctypes

    PR_SET_CHILD_SUBREAPER = 36
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def main() -> int:
    args = _args()
    _subreaper()
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    facts = root / f"cnn_{args.N}.py"
    facts.write_text(FACTORIES.format(n=args.N))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    work = root / "kernels"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()

    def cmd(out, disk):
        extra = [] if disk == "default" else ["--factors-disk", disk]
        return [sys.executable, "-m", "ntk_bench", "kernel", "--model", f"{facts}:model", "--data", f"{facts}:data",
                "--mode", "trace", "--out", str(out), "--tile", str(args.tile), "--executor", "local",
                "--workers", str(args.workers), "--memory-budget", str(args.budget_gib), "--verify", "-1",
                "--impl", "structured", "--no-progress", *extra]

    bands = -(-args.N // args.tile)
    n_tiles = bands * (bands + 1) // 2  # the upper triangle
    variants = [v.strip() for v in args.factors_disk.split(",") if v.strip()]
    rows = []

    def record(kind, disk, row, tiles, out, **extra):
        from ntk_bench.bench.store.kernel_store import open_kernel

        run = {}
        if kind != "killed" and (out / "zarr.json").is_file():  # the phases of a run that completed
            runs = (open_kernel(out).attrs.get("timings") or {}).get("runs") or []
            run = runs[-1] if runs else {}
        row = {"run": kind, "factors_disk": disk, "N": args.N, "tile": args.tile, "workers": args.workers,
               "tiles_total": n_tiles, "load": os.getloadavg(), **_tile_sums(tiles), **extra,
               **{k: run[k] for k in ("blocks_recorded", "blocks_read", "blocks_written", "disk_s", "factors_s",
                                      "contract_s") if k in run}, **row}
        rows.append(row)
        with open(root / "kill_resume.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "workers")}), flush=True)
        return row

    wholes = {v: [] for v in variants}
    for r in range(args.repeats):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            out = work / f"whole-{v}-{r}.zarr"
            row, tiles = _run(cmd(out, v), env, out, None)
            wholes[v].append(record("whole", v, row, tiles, out))
    import numpy as np

    from ntk_bench.bench.store.kernel_store import open_kernel

    ok = True
    for v in variants if args.kill_at > 0 else []:
        out = work / f"killed-{v}.zarr"
        row, tiles_killed = _run(cmd(out, v), env, out, max(1, round(args.kill_at * n_tiles)))
        kept = sorted(p.name for p in (out / "factors").glob("*.pt")) if (out / "factors").is_dir() else []
        # The work in flight: each worker's CPU at the kill beyond its CPU at the last tile it recorded (all of it for
        # a worker that recorded none: its start-up and the row's factors included).
        lost = {}
        for pid, cpu in row["workers"].items():
            mine = [t["process_cpu_s"] for t in tiles_killed.values() if str(t.get("pid")) == pid]
            lost[pid] = cpu - (max(mine) if mine else 0.0)
        killed = record("killed", v, row, tiles_killed, out, lost_in_flight_cpu_s=sum(lost.values()),
                        lost_per_worker=lost, factors_kept_at_kill=kept)
        row, tiles_all = _run(cmd(out, v), env, out, None)
        resumed_tiles = {k: t for k, t in tiles_all.items() if k not in tiles_killed}
        unchanged = all(tiles_all.get(k) == t for k, t in tiles_killed.items())
        resumed = record("resumed", v, row, resumed_tiles, out, killed_tiles_unchanged=unchanged)
        # (each new kernel times its own oneDNN choice: compared with a whole run of the same variant and choice)
        same = [w for w in sorted(work.glob(f"whole-{v}-*.zarr"))
                if open_kernel(w).attrs.get("onednn") == open_kernel(out).attrs.get("onednn")]
        equal = bool(np.array_equal(np.asarray(open_kernel(out)), np.asarray(open_kernel(same[0])))) if same else None
        whole_tile_cpu = [w["tile_cpu_s"] for w in wholes[v]]
        whole_cpu = [w["cpu_s"] for w in wholes[v]]
        summary = {
            "run": "summary", "factors_disk": v, "N": args.N, "tile": args.tile, "workers": args.workers,
            "tiles_total": n_tiles, "killed_after_tiles": killed["tiles"], "resumed_tiles": resumed["tiles"],
            "bit_equal_to_whole": equal, "killed_tiles_not_recomputed": unchanged,
            "factors_kept_at_kill": len(kept), "resumed_blocks_recorded": resumed.get("blocks_recorded"),
            "resumed_blocks_read": resumed.get("blocks_read"),
            "whole_blocks_recorded": [w.get("blocks_recorded") for w in wholes[v]],
            "whole_tile_cpu_s": whole_tile_cpu, "killed_plus_resumed_tile_cpu_s": killed["tile_cpu_s"] +
            resumed["tile_cpu_s"], "lost_in_flight_cpu_s": killed["lost_in_flight_cpu_s"],
            "mean_tile_cpu_s": sum(whole_tile_cpu) / len(whole_tile_cpu) / n_tiles,
            "whole_process_cpu_s": whole_cpu, "killed_plus_resumed_process_cpu_s": killed["cpu_s"] + resumed["cpu_s"],
            "whole_wall_s": [w["wall_s"] for w in wholes[v]], "killed_plus_resumed_wall_s": killed["wall_s"] +
            resumed["wall_s"],
        }
        with open(root / "kill_resume.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
        print(json.dumps(summary, indent=1), flush=True)
        ok = ok and equal is not False and unchanged
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
