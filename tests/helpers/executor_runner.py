"""A runner under a chosen executor, for the executor tests: ``python executor_runner.py KIND SWEEP.json OUT``.

Runs the sweep file with the fault plugins loaded (``runner_faults``) in this process, the way the CLI does,
with the executor built small for a test machine (a Ray cluster of one CPU, a 100 MB object store, no
dashboard); prints the run's summary as one JSON line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ntk_bench import implementations
from ntk_bench.bench import sweeps
from ntk_bench.bench.execution import runner
from ntk_bench.bench.execution.executors import make_executor

OPTIONS = {
    "local": {},
    "submitit-local": {"max_parallel": 1},
    "ray": {"init_kwargs": {"address": "local", "num_cpus": 1, "object_store_memory": 100 * 2**20,
                            "include_dashboard": False, "_node_ip_address": "127.0.0.1"}},
}


def main() -> None:
    kind, sweep, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    implementations.load_module("runner_faults")
    cases = sweeps.expand(sweeps.load(str(sweep)))
    executor = make_executor(kind, out, **OPTIONS[kind])
    summary = runner.run(cases, out, "faults", executor=executor, plugins=("runner_faults",))
    print(json.dumps({"interrupted": summary.interrupted, "counts": summary.counts}), flush=True)


if __name__ == "__main__":
    main()
