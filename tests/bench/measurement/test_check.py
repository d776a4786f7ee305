"""``ntk-bench check``: the shipped correctness suite passes a correct plugin and fails one that is wrong in one
mode, that changes the model, or that computes an ill-defined kernel instead of refusing it; JUnit XML, exit codes,
plugins named by a file, a module, an entry point or a registered name."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import textwrap
import xml.etree.ElementTree as ET

import pytest
import torch

from ntk_bench import implementations
from ntk_bench.bench import cli
from ntk_bench.bench.measurement import correctness, problems
from ntk_bench.implementations.core.tolerances import tolerance
from ntk_bench.implementations.plugins.jacobian_contraction import JacobianContraction

# N != M and x2 = None, O > 1; the contract's cases run with every check
PROBLEMS = "mlp-relu-O3-N4M3,mlp-relu-O3-x2None"
CONTRACT_CASES = 9 + 2  # problems.ILL_DEFINED, and the model left as found (with .grads; under no_grad)

BAD_PLUGINS = '''
import torch

from ntk_bench.bench.measurement import bruteforce
from ntk_bench.implementations.core.base import NTKPlugin
from ntk_bench.implementations.plugins.jacobian_contraction import JacobianContraction


class WrongDiagonal(JacobianContraction):
    """Right in full and trace mode, 0.1% off in diagonal mode."""
    name = "jc_wrong_diagonal"

    def _kernel(self, model, x1, x2, mode):
        k = super()._kernel(model, x1, x2, mode)
        return 1.001 * k if mode == "diagonal" else k


class WrongOnConvNets(JacobianContraction):
    """Right on every model without a Conv2d; 0.1% off on those with one."""
    name = "jc_wrong_on_conv_nets"

    def _kernel(self, model, x1, x2, mode):
        k = super()._kernel(model, x1, x2, mode)
        return 1.001 * k if any(isinstance(m, torch.nn.Conv2d) for m in model.modules()) else k


class Mutates(JacobianContraction):
    """The right kernel, then a parameter updated in place."""
    name = "jc_mutates"

    def compute(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        k = super().compute(model, x1, x2, mode, memory_budget_bytes)
        with torch.no_grad():
            next(model.parameters()).mul_(1.001)
        return k


class LeavesGrads(JacobianContraction):
    """The right kernel, then a backward pass that leaves .grads behind."""
    name = "jc_leaves_grads"

    def compute(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        k = super().compute(model, x1, x2, mode, memory_budget_bytes)
        with torch.enable_grad():
            model(x1).sum().backward()
        return k


class NoRefusal(NTKPlugin):
    """The brute-force kernel of any model, without the engine's refusal of ill-defined ones."""
    name = "bruteforce_no_refusal"

    def compute(self, model, x1, x2=None, mode="full", memory_budget_bytes=None):
        return bruteforce.ntk(model, x1, x2, mode)


