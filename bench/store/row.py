"""The schema of what a run stores: a result row, one line of ``results.jsonl`` per finished case (:class:`Row`);
the header that starts each segment of it (:class:`Header`); a record of ``paired.jsonl`` (:class:`PairedRecord`).

:class:`Row` declares every column a row may carry, its type and what it means; the worker, the executors and the
runner build rows through it (:func:`check_row`), and the readers (report, compare, calibrate,
``--resume``) read rows through :func:`~ntk_bench.bench.store.rundir.read_rows`, which migrates a row of an older
format (:data:`MIGRATIONS`) and validates it here.

Unknown keys. A row of the current format with a key this schema does not declare is a bug of the code that wrote
it: :func:`check_row` rejects it, naming the key. A file of a *later* format is refused as a whole by its header's
``format_version`` (``rundir.check_format``), so a reader never guesses at a newer layout; a row read from a file of
this format or an older one with a key the schema lacks (written by a development version between two formats)
keeps the key and the reader warns once per file, naming it (:func:`split_unknown`).

Only JSON types are stored: numbers that were NaN or infinite are written as ``null`` (``rundir.jsonable``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# The layout of results.jsonl, written in every header (``format_version``). A header without one is format 1;
# format 2 is the first whose rows are built and read through :class:`Row` (its worker columns declared, the
# clock of every timed row recorded).
FORMAT_VERSION = 3

# Whole numbers that a JSON writer may hand over either as an int or as a float (an estimate, a product of sizes).
Count = int | float

STATUSES = ("ok", "mismatch", "unchecked", "unsupported", "oom", "timeout", "killed", "error")


class _Strict(BaseModel):
    """Frozen, no undeclared keys, numpy and torch scalars read as the Python numbers they hold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _plain_scalars(cls, data: Any) -> Any:
        """numpy and torch scalars (a count from the cost model, a ratio) as the Python numbers they hold."""
        if isinstance(data, dict):
            return {k: v.item() if getattr(v, "ndim", None) == 0 and callable(getattr(v, "item", None)) else v
                    for k, v in data.items()}
        return data


class MachineFields(_Strict):
    """The machine while a job timed its calls (``machine.fields``): what says whether the times can be trusted."""

    load_avg_1m: float | None = Field(None, description="The machine's 1-minute load average over the timed calls")
    cpu_over_wall: float | None = Field(None, description="The process's CPU seconds over wall seconds while timed")
    involuntary_switches: int | None = Field(None, description="Involuntary context switches while timed")
    cpu_threads: int | None = Field(None, description="Torch threads the case was timed with")
    cpu_affinity: list[int] | None = Field(None, description="The cores the worker was pinned to")
    cores: int | None = Field(None, description="Cores the worker owned (its affinity, else the machine's)")
    probe_before_s: float | None = Field(None, description="A reference GEMM's seconds just before the timed calls "
                                                           "(machine.speed_probe; CPU cases)")
    probe_after_s: float | None = Field(None, description="The same just after them")
    disturbed: str | None = Field(None, description="Why the timing is not to be trusted (a busy machine); empty "
                                                    "when it is")


class WorkerFields(_Strict):
    """Where a job ran: the worker (``executors.process``: its ready message) and the cluster task."""

    worker: str | None = Field(None, description="The worker slot's label")
    worker_host: str | None = Field(None, description="The worker's host name")
    worker_threads: int | None = Field(None, description="The worker's torch threads at start")
    worker_malloc: str | None = Field(None, description="What was set of glibc's malloc in the worker")
    worker_startup_s: float | None = Field(None, description="Seconds the worker took to start (not the case's)")
    gpu: int | None = Field(None, description="The GPU index the worker was pinned to (CUDA_VISIBLE_DEVICES)")
    executor_host: str | None = Field(None, description="The host a cluster task ran on")
    slurm_job_id: str | None = Field(None, description="The SLURM job of the task")


