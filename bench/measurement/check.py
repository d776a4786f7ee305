"""ntk-bench check [PLUGIN ...] [--plugin MODULE_OR_FILE] [--quick | --problems IDS] [--dtype D] [--junit FILE]

The correctness suite for a plugin (yours): the kernels of every problem of the zoo and the real zoo it supports,
in the three modes, with x2 = None and N != M, float64 against the reference (neural-tangents where it is
installed and takes the model, else the harness's brute-force float64 kernel; each case records which) and
float32 against that float64 reference; the model, its .grads, hooks and the inputs left as found; every
ill-defined model (train-mode BatchNorm, Dropout, ...) refused with IllDefinedKernelError. A decline is a skip;
a plugin that declines every problem fails.

Exit codes: 0 when every case passes, 1 when one fails (a wrong kernel in one mode, on one model, a broken
contract), 2 for a usage error (an unknown plugin or problem, a plugin module that fails to import).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DTYPES = ("float64", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``check`` command's arguments (argparse only: building the parser imports no torch)."""
    parser.add_argument("plugins", nargs="*", metavar="PLUGIN",
                        help="registered plugin names (default: those --plugin loads, else every plugin registered "
                             "from outside ntk-bench through the ntk_bench.plugins entry point group)")
    parser.add_argument("--plugin", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import package.module or path/to/file.py and register its plugins (repeatable)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--quick", action="store_true",
                       help="a small subset: 7 problems, no torchvision needed (--list-problems marks them)")
    which.add_argument("--problems", type=lambda t: [v.strip() for v in t.split(",") if v.strip()], metavar="IDS",
                       help="comma-separated problem ids or globs (mlp-*); --list-problems shows them")
    parser.add_argument("--dtype", choices=DTYPES, action="append",
                        help="check this dtype only (repeatable; default both)")
    parser.add_argument("--device", default="cpu", help="where the plugin computes: cpu, cuda or cuda:K "
                                                        "(the reference is computed on the CPU)")
    parser.add_argument("--reference", choices=("auto", "harness"), default="auto",
                        help="auto (default): neural-tangents where it is installed and takes the model, else the "
                             "harness's brute-force float64 kernel; harness: the brute force always")
    parser.add_argument("--junit", metavar="FILE", help="also write the cases as JUnit XML to FILE")
    parser.add_argument("--list-problems", action="store_true", help="list the problems and exit")
    return parser


def _print_problems() -> None:
    from . import problems as zoo

    for p in zoo.ALL_PROBLEMS:
        modes = "full" if p.id in zoo.FULL_MODE_ONLY else "full, trace, diagonal"
        print(f"{p.id:<52} {'quick' if p.id in zoo.QUICK else '':<6} {modes}")


def run(args) -> int:
    """The ``check`` command: 0 when every case passes, 1 when one fails, 2 for a usage error."""
    if args.list_problems:
        _print_problems()
        return EXIT_OK
    import torch

    from . import correctness

    try:
        if args.device != "cpu" and (not args.device.startswith("cuda") or not torch.cuda.is_available()):
            raise correctness.UsageError(f"--device {args.device}: expected cpu, or cuda[:K] on a machine with CUDA")
        loaded = correctness.load_plugins(args.plugin)
        plugins = correctness.resolve_plugins(args.plugins, loaded)
        problems = correctness.select_problems(args.quick, args.problems)
    except correctness.UsageError as exc:
        print(f"ntk-bench check: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    dtypes = tuple(dict.fromkeys(args.dtype or DTYPES))
    references = correctness.References(use_neural_tangents=args.reference == "auto")
    if references.unavailable is None:
        ref_words = "neural-tangents (float64) where it takes the model, else the harness's brute-force float64 kernel"
    else:
        ref_words = f"the harness's brute-force float64 kernel ({references.unavailable})"
    results = []
    for plugin in plugins:
        print(f"ntk-bench check {plugin.name}: {len(problems)} problem(s) in every mode, {', '.join(dtypes)}, on "
              f"{args.device}; then the contract. Reference: {ref_words}", flush=True)
        results += correctness.check_plugin(
            plugin, problems, dtypes, args.device, references,
            progress=lambda title, batch: print(correctness.progress_line(title, batch), flush=True))
    print()
    for plugin in plugins:
        print("\n".join(correctness.summary(results, plugin.name)))
    failed = [p.name for p in plugins if any(r.plugin == p.name and r.status in ("failed", "error") for r in results)]
    if args.junit:
        from ntk_bench.version import __version__

        try:
            correctness.write_junit(results, Path(args.junit), {
                "ntk_bench_version": __version__, "torch": torch.__version__, "device": args.device,
                "reference": args.reference})
        except OSError as exc:
            print(f"ntk-bench check: error: --junit {args.junit}: {exc.strerror or exc}", file=sys.stderr)
            return EXIT_USAGE
        print(f"JUnit XML: {args.junit}")
    print(f"check {'FAILED' if failed else 'passed'}: {len(plugins) - len(failed)} of {len(plugins)} plugin(s) pass"
          + (f" (failing: {', '.join(failed)})" if failed else ""), flush=True)
    return EXIT_FAILED if failed else EXIT_OK
