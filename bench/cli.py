"""ntk-bench run | report | compare | check | kernel | list | calibrate   (also: python -m ntk_bench ...)

Exit codes of ``run``: 0 when every case's last row passes; 1 when a row has a
status named by ``--fail-on`` (default ``mismatch,error``) or, with
``--require-reference``, a computed row was not checked against
neural-tangents; 2 for a usage error (an invalid sweep, an unusable run
directory, a device this machine lacks), before any work; 130 after Ctrl-C
(143 after SIGTERM, 129 after SIGHUP), the finished rows kept for ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from ntk_bench.durations import fmt_duration
from ntk_bench.modes import MODES

log = logging.getLogger("ntk_bench")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
EXIT_SIGHUP = 129


# -- argument types: one clear line for a bad value -------------------------------------------------------

def _number(text: str, what: str, allow_zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def seconds(text: str) -> float:
    return _number(text, "a positive finite number of seconds")


def gib(text: str) -> float:
    return _number(text, "a positive finite number of GiB")


def minutes(text: str) -> float:
    return _number(text, "a finite number of minutes, 0 or more", allow_zero=True)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(text: str) -> list[int]:
    """``3,32,32`` -> [3, 32, 32] (positive integers)."""
    try:
        values = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def int_range(text: str) -> list[int]:
    """``0,100`` -> [0, 100] (integer ids in [low, high))."""
    try:
        low, high = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH (integers), got {text!r}") from None
    if low >= high:
        raise argparse.ArgumentTypeError(f"expected LOW < HIGH, got {text!r}")
    return [low, high]


def key_value(text: str) -> tuple[str, object]:
    """``width=64`` -> ("width", 64): the value read as JSON when it is JSON (numbers, true/false), else a string."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported in one line (and where to find the usage)."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- output ------------------------------------------------------------------------------------------------

class _Formatter(logging.Formatter):
    def format(self, record):
        text = record.getMessage()
        if record.exc_info:  # (logged at debug level only: -v)
            text = f"{text}\n{self.formatException(record.exc_info)}"
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


def setup_logging(verbosity: int = 0, stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_Formatter())
    root = logging.getLogger("ntk_bench")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbosity > 0 else logging.WARNING if verbosity < 0 else logging.INFO)
    root.propagate = False


def _refuse(exc: BaseException) -> int:
    """A command's input refused: its message, one log line per line, and with ``-v`` the traceback (a ValueError
    from a bug inside looks the same as one from bad input; the traceback tells them apart)."""
    for line in str(exc).splitlines() or [type(exc).__name__]:
        log.error("%s", line)
    log.debug("raised here:", exc_info=exc)
    return EXIT_USAGE