class Row(MachineFields, WorkerFields):
    """One case's result as stored: its identity, the problem's size, the outcome, timings, memory, the check
    against the reference, and where and how it ran. Every field but the identity and the status is optional: a
    case that failed early (a timeout, a worker that died) has only what the runner knew."""

    # -- identity: what the case alone determines (``one_case.case_fields``) ------------------------------------
    case_id: str = Field(description="The case's stable key (``Case.id``): impl/problem/mode/dtype/device[/budget]; "
                                     "the last row of a case id wins")
    impl: str = Field(description="The plugin's registry name")
    origin: Literal["ours", "peer"] | None = Field(
        None, description="The plugin's origin in the registry: this project's (``ours``) or another library's "
                          "(``peer``); absent in runs written before it was recorded (``kind`` before format 3)")
    arch: str = Field(description="The architecture: a zoo name, or the name of a user's factory entry")
    arch_params: str = Field(description="The architecture's parameters as a JSON object in a string (sorted keys; "
                                         "``out`` included where the architecture takes it)")
    factory: str | None = Field(None, description="A user's model factory (``module:function`` or an absolute "
                                                   "``file.py:function``); absent for zoo architectures")
    N: int = Field(description="Samples in x1")
    M: int = Field(description="Samples in x2 (N when x2 is x1)")
    x2: Literal["x1", "separate"] = Field(description="``x1``: the kernel of x1 with itself (x2 = None); "
                                                      "``separate``: a second batch of M samples")
    mode: Literal["full", "trace", "diagonal"] = Field(description="The kernel asked for: (N, M, O, O), (N, M) or "
                                                                   "(N, M, O)")
    dtype: Literal["float32", "float64"] = Field(description="The model's and the inputs' dtype")
    device: str = Field(description="Where the kernel was computed: ``cpu``, ``cuda`` or ``cuda:K``")

    # -- the problem's size ---------------------------------------------------------------------------------------
    O: int | None = Field(None, description="Outputs of the model (None when the worker never answered and no "
                                            "other row of the problem says)")
    P: int | None = Field(None, description="Trainable parameters of the model")
    fp_flops: Count | None = Field(None, description="FLOP of one forward pass of one sample (the cost model's count)")
    predicted_jc_flops: Count | None = Field(None, description="(N + M)·O·[FP] + N·M·O²·P: the FLOP of a Jacobian "
                                                               "contraction, the report's x axis")
    predicted_vp_flops: Count | None = Field(None, description="N·M·O·[FP]: the FLOP of NTK-vector products")
    kernel_bytes: int | None = Field(None, description="Bytes of the kernel computed, in the case's dtype")

    # -- the outcome ----------------------------------------------------------------------------------------------
    status: str = Field(description="ok / mismatch (checked against the reference), unchecked (no reference; why in "
                                    "error), unsupported (the plugin declined the model), oom, timeout, killed, error. "
                                    "A reader meets statuses of later versions as plain strings")
    error: str | None = Field(None, description="Why the case is not ok (the exception, the decline, the timeout)")
    traceback_tail: str | None = Field(None, description="The last line of the traceback of a job that could not "
                                                         "even run (a plugin module that fails to import)")
    blocked_after_oom: bool | None = Field(None, description="True when the first call ran out of memory (or the "
                                                             "kernel's OOM killer ended the first try) and the case "
                                                             "was computed blocked under a budget that fits")
    first_try_error: str | None = Field(None, description="The out-of-memory error of the first try, for "
                                                          "``blocked_after_oom`` rows")
    oom_killed: bool | None = Field(None, description="The worker was killed by the kernel's OOM killer (the runner "
                                                      "then retries the case blocked)")
    executor_lost: bool | None = Field(None, description="The executor (a Ray cluster, SLURM) was lost under the "
                                                         "job; such a row is never written: --resume runs the case")

    # -- the cost model's estimate (our plugins but auto) ---------------------------------------------------------
    est_flops: Count | None = Field(None, description="The plugin's own FLOP estimate for this case")
    est_peak_bytes: Count | None = Field(None, description="The plugin's own peak-memory estimate for this case")

    # -- timing ---------------------------------------------------------------------------------------------------
    first_call_s: float | None = Field(None, description="Seconds of the first (warm-up) call: compilation, "
                                                         "set-up; its kernel is the one checked")
    time_median_s: float | None = Field(None, description="Median seconds per call over the timed blocks")
    time_iqr_s: float | None = Field(None, description="Interquartile range of the per-block times, seconds")
    time_repeats: int | None = Field(None, description="Calls timed in all (blocks × calls per block)")
    time_blocks_s: list[float] | None = Field(None, description="Seconds per call of each timed block (what "
                                                                "``compare`` tests two runs with)")
    clock: Literal["wall", "cpu"] | None = Field(None, description="What the times measure: the wall clock with the "
                                                                   "worker's threads, or process CPU time on one "
                                                                   "thread")
    timer: str | None = Field(None, description="The regression gate's timer (``process_time``, "
                                                "``perf_counter``); the runner's rows say ``clock``")
    processes: int | None = Field(None, description="The regression gate's fresh processes whose blocks are pooled")
    compiled: bool | None = Field(None, description="True when the timed call ran a compiled (torch.compile) path")
    compile_s: float | None = Field(None, description="Seconds spent compiling, outside the timed calls")
    xla_threads: int | None = Field(None, description="The cores neural-tangents' XLA runtime computed on (its "
                                                      "peers' rows; NTK_BENCH_XLA_THREADS)")
    compile_fallback: str | None = Field(None, description="Why a compiled variant (*_compiled) ran its eager kernel "
                                                            "instead: a graph break, a compile error, a mismatch")

    # -- memory ---------------------------------------------------------------------------------------------------
    memory_budget_bytes: int | None = Field(None, description="The budget the kernel was computed blocked under "
                                                              "(the case's, or the one found after running out of "
                                                              "memory); None: unblocked")
    peak_mem_bytes: int | None = Field(None, description="Peak memory of one call above what was in use before: "
                                                         "CUDA's max_memory_allocated, or the CPU's peak RSS")
    cuda_graph_bytes: int | None = Field(None, description="Bytes held by a replayed CUDA graph's pool (included in "
                                                           "peak_mem_bytes)")

    # -- auto -----------------------------------------------------------------------------------------------------
    auto_pick: str | None = Field(None, description="The plugin auto ran for this case")
    auto_reason: str | None = Field(None, description="Why auto picked it")
    paired_auto_s: float | None = Field(None, description="auto's median in the rounds alternating with its pick")
    paired_pick_s: float | None = Field(None, description="The pick's median in those rounds")
    auto_over_pick_paired: float | None = Field(None, description="Median ratio auto / its pick: auto's overhead")
    paired_ratios: dict[str, float | None] | None = Field(None, description="auto / plugin, median ratio in "
                                                                            "alternating rounds, per plugin compared")
    paired_fastest: str | None = Field(None, description="The plugin with the largest ratio: the fastest of those")
    auto_over_fastest_paired: float | None = Field(None, description="auto / the fastest, median ratio")
    paired_errors: dict[str, str] | None = Field(None, description="Plugins that failed in the paired rounds, why")

    # -- the check against the reference -------------------------------------------------------------------------
    reference: str | None = Field(None, description="Where the reference came from: "
                                                    "``neural_tangents:<implementation>``, "
                                                    "``harness:<plugin>:float64:cpu``, or ``none``")
    ref_block: str | None = Field(None, description="The leading block checked, ``AxB`` samples")
    rel_err: float | None = Field(None, description="‖K − K_ref‖_F / ‖K_ref‖_F over the block (None: not finite)")
    max_abs_err_rel_mean: float | None = Field(None, description="max|ΔK| / mean|K_ref| over the block")
    reference_tolerance: float | None = Field(None, description="The tolerance used when the model's own casts make "
                                                                "the reference less precise than float64")
    reference_note: str | None = Field(None, description="Why the reference is not neural-tangents' (it declined "
                                                         "the model, ran out of memory)")

    # -- where and how it ran (the executor, the runner) ----------------------------------------------------------
    case_wall_s: float | None = Field(None, description="Seconds of the whole case (set-up, checks, timing), not its "
                                                        "worker's start-up")
    concurrent: list[str] | None = Field(None, description="Ids of the jobs that ran beside it")
    executor: str | None = Field(None, description="The executor's name (local, ray, slurm, inline, ...)")


