"""The regression gate's timing: ``python benchmarks/regression.py --out DIR`` (``make benchmark-save``/``-compare``).

A thin caller of the package's timer, ``python -m ntk_bench.bench.measurement.gate`` (process CPU time, one thread, blocks
pooled from fresh processes; its docstring says why), with this folder's small sweep ``regression.toml`` as the
default ``--sweep``. Every other option is the gate's.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from a checkout: time the checkout's ntk_bench
    sys.path.insert(0, str(HERE.parent))


def main(argv=None) -> int:
    """The regression gate's timer (``gate.main``) on ``benchmarks/regression.toml`` unless ``--sweep`` names another
    sweep."""
    from ntk_bench.bench.measurement import gate

    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--sweep" or a.startswith("--sweep=") for a in argv):
        argv += ["--sweep", str(HERE / "regression.toml")]
    return gate.main(argv)


if __name__ == "__main__":
    sys.exit(main())