def fmt_seconds(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "?"
    if s >= 1:
        return f"{s:.3g} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def row_line(row: dict, done: int, total: int, eta_s: float | None) -> str:
    """``[ 12/363] ok          2.31 ms ± 0.08 ms  <case id>  ETA 4m12s`` (the error for a row that is not ok)."""
    status = row.get("status", "?")
    timing = ""
    if row.get("time_median_s") is not None:
        timing = f"{fmt_seconds(row['time_median_s'])} ± {fmt_seconds(row.get('time_iqr_s'))}"
    width = len(str(total))
    line = f"[{done:>{width}}/{total}] {status:<11} {timing:<22} {row.get('case_id')}"
    if row.get("error") and status != "ok":
        line += f"  ({str(row['error'])[:200]})"
    if eta_s is not None:
        line += f"  ETA {fmt_duration(eta_s)}"
    return line


def tally(counts: dict) -> str:
    from .execution.runner import STATUSES

    order = [s for s in STATUSES if s in counts] + sorted(s for s in counts if s not in STATUSES)
    return ", ".join(f"{counts[s]} {s}" for s in order) or "no rows"


class LineReporter:
    """A line per finished case (CI logs, --no-progress)."""

    def start(self, total, todo, slots):
        log.info("%d of %d cases to run, %d at a time", todo, total, slots)

    def row(self, row, done, total, eta_s):
        log.info("%s", row_line(row, done, total, eta_s))

    def note(self, message, level=logging.WARNING):
        log.log(level, "%s", message)

    def finish(self, summary):
        pass


def can_show_bar(stream) -> bool:
    """A terminal that can draw a progress bar: a tty that reports a width (some report 0 columns)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class BarReporter(LineReporter):
    """A progress bar on a terminal, with the ETA from the cost model; rows that are not ok printed above it."""

    def __init__(self):
        self.bar = None

    def start(self, total, todo, slots):
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=total - todo, unit="case", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")

    def row(self, row, done, total, eta_s):
        if row.get("status") not in ("ok", "unsupported"):
            self.bar.write(row_line(row, done, total, None))
        self.bar.set_postfix_str(f"ETA {fmt_duration(eta_s)}" if eta_s is not None else "", refresh=False)
        self.bar.update()

    def note(self, message, level=logging.WARNING):
        if self.bar is not None:
            self.bar.write(_Formatter().format(logging.LogRecord("ntk_bench", level, "", 0, message, None, None)))
        else:
            super().note(message, level)

    def finish(self, summary):
        if self.bar is not None:
            self.bar.close()


# -- commands -------------------------------------------------------------------------------------------

def _cmd_list(args) -> int:
    from ntk_bench import implementations

    from . import sweeps
    from .zoo import architectures

    print("plugins (ours):", ", ".join(implementations.names("ours")))
    print("peers:", ", ".join(implementations.names("peer")))
    print("architectures:", ", ".join(architectures.names()))
    print("sweeps:")
    for name, spec in sweeps.SWEEPS.items():
        print(f"  {name:10s} {len(sweeps.expand(spec))} cases  {spec.get('description', '')}")
    print(f"default sweep here: {sweeps.default_sweep_name()}")
    return EXIT_OK


def _load_plugins(modules) -> None:
    from ntk_bench import implementations

    from .execution.executors import process

    if modules and os.getcwd() not in sys.path:  # a plugin module in the working directory imports, here and in workers
        sys.path.insert(0, os.getcwd())
        process.PLUGIN_PATHS.append(os.getcwd())
        log.info("--plugin: the current directory %s is on the import path of the runner and its workers",
                 os.getcwd())
    for module in modules:
        try:
            implementations.load_module(module)
        except Exception as exc:  # the user's module: say which and why, in one line
            raise ValueError(f"--plugin {module}: {type(exc).__name__}: {exc}") from None


def _model_spec(args) -> dict:
    """A one-entry sweep for ``--model`` (a one-off run of your own model): our plugins, neural-tangents' three
    and the peers that take seconds at most (``--impls all`` for every one)."""
    from . import sweeps
    from .zoo import architectures

    entry = {"factory": args.model, "N": args.N or [4]}
    if args.name:
        entry["name"] = args.name
    if args.param:
        entry["params"] = dict(args.param)
    if args.O:
        entry["O"] = args.O
    if args.eval:
        entry["eval"] = True
    if args.inputs_factory:
        entry["inputs_factory"] = args.inputs_factory
    elif args.input_shape:
        inputs = {"shape": args.input_shape, "dtype": args.input_dtype}
        if args.input_range:
            inputs["range"] = args.input_range
        entry["inputs"] = inputs
    name = args.name or architectures.split_factory_ref(args.model)[1]
    return {"name": name, "impls": sweeps.MODEL_IMPLS, "modes": [args.mode], "dtypes": [args.dtype], "devices": [args.device],
            "time_budget_s": 0.3, "timeout_s": 300, "arch": [entry]}


def _executor(args, out: Path, cases):
    from .execution.executors import make_executor

    kind = args.executor
    if kind == "local":
        devices = args.devices
        if devices == ["all"]:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if count == 0:
                raise ValueError("--devices all: CUDA is not available here")
            devices = [f"cuda:{k}" for k in range(count)]
        if devices:
            import torch

            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            bad = [d for d in devices if d.startswith("cuda") and (count == 0 or int(d.split(":")[1]) >= count)]
            if bad:
                raise ValueError(f"--devices {','.join(bad)}: this machine has {count} CUDA device(s)")
        # Every job on the CPU clock holds neural-tangents to one core (executors.base._cpu_clock_cores); the CPU
        # workers also start with it, so that JAX starts there for the references they compute first, and XLA's
        # pool is one thread, not one per core taking turns on the one.
        one_core = any(c.clock == "cpu" for c in cases) and "NTK_BENCH_XLA_THREADS" not in os.environ
        return make_executor("local", out, workers=args.workers, devices=devices,
                             cuda_cases=any(c.device != "cpu" for c in cases),
                             cpu_env={"NTK_BENCH_XLA_THREADS": "1"} if one_core else None)
    if kind == "inline":
        return make_executor("inline", out)
    if kind == "ray":
        return make_executor("ray", out, address=args.address, cpus_per_task=args.cpus_per_task)
    options = {"cpus_per_task": args.cpus_per_task, "gpus_per_task": args.gpus_per_task,
               "time_limit_min": args.time_limit, "max_parallel": args.max_parallel or (
                   args.workers if kind == "submitit-local" else 64),
               "partition": args.partition, "mem_gb": args.mem_gb, "slurm_params": dict(args.slurm_param or []),
               "jobs_per_task": args.jobs_per_task}
    return make_executor(kind, out, **options)


def _resume_command(argv: list[str]) -> str:
    import shlex

    words = ["ntk-bench", *argv]
    if "--resume" not in words:
        words.append("--resume")
    return " ".join(shlex.quote(w) for w in words)


def resolve_clock(clock: str, cuda_available: bool | None = None) -> str:
    """The clock a run times with: ``auto`` is ``cpu`` on a machine without CUDA (most likely a shared CPU runner,
    where two torch threads on cores others hold wait for each other and the wall clock measures the waiting) and
    ``wall`` where CUDA is present (its cases keep the wall clock anyway); ``wall`` and ``cpu`` as given."""
    if clock != "auto":
        return clock
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    chosen = "wall" if cuda_available else "cpu"
    log.info("clock: %s (--clock auto: %s)", chosen,
             "CUDA present" if cuda_available else "no CUDA device, process CPU time with one torch thread; "
                                                   "--clock wall for the wall clock")
    return chosen


def _cmd_run(args) -> int:
    import dataclasses

    from . import sweeps
    from .execution import runner

    try:
        _load_plugins(args.plugin or [])
        if args.model:
            if args.sweep_given:
                raise sweeps.SweepError("give --sweep or --model, not both")
            spec = _model_spec(args)
        else:
            spec = sweeps.load(args.sweep)
        cases = sweeps.expand(spec, args.impls.split(",") if args.impls else None)
        changes = {}
        if args.timeout is not None:
            changes["timeout_s"] = args.timeout
        if args.memory_budget is not None:
            changes["memory_budget_bytes"] = int(args.memory_budget * 2**30)
        clock = resolve_clock(args.clock)
        if clock != "wall":
            changes["clock"] = clock
        if changes:
            cases = [dataclasses.replace(c, **changes) for c in cases]
        out = Path(args.out or f"results/{spec['name']}")
        if out.exists() and not out.is_dir():
            raise runner.RunDirError(f"--out {out}: is a file, not a directory")
        if out.is_symlink() and not out.exists():
            raise runner.RunDirError(f"--out {out}: is a symbolic link to {os.readlink(out)}, which does not exist")
        if args.executor == "local":
            sweeps.check_devices(cases)
        from .measurement import envcheck

        envcheck.startup_seconds(), envcheck.worker_env(), envcheck.xla_threads()  # a bad value: one line, first
        log.info("checking the sweep: %d cases; building each model once", len(cases))
        models = sweeps.check_models(cases)
    except (sweeps.SweepError, ValueError, runner.RunDirError) as exc:
        return _refuse(exc)
    reporter = LineReporter() if args.no_progress or not can_show_bar(sys.stderr) else BarReporter()
    try:
        executor = _executor(args, out, cases)
    except ValueError as exc:
        return _refuse(exc)
    except Exception as exc:  # the engine could not be reached or started (Ray's address, submitit): one line
        log.error("cannot start the %s executor: %s: %s", args.executor, type(exc).__name__,
                  str(exc).strip().splitlines()[0] if str(exc).strip() else "")
        return EXIT_USAGE
    from .execution.forecast import announce

    announce(cases, models, executor.slots, out, args.resume)
    try:
        summary = runner.run(cases, out, spec["name"], executor=executor, resume=args.resume, force=args.force,
                             retry_failed=args.retry_failed, deadline_s=None if args.deadline is None else args.deadline * 60,
                             plugins=tuple(args.plugin or ()), reporter=reporter, models=models, check_devices=False)
    except (sweeps.SweepError, runner.RunDirError, ValueError, ImportError) as exc:
        executor.close()
        return _refuse(exc)
    done = len(summary.rows)
    if summary.interrupted:
        log.warning("interrupted (%s): %d of %d cases done; resume with: %s", summary.interrupted, done,
                    summary.total, _resume_command(args.argv))
    elif summary.deadline_hit:
        log.warning("deadline reached: %d of %d cases done; finish with: %s", done, summary.total,
                    _resume_command(args.argv))
    took = "" if summary.nothing_to_do else f"; this run: {summary.ran} row(s) in {fmt_duration(summary.elapsed_s)}"
    log.info("%s: %d of %d cases: %s%s", summary.path, done, summary.total, tally(summary.counts), took)
    if summary.interrupted:
        return {"SIGTERM": EXIT_SIGTERM, "SIGHUP": EXIT_SIGHUP, "SIGINT": EXIT_SIGINT,
                "SIGINT twice": EXIT_SIGINT}.get(summary.interrupted, EXIT_FAILED)  # else the executor was lost
    return _verdict(summary, args)


def _verdict(summary, args) -> int:
    failing = {s: n for s, n in summary.counts.items() if s in args.fail_on}
    code = EXIT_OK
    if failing:
        example = next(r for r in summary.rows.values() if r.get("status") in failing)
        log.error("%s (--fail-on %s); e.g. %s: %s", tally(failing), ",".join(sorted(args.fail_on)),
                  example["case_id"], str(example.get("error") or f"rel_err {example.get('rel_err')}")[:200])
        code = EXIT_FAILED
    if args.require_reference:
        unchecked = [r for r in summary.rows.values() if r.get("status") in ("ok", "mismatch", "unchecked")
                     and not str(r.get("reference", "")).startswith("neural_tangents")]
        if unchecked:
            r = unchecked[0]
            log.error("%d computed row(s) not checked against neural-tangents (--require-reference); e.g. %s: "
                      "reference %s%s", len(unchecked), r["case_id"], r.get("reference"),
                      f" ({r['reference_note']})" if r.get("reference_note") else
                      f" ({r['error']})" if r.get("error") else "")
            code = EXIT_FAILED
    return code


def _cmd_report(args) -> int:
    from .output import report
    from .store.rundir import RunDirError

    if not Path(args.run).is_dir():
        log.error("report: no run directory %s (RUN is the --out folder of `ntk-bench run`)", args.run)
        return EXIT_USAGE
    try:
        path = report.write_report(Path(args.run), args.out and Path(args.out))
    except (FileNotFoundError, ValueError, RunDirError) as exc:
        return _refuse(exc)
    log.info("report: %s", path)
    return EXIT_OK


def _cmd_calibrate(args) -> int:
    from .measurement import calibrate

    out = Path(args.out)
    if out.is_dir():
        log.error("--out %s: is a directory; name the calibration file (e.g. %s/calibration.json)", out, out)
        return EXIT_USAGE
    missing = [r for r in args.runs if not (Path(r) / "results.jsonl").is_file()]
    if missing:
        log.error("no results.jsonl in %s", ", ".join(missing))
        return EXIT_USAGE
    from ntk_bench.implementations.plugins.auto import CalibrationError

    from .store.rundir import RunDirError

    try:
        fitted = calibrate.calibrate([Path(r) for r in args.runs], out)
    except OSError as exc:
        log.error("cannot write %s: %s", out, exc.strerror or exc)
        return EXIT_USAGE
    except CalibrationError as exc:
        log.error("--out %s: %s; name a calibration file written by calibrate, or a new path", out, exc)
        return EXIT_USAGE
    except (RunDirError, ValueError) as exc:  # a results file of a later format, a link where out should be
        return _refuse(exc)
    if not fitted:
        log.error("nothing to fit: no plugin has 3 ok rows with the cost model's estimate (est_flops) on one device "
                  "in %s; %s not written", ", ".join(args.runs), out)
        return EXIT_FAILED
    for device, table in fitted.items():
        for impl, c in table.items():
            rate = 1 / c["s_per_flop"] / 1e9 if c["s_per_flop"] else float("inf")
            log.info("%-5s %-22s overhead %8.3f ms  %10.3g GFLOP/s  (%d cases)", device, impl, c["overhead_s"] * 1e3,
                     rate, c["cases"])
    log.info("wrote %s (use it with NTK_BENCH_CALIBRATION=%s)", out, out)
    return EXIT_OK


def _add_compare(sub, wanted: bool) -> None:
    """``compare`` comes from ``ntk_bench.bench.output.compare``, imported only when it is the command run."""
    if wanted:
        from .output import compare

        p = sub.add_parser("compare", help="compare two runs case by case, with the measured noise")
        compare.add_arguments(p)
        p.set_defaults(func=compare.run)
    else:
        p = sub.add_parser("compare", help="compare two runs case by case, with the measured noise "
                                           "(ntk-bench compare --help)", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)


def _add_kernel(sub, common, executors) -> None:
    k = sub.add_parser("kernel", parents=[common], help="the kernel of a dataset, in tiles, on disk (zarr), resumable",
                       description="Θ(X1, X2) over whole datasets: tiles as tasks, each written to the kernel's own "
                                   "chunk as it finishes; run again (or --resume) to compute only the missing tiles.")
    k.add_argument("--model", required=True, metavar="SPEC",
                   help="'path/to/file.py:function' or 'package.module:function' returning the nn.Module")
    k.add_argument("--data", required=True, metavar="SPEC",
                   help="a factory returning X1: a tensor, a numpy array or a Dataset (of inputs or (input, target))")
    k.add_argument("--data2", metavar="SPEC", help="a factory returning X2 (default: X2 = X1, upper triangle only)")
    k.add_argument("--mode", choices=MODES, default="trace")
    k.add_argument("--out", required=True, help="the kernel's directory, e.g. K.zarr")
    k.add_argument("--impl", default="auto", help="the plugin (default auto: the cost model's pick, recorded)")
    k.add_argument("--tile", type=positive_int, help="tile edge in samples (default: from the memory budget)")
    k.add_argument("--memory-budget", type=gib, metavar="GIB", help="per worker (default: half the free memory)")
    k.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    k.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    k.add_argument("--resume", action="store_true",
                   help="continue the kernel in OUT (the default when OUT is a kernel of the same model and data)")
    k.add_argument("--verify", type=int, default=3, metavar="K",
                   help="tiles besides the first diagonal one recomputed in float64 against the reference (default 3)")
    k.add_argument("--executor", choices=("none",) + tuple(executors), default="none",
                   help="none (this process, default), local (--workers pinned processes), ray, slurm, ...")
    k.add_argument("--workers", type=positive_int, default=1, help="local: worker processes (default 1)")
    k.add_argument("--devices", type=lambda t: [d.strip() for d in t.split(",") if d.strip()], metavar="LIST",
                   help="local: one worker per GPU, e.g. cuda:0,cuda:1 (with --device cuda)")
    k.add_argument("--timeout", type=seconds, help="per row band of tiles, on an executor")
    k.add_argument("--factors-disk", type=lambda t: _number(t, "a finite number of GiB, 0 or more", allow_zero=True),
                   metavar="GIB",
                   help="disk the blocks' factors may take in OUT/factors, read back on resume and by other workers "
                        "(default: a quarter of the free space; 0: none)")
    k.add_argument("--keep-factors", action="store_true", help="keep OUT/factors once the kernel is complete")
    k.add_argument("--no-progress", action="store_true", help="no progress lines")
    k.set_defaults(func=_cmd_kernel)


def _cmd_kernel(args) -> int:
    from .execution.kernel_matrix import kernel_matrix
    from .store.kernel_store import KernelFileError

    out = Path(args.out)
    if out.exists() and not args.resume and any(out.iterdir() if out.is_dir() else [out]):
        log.info("%s exists: resuming it (the model, data, mode and code must be the ones it was made from)", out)
    try:
        kernel = kernel_matrix(args.model, args.data, args.data2, mode=args.mode, out=out, impl=args.impl,
                               tile=args.tile, executor=None if args.executor == "none" else args.executor,
                               workers=args.workers, devices=args.devices, dtype=args.dtype, device=args.device, verify=args.verify,
                               memory_budget_bytes=int(args.memory_budget * (1 << 30)) if args.memory_budget else None,
                               timeout_s=args.timeout, progress=not args.no_progress, keep_factors=args.keep_factors,
                               factors_disk_bytes=None if args.factors_disk is None else
                               int(args.factors_disk * (1 << 30)))
    except (KernelFileError, ValueError, TypeError) as exc:
        print(f"ntk-bench kernel: error: {exc}", file=sys.stderr)
        log.debug("raised here:", exc_info=exc)
        return EXIT_USAGE if not isinstance(exc, KernelFileError) else 1
    v = kernel.attrs.get("verification") or {}
    print(f"{kernel.path}: {kernel.kernel_mode} kernel {kernel.shape} {kernel.dtype} by {kernel.attrs['plugin']}, "
          f"{len(kernel.tiles())} tiles of {kernel.tile}; verified against the float64 reference on "
          f"{len(v.get('tiles', []))} tiles, worst relative error {v.get('worst_rel_error', float('nan')):.2g}")
    return 0


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    from ntk_bench.version import __version__

    from .execution.executors import EXECUTORS

    parser = _Parser(prog="ntk-bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"ntk-bench {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more output (-v: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    # -v / -q after the command too (SUPPRESS: a subcommand's default does not override the main parser's)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="plugins, peers, architectures and sweeps", parents=[common]).set_defaults(func=_cmd_list)

    run = sub.add_parser("run", help="run a sweep, appending rows to OUT/results.jsonl", parents=[common],
                         description="Run a sweep (or one model of yours), a row per case appended to "
                                     "OUT/results.jsonl as it finishes. " + __doc__.split("\n\n", 1)[1],
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    what = run.add_argument_group("what to run")
    what.add_argument("--sweep", default="default",
                      help="a built-in sweep name, 'default' (gpu with CUDA, else quick), or a .toml/.json file")
    what.add_argument("--impls", help="comma-separated plugins and peers to run instead of the sweep's: names, all, "
                                      "ours, peers, tag:NAME, patterns (nt_*), a leading - removing "
                                      "(--impls=ours,-tag:loop)")
    what.add_argument("--plugin", action="append", metavar="MODULE",
                      help="import MODULE (package.module) and register its plugins, here and in every worker "
                           "(repeatable)")
    own = run.add_argument_group("your own model, for a one-off run (instead of --sweep)")
    own.add_argument("--model", metavar="SPEC", help="'package.module:function' or 'path/to/file.py:function' "
                                                     "returning an nn.Module (or (module, input spec))")
    own.add_argument("--input-shape", type=int_list, metavar="3,32,32", help="one sample's shape")
    own.add_argument("--input-dtype", choices=("float", "int64"), default="float")
    own.add_argument("--input-range", type=int_range, metavar="LOW,HIGH", help="int64 ids in [LOW, HIGH)")
    own.add_argument("--inputs-factory", metavar="SPEC", help="f(n, seed) -> tensor, instead of --input-shape")
    own.add_argument("--eval", action="store_true",
                     help="call .eval() on the model (by default it runs as the factory returns it: a train-mode "
                          "BatchNorm or Dropout is refused, as ntk_bench.ntk refuses it)")
    own.add_argument("--param", action="append", type=key_value, metavar="KEY=VALUE",
                     help="a keyword argument of the factory (repeatable)")
    own.add_argument("--name", help="the model's name in the rows (default: the function's)")
    own.add_argument("--N", type=int_list, metavar="4,16", help="batch sizes (x2 = x1; default 4)")
    own.add_argument("--O", type=int_list, metavar="10", help="output widths, when the factory takes `out`")
    own.add_argument("--mode", choices=MODES, default="full")
    own.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    own.add_argument("--device", default="cpu", help="cpu, cuda or cuda:K")
    where = run.add_argument_group("where the rows go")
    where.add_argument("--out", help="run directory (default results/<sweep>)")
    where.add_argument("--resume", action="store_true", help="continue a run in OUT, skipping finished cases")
    where.add_argument("--force", action="store_true",
                       help="with --resume: continue although the sweep, code or environment differs (a new segment "
                            "with its own header)")
    where.add_argument("--retry-failed", action="store_true",
                       help="with --resume: run again the cases whose last row is timeout, oom, killed, error or "
                            "unchecked")
    limits = run.add_argument_group("limits")
    limits.add_argument("--timeout", type=seconds, help="per-case timeout in seconds, from the worker's ready signal "
                                                        "(overrides the sweep)")
    limits.add_argument("--deadline", type=minutes, metavar="MIN",
                        help="start no case after MIN minutes (the rest: run again with --resume)")
    limits.add_argument("--memory-budget", type=gib, metavar="GIB",
                        help="every plugin computes blocked under this budget")
    ex = run.add_argument_group("executor")
    ex.add_argument("--executor", choices=EXECUTORS, default="local")
    ex.add_argument("--workers", type=positive_int, default=1,
                    help="local: CPU workers, each pinned to its own cores (default 1); submitit-local: jobs at once")
    ex.add_argument("--devices", type=lambda t: [d.strip() for d in t.split(",") if d.strip()], metavar="LIST",
                    help="local: one worker per GPU, e.g. cuda:0,cuda:1, or 'all' (every visible GPU)")
    ex.add_argument("--address", help="ray: the cluster's address (default: RAY_ADDRESS, else a local cluster)")
    ex.add_argument("--cpus-per-task", type=positive_int, default=1, help="ray/slurm: CPUs (and threads) per case")
    ex.add_argument("--partition", help="slurm: the partition")
    ex.add_argument("--gpus-per-task", type=positive_int, default=1, help="slurm: GPUs for a CUDA case (default 1)")
    ex.add_argument("--time-limit", type=minutes, metavar="MIN",
                    help="slurm: at least this time limit per job (default: the case's timeout plus start-up)")
    ex.add_argument("--max-parallel", type=positive_int, help="slurm: array tasks at once (default 64)")
    ex.add_argument("--jobs-per-task", type=positive_int, default=1,
                    help="slurm: cases run one after the other by one task (amortises its start-up; default 1)")
    ex.add_argument("--mem-gb", type=gib, help="slurm: memory per job")
    ex.add_argument("--slurm-param", action="append", type=key_value, metavar="KEY=VALUE",
                    help="slurm: another submitit slurm_* parameter, e.g. account=myproj (repeatable)")
    gate = run.add_argument_group("exit code")
    gate.add_argument("--fail-on", default="mismatch,error", metavar="STATUSES",
                      help="exit 1 when a case's last row has one of these statuses (default mismatch,error; "
                           "'none' for never)")
    gate.add_argument("--require-reference", action="store_true",
                      help="exit 1 when a computed row was not checked against neural-tangents")
    run.add_argument("--no-progress", action="store_true", help="a line per finished case instead of a bar "
                                                                "(the default where the terminal cannot show one)")
    run.add_argument("--clock", choices=("wall", "cpu", "auto"), default="wall",
                     help="time on the wall clock (default), or on the process's CPU time with one thread (steadier "
                          "on a shared machine: time spent waiting for a core is not counted; CUDA cases keep the "
                          "wall clock); auto: cpu on a machine without CUDA, wall with it (make bench's default)")
    run.set_defaults(func=_cmd_run)

    rep = sub.add_parser("report", help="write results.csv, summary.md and plots for a run", parents=[common])
    rep.add_argument("run", help="run directory holding results.jsonl")
    rep.add_argument("--out", help="where to write (default: the run directory)")
    rep.set_defaults(func=_cmd_report)
    cal = sub.add_parser("calibrate", help="fit auto's cost-model constants to runs, into a file you name",
                         parents=[common])
    cal.add_argument("runs", nargs="+", help="run directories holding results.jsonl")
    cal.add_argument("--out", required=True,
                     help="the calibration file to write (merged into when it exists); auto reads it when "
                          "NTK_BENCH_CALIBRATION names it")
    cal.set_defaults(func=_cmd_calibrate)
    from .measurement import check  # (argparse only: no torch until the command runs)

    chk = sub.add_parser("check", help="the correctness suite for a plugin (yours): exit 1 on any failure",
                         parents=[common], description=check.__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    check.add_arguments(chk)
    chk.set_defaults(func=check.run)
    _add_kernel(sub, common, EXECUTORS)
    command = next((a for a in argv if not a.startswith("-")), None)
    _add_compare(sub, command == "compare")
    return parser


def _drop_current_directory() -> None:
    """``python -m ntk_bench`` puts the current directory first on ``sys.path``: started in a downloaded folder, its
    ``numpy.py`` or ``jax.py`` would be imported. It is taken off (``--plugin`` puts it back, saying so), unless
    it is the checkout ntk_bench itself runs from."""
    from ntk_bench.version import package_parent

    cwd = os.getcwd()
    root = str(package_parent())
    if sys.path and sys.path[0] in ("", cwd) and not sys.flags.safe_path and os.path.realpath(cwd) != root:
        del sys.path[0]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _drop_current_directory()
    if next((a for a in argv if not a.startswith("-")), None) == "compare":
        try:
            from .output import compare  # noqa: F401
        except ImportError as exc:
            print(f"ntk-bench: error: compare is unavailable: {exc}", file=sys.stderr)
            return EXIT_USAGE
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logger = logging.getLogger("ntk_bench")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        return _main(args, argv, parser)
    finally:  # main() called in a process that goes on (tests, a notebook): its logging as it was
        logger.handlers[:], logger.level, logger.propagate = saved


def _main(args, argv, parser) -> int:
    if args.command == "run":
        from .execution.runner import STATUSES

        args.argv = argv
        args.sweep_given = any(a == "--sweep" or a.startswith("--sweep=") for a in argv)
        fail_on = {s.strip() for s in args.fail_on.split(",") if s.strip()} - {"none"}
        bad = fail_on - set(STATUSES)
        if bad:
            parser.error(f"--fail-on: unknown status {', '.join(sorted(bad))}; valid: {', '.join(STATUSES)}, none")
        args.fail_on = fail_on
        for flag in ("force", "retry_failed"):
            if getattr(args, flag) and not args.resume:
                parser.error(f"--{flag.replace('_', '-')} goes with --resume")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # a Ctrl-C outside a run (while checking the sweep): nothing to keep
        log.warning("interrupted")
        return EXIT_SIGINT