class PairedRecord(MachineFields, WorkerFields):
    """One group's paired timing, a line of ``paired.jsonl``: the plugins of one problem timed in alternating
    rounds in one process (``paired.run_paired``), so that their ratios are free of the machine's drift."""

    paired_id: str = Field(description="The group's key: ``paired/<problem>/<mode>/<dtype>/<device>[/budget]``")
    problem: str = Field(description="The problem's id (``Problem.id``)")
    arch: str = Field(description="The architecture (as in the rows)")
    arch_params: str = Field(description="Its parameters as a JSON object in a string (as in the rows)")
    N: int = Field(description="Samples in x1")
    M: int = Field(description="Samples in x2 (N when x2 is x1)")
    x2: Literal["x1", "separate"] = Field(description="As in the rows")
    mode: Literal["full", "trace", "diagonal"] = Field(description="As in the rows")
    dtype: Literal["float32", "float64"] = Field(description="As in the rows")
    device: str = Field(description="As in the rows")
    memory_budget_bytes: int | None = Field(None, description="The group's memory budget (None: unblocked)")
    clock: Literal["wall", "cpu"] | None = Field(None, description="What the times measure (as in the rows)")
    case_ids: dict[str, str] = Field(description="plugin -> the case id of its own row")
    budget_s: float | None = Field(None, description="Seconds the rounds were given")
    status: str = Field(description="ok, or why the rounds could not run (error, oom, ...)")
    error: str | None = Field(None, description="Why the rounds could not run")
    errors: dict[str, str] | None = Field(None, description="Plugins left out of the rounds, and why")
    impls: list[str] | None = Field(None, description="The plugins timed in the rounds")
    rounds: int | None = Field(None, description="Rounds timed (a block of each plugin per round)")
    number: dict[str, int] | None = Field(None, description="plugin -> calls per block")
    warmup_s: float | None = Field(None, description="Seconds of untimed calls of a plugin before each of its "
                                                     "blocks (at least one call); absent: not recorded (runs made "
                                                     "before the warm-up existed had none)")
    times_s: dict[str, list[float]] | None = Field(None, description="plugin -> seconds per call of each round's "
                                                                     "block, round by round")
    median_s: dict[str, float] | None = Field(None, description="plugin -> the median of its times_s")
    final_times_s: dict[str, list[float]] | None = Field(None, description="Our fastest and the fastest peer of the "
                                                                           "rounds, timed again by themselves: "
                                                                           "plugin -> seconds per call, round by "
                                                                           "round (absent: two plugins only, or a "
                                                                           "run made before these rounds)")
    final_error: str | None = Field(None, description="Why the finalists' own rounds failed (the rounds of all "
                                                      "stand)")
    wall_s: float | None = Field(None, description="Seconds of the whole group's job in its worker")
    job_wall_s: float | None = Field(None, description="Seconds of the job as the runner saw it, not its worker's "
                                                       "start-up")