plugins = [WrongDiagonal(), WrongOnConvNets(), Mutates(), LeavesGrads(), NoRefusal()]
'''


@pytest.fixture
def registry():
    """Plugins registered during the test are unregistered afterwards."""
    before = set(implementations.names(None))
    yield
    for name in set(implementations.names(None)) - before:
        implementations.unregister(name)


@pytest.fixture
def bad_plugins(tmp_path, registry):
    path = tmp_path / "bad_plugins.py"
    path.write_text(BAD_PLUGINS)
    return path


def _check(capsys, *args):
    code = cli.main(["check", "--reference", "harness", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _cases(junit):
    """{(plugin, case name): status} from a JUnit file."""
    cases = {}
    for suite in ET.parse(junit).getroot():
        plugin = suite.get("name").removeprefix("ntk-bench check ")
        for case in suite.iter("testcase"):
            status = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
            cases[(plugin, case.get("name"))] = status
    return cases


def test_a_correct_plugin_passes_with_every_case_in_the_junit_file(tmp_path, capsys):
    junit = tmp_path / "out" / "check.xml"
    code, out, _ = _check(capsys, "jacobian_contraction", "--problems", PROBLEMS, "--junit", str(junit))
    assert code == 0, out
    cases = _cases(junit)
    kernel_cases = {("jacobian_contraction", f"{problem} {mode} {dtype}") for problem in PROBLEMS.split(",")
                    for mode in ("full", "trace", "diagonal") for dtype in ("float64", "float32")}
    assert kernel_cases <= set(cases) and len(cases) == len(kernel_cases) + CONTRACT_CASES
    assert set(cases.values()) == {"passed"}
    assert ("jacobian_contraction", "refuses train BatchNorm") in cases
    root = ET.parse(junit).getroot()
    assert root.get("tests") == str(len(cases)) and root.get("failures") == "0" and root.get("errors") == "0"
    # each kernel case records its reference
    refs = {p.get("value") for p in root.iter("property") if p.get("name") == "reference"}
    assert "harness:bruteforce:float64:cpu" in refs
    assert "check passed: 1 of 1" in out


def test_a_plugin_wrong_in_diagonal_mode_only_fails_naming_the_mode_and_problem(bad_plugins, tmp_path, capsys):
    junit = tmp_path / "check.xml"
    code, out, _ = _check(capsys, "jc_wrong_diagonal", "--plugin", str(bad_plugins), "--problems", PROBLEMS,
                          "--junit", str(junit))
    assert code == 1, out
    failed = {name for (_, name), status in _cases(junit).items() if status != "passed"}
    assert failed == {f"{p} diagonal {d}" for p in PROBLEMS.split(",") for d in ("float64", "float32")}
    assert "FAILED mlp-relu-O3-N4M3 diagonal float64: rel err 1.00e-03 > 1e-10" in out
    assert "check FAILED" in out and "jc_wrong_diagonal" in out


def test_a_plugin_wrong_on_one_model_fails(bad_plugins, capsys):
    code, out, _ = _check(capsys, "jc_wrong_on_conv_nets", "--plugin", str(bad_plugins), "--problems",
                          "mlp-relu-O3-x2None,cnn-O4-N2M3", "--dtype", "float64")
    assert code == 1, out
    assert "ok    mlp-relu-O3-x2None" in out
    assert "FAIL  cnn-O4-N2M3" in out and "FAILED cnn-O4-N2M3 trace float64: rel err 1.00e-03" in out


@pytest.mark.parametrize("plugin, change", [("jc_mutates", "values changed: 0.weight"),
                                            ("jc_leaves_grads", "a parameter's .grad was replaced or created")])
def test_a_plugin_that_changes_the_model_fails_the_contract(bad_plugins, capsys, plugin, change):
    code, out, _ = _check(capsys, plugin, "--plugin", str(bad_plugins), "--problems", "mlp-relu-O3-x2None",
                          "--dtype", "float64")
    assert code == 1, out
    assert f"FAILED mlp-relu-O3-x2None full float64: left the model or inputs changed: {change}" in out
    assert "FAILED leaves a train-mode model, .grads and inputs as found" in out


def test_a_plugin_that_computes_an_ill_defined_kernel_instead_of_refusing_fails(bad_plugins, tmp_path, capsys):
    junit = tmp_path / "check.xml"
    code, out, _ = _check(capsys, "bruteforce_no_refusal", "--plugin", str(bad_plugins), "--problems", PROBLEMS,
                          "--junit", str(junit))
    assert code == 1, out
    cases = _cases(junit)
    # its kernels are right: only the refusals fail
    assert all(status == "passed" for (_, name), status in cases.items() if not name.startswith("refuses"))
    assert cases[("bruteforce_no_refusal", "refuses train BatchNorm")] == "failure"
    assert cases[("bruteforce_no_refusal", "refuses train Dropout")] == "failure"
    assert "FAILED refuses train BatchNorm: computed a kernel for an ill-defined model" in out
    assert "instead of raising IllDefinedKernelError" in out


def test_a_plugin_module_and_an_entry_point_are_found(tmp_path, monkeypatch, registry, capsys):
    """--plugin package.module; with no name, the plugins of the ntk_bench.plugins entry points are checked."""
    (tmp_path / "my_ntk.py").write_text(textwrap.dedent('''
        from ntk_bench.implementations.plugins.autograd_loop import AutogradLoop

        class Mine(AutogradLoop):
            name = "my_loop"

        plugin = Mine()
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = _check(capsys, "--plugin", "my_ntk", "--problems", "mlp-relu-O3-x2None", "--dtype", "float64")
    assert code == 0 and "ntk-bench check my_loop:" in out, out
    implementations.unregister("my_loop")

    ep = importlib.metadata.EntryPoint(name="my_loop", value="my_ntk:plugin", group="ntk_bench.plugins")
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group=None: [ep] if group == "ntk_bench.plugins" else [])
    monkeypatch.setattr(implementations, "_entry_points_loaded", False)
    code, out, _ = _check(capsys, "--problems", "mlp-relu-O3-x2None", "--dtype", "float64")
    assert code == 0 and "ntk-bench check my_loop:" in out and "1 of 1 plugin(s) pass" in out, out


@pytest.mark.parametrize("args, words", [
    (["no_such_plugin"], "unknown plugin 'no_such_plugin'; registered: jacobian_contraction"),
    (["--plugin", "missing/plugin.py"], "--plugin missing/plugin.py: no such file"),
    (["--plugin", "no_such_module_anywhere"], "--plugin no_such_module_anywhere: ModuleNotFoundError"),
    (["autograd_loop", "--problems", "mlp-nothing-*"], "--problems: no problem matches 'mlp-nothing-*'"),
])
def test_usage_errors_are_one_line_and_exit_2(args, words, capsys):
    code, out, err = _check(capsys, *args)
    assert code == 2 and words in err and err.count("\n") == 1, err


