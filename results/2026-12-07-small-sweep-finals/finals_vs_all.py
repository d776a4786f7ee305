"""Per paired group of a run: the fastest peer's time over our fastest, from the rounds of all (``times_s``) and from
the two's own rounds after them (``final_times_s``), with their 95% bands, and each finalist's median both ways.

    PYTHONPATH=. python results/2026-12-07-small-sweep-finals/finals_vs_all.py results/2026-12-07-small-sweep-finals
"""

import json
import statistics
import sys
from pathlib import Path

from ntk_bench.bench.measurement import paired


def main(run: Path) -> None:
    print("| group | ours / peer (finalists) | peer / ours, rounds of all | peer / ours, their own rounds | "
          "ours median all / own | peer median all / own |")
    print("|---|---|---|---|---|---|")
    for rec in paired.read_records(run).values():
        final = rec.get("final_times_s")
        if not final:
            continue
        ours, peer = paired.finalists(rec["median_s"])
        all_ = paired.ratio(rec, peer, ours)
        own = paired.ratio(rec, peer, ours, final=True)
        params = json.loads(rec["arch_params"])
        name = f"{rec['arch']} {','.join(f'{k}={v}' for k, v in sorted(params.items()) if k != 'out')} N={rec['N']}"
        m = {k: statistics.median(v) for k, v in final.items()}
        print(f"| {name} | {ours} / {peer} | {paired.fmt_ratio(all_)} | {paired.fmt_ratio(own)} | "
              f"{rec['median_s'][ours] / m[ours]:.3f} | {rec['median_s'][peer] / m[peer]:.3f} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