class Header(BaseModel):
    """A segment's first line of ``results.jsonl`` (``{"header": {...}}``): the layout, the code, the environment
    and the sweep the rows below it come from. An executor adds its own description (``slots``, ``workers``, a
    cluster's settings), kept as it is; every field is optional, as headers of older runs lack many."""

    model_config = ConfigDict(extra="allow", frozen=True)

    format_version: int = Field(1, ge=1, description="The layout of the file (:data:`FORMAT_VERSION`); absent: 1")
    sweep: str | None = Field(None, description="The sweep's name")
    sweep_sha1: str | None = Field(None, description="What makes two runs of the sweep comparable "
                                                     "(``sweeps.fingerprint``): --resume refuses another")
    cases: int | None = Field(None, description="Cases in the sweep")
    clock: Literal["wall", "cpu"] | None = Field(None, description="The clock the cases are timed on")
    plugins: list[str] | None = Field(None, description="Outside plugin modules loaded (``--plugin``)")
    user_code_sha1: str | None = Field(None, description="A digest of the user's factory and plugin files")
    torch: str | None = Field(None, description="torch's version")
    jax: str | None = Field(None, description="jax's version (None: not installed)")
    jaxlib: str | None = Field(None, description="jaxlib's version")
    neural_tangents: str | None = Field(None, description="neural-tangents' version (None: the harness's own "
                                                          "reference was used)")
    backpack: str | None = Field(None, description="BackPACK's version")
    numpy: str | None = Field(None, description="numpy's version")
    python: str | None = Field(None, description="Python's version")
    device_name: str | None = Field(None, description="The GPU's name, or the CPU's model (/proc/cpuinfo; runs "
                                                      "before it was recorded say only the architecture)")
    cpu_capability: str | None = Field(None, description="The vector instructions torch's CPU kernels use "
                                                         "(AVX512, AVX2, ...)")
    cuda: str | None = Field(None, description="CUDA's version (None: no CUDA)")
    cpu_threads: int | None = Field(None, description="Torch threads of the runner (or of the workers, with "
                                                      "worker_env)")
    cpu_count: int | None = Field(None, description="The machine's CPUs")
    git_commit: str | None = Field(None, description="The checkout's commit, when there is one")
    code_sha1: str | None = Field(None, description="A digest of the harness's code that ran")
    host: str | None = Field(None, description="The runner's host")
    started: str | None = Field(None, description="When the segment started (ISO 8601)")
    worker_env: dict[str, str] | None = Field(None, description="Thread-pinning variables every worker inherits")
    executor: str | None = Field(None, description="The executor's name")
    segment: int | None = Field(None, description="The segment's index in the file (``--force`` starts another)")