def test_a_plugin_that_declines_everything_checked_fails(capsys):
    """explicit_mlp declines conv nets: checked on one, nothing was checked, and that fails."""
    code, out, _ = _check(capsys, "explicit_mlp", "--problems", "cnn-O4-N2M3", "--dtype", "float64")
    assert code == 1 and "no problem was computed" in out, out
    assert "skip  cnn-O4-N2M3" in out and "Conv2d" in out


@pytest.mark.usefixtures("nt_available")
def test_the_reference_is_neural_tangents_where_installed_and_recorded(tmp_path, capsys):
    junit = tmp_path / "check.xml"
    code = cli.main(["check", "structured", "--problems", "mlp-relu-O3-x2None", "--dtype", "float64",
                     "--junit", str(junit)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "reference neural_tangents:structured_derivatives: 1 problem(s)" in out
    refs = [p.get("value") for case in ET.parse(junit).getroot().iter("testcase")
            if "mlp-relu" in case.get("name") for p in case.iter("property") if p.get("name") == "reference"]
    assert refs == ["neural_tangents:structured_derivatives"] * 3


class Float32Inside(torch.nn.Module):
    """A float64 model whose middle computes in float32 on purpose (T5's RMS norm: its variance in float32)."""

    def __init__(self):
        super().__init__()
        self.inp = torch.nn.Linear(4, 6)
        self.scale = torch.nn.Parameter(torch.ones(6))
        self.head = torch.nn.Linear(6, 2)

    def forward(self, x):
        h = self.inp(x)
        variance = h.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.head(self.scale * (h * torch.rsqrt(variance + 1e-6)))


@dataclasses.dataclass(frozen=True)
class Float32InsideProblem(problems.Problem):
    def model(self, dtype=torch.float64, device="cpu"):
        torch.manual_seed(0)
        return Float32Inside().to(dtype=dtype, device=device)

    def inputs(self, dtype=torch.float64, device="cpu"):
        g = torch.Generator().manual_seed(1)
        return (torch.randn(3, 4, generator=g).to(dtype=dtype, device=device),
                torch.randn(2, 4, generator=g).to(dtype=dtype, device=device))


class OffBy(JacobianContraction):
    """The right kernel times (1 + off)."""

    def __init__(self, off):
        super().__init__()
        self.off = off
        self.name = f"jc_off_by_{off:g}"

    def _kernel(self, model, x1, x2, mode):
        return (1 + self.off) * super()._kernel(model, x1, x2, mode)


@pytest.mark.parametrize("use_nt", [True, False], ids=["neural-tangents", "harness"])
def test_a_model_computing_in_float32_inside_is_checked_at_the_tolerance_its_cast_allows(use_nt, tmp_path):
    """Methods round differently where the model casts to float32, so its float64 kernel is defined only to about
    float32's precision: an exact plugin passes at the reference's stated tolerance (against neural-tangents it
    would fail 1e-10),
    one off by 4x that tolerance fails, and the tolerance used is in the messages, the summary and the JUnit."""
    from ntk_bench import reference

    if use_nt and reference.available():
        pytest.skip(reference.available())
    problem = Float32InsideProblem("float32-inside-O2-N3M2", "mlp", (), 3, 2)
    references = correctness.References(use_neural_tangents=use_nt)
    model, (x1, _) = problem.model(), problem.inputs()
    allowed = reference.tolerance(model, x1) if use_nt else reference.forward_tolerance(model, x1)
    assert allowed == pytest.approx(100 * torch.finfo(torch.float32).eps)

    def run(plugin):
        return [correctness.check_kernel(plugin, problem, mode, "float64", "cpu", references)
                for mode in ("full", "trace", "diagonal")]

    exact = run(JacobianContraction())
    assert [r.status for r in exact] == ["passed"] * 3, [r.message for r in exact]
    assert all(r.tolerance == allowed and f"tolerance {allowed:g}" in r.message for r in exact)
    if use_nt:  # neural-tangents rounds in float32 where torch does, but not the same way
        errors = [float(r.message.split()[2]) for r in exact]
        assert max(errors) > tolerance(torch.float64)  # the fixed float64 tolerance would have failed it
    summary = "\n".join(correctness.summary(exact, "jacobian_contraction"))
    assert f"checked at tolerance {allowed:g} (the model computes in a lower precision inside" in summary
    assert "float32-inside-O2-N3M2" in summary
    junit = tmp_path / "check.xml"
    correctness.write_junit(exact, junit)
    tolerances = {p.get("value") for p in ET.parse(junit).getroot().iter("property") if p.get("name") == "tolerance"}
    assert tolerances == {f"{allowed:g}"}

    wrong = run(OffBy(4 * allowed))
    assert [r.status for r in wrong] == ["failed"] * 3
    assert all(f"> {allowed:g} (the model computes in a lower precision inside)" in r.message for r in wrong)