def check_header(header: dict[str, Any]) -> dict[str, Any]:
    """``header`` validated against :class:`Header` (its declared fields; an executor's own keys pass as they are);
    RowError naming the problems otherwise."""
    try:
        Header.model_validate(header)
    except ValidationError as exc:
        raise RowError(f"the header: {_problems(exc)}") from None
    return header


ROW_FIELDS = frozenset(Row.model_fields)


class RowError(ValueError):
    """A row that does not match the schema; the message names the fields and what was wrong."""


def _problems(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'row'}: {e['msg']}" for e in exc.errors()[:5])


def check_row(fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` validated against :class:`Row` (every required field, every type, no undeclared key); returned
    as a dict of exactly the keys given, in JSON types. RowError naming the problems otherwise."""
    try:
        row = Row.model_validate(fields)
    except ValidationError as exc:
        where = fields.get("case_id", "a row") if isinstance(fields, dict) else "a row"
        raise RowError(f"{where}: {_problems(exc)}") from None
    return row.model_dump(mode="json", exclude_unset=True)


def row_problems(row: dict[str, Any]) -> str | None:
    """None when ``row``'s declared fields match the schema, else the problems in one line (keys the schema does
    not declare are not checked here: see :func:`split_unknown`)."""
    try:
        Row.model_validate(split_unknown(row)[0])
    except ValidationError as exc:
        return f"{row.get('case_id', 'a row without case_id')}: {_problems(exc)}"
    return None


def check_paired(record: dict[str, Any]) -> dict[str, Any]:
    """A paired-timing record validated against :class:`PairedRecord` (as :func:`check_row` does for a row)."""
    try:
        checked = PairedRecord.model_validate(record)
    except ValidationError as exc:
        raise RowError(f"{record.get('paired_id', 'a paired record')}: {_problems(exc)}") from None
    return checked.model_dump(mode="json", exclude_unset=True)


def split_unknown(row: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the row's declared fields, the keys the schema does not declare)."""
    known = {k: v for k, v in row.items() if k in ROW_FIELDS}
    return known, {k: v for k, v in row.items() if k not in ROW_FIELDS}


# -- migrations: a row of format v -> format v + 1 -----------------------------------------------------------------

def _v1_to_v2(row: dict[str, Any]) -> dict[str, Any]:
    """Format 1 (no format_version, or 1): rows timed before the clock was recorded were timed on the wall clock."""
    if row.get("time_median_s") is not None and "clock" not in row:
        row = {**row, "clock": "wall"}
    return row


def _v2_to_v3(row: dict[str, Any]) -> dict[str, Any]:
    """Format 2: the plugin's origin was stored as ``kind`` (a word that also named layer classes and job types)."""
    if "kind" in row:
        row = {("origin" if k == "kind" else k): v for k, v in row.items()}
    return row


MIGRATIONS = {1: _v1_to_v2, 2: _v2_to_v3}


def migrate(row: dict[str, Any], version: int) -> dict[str, Any]:
    """A row read from a file of format ``version`` as the current format writes it."""
    for v in range(version, FORMAT_VERSION):
        row = MIGRATIONS[v](row)
    return row
