"""Bring your own model: factory references in a sweep (a module or a file), input specs (float, int64 token ids
in a range) or an inputs function, rebuilt by the worker from the case alone; a factory that fails is one line
before any work."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch

from ntk_bench.bench import sweeps
from ntk_bench.bench.execution import runner
from ntk_bench.bench.execution.executors import InlineExecutor, Job
from ntk_bench.bench.zoo import architectures

MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    def tiny(width=6, out=2):
        return nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, out))

    def tokens(vocab=20):
        return nn.Sequential(nn.Embedding(vocab, 4), nn.Flatten(), nn.Linear(4 * 7, 3))

    def batch(n, seed):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(n, 5, generator=g)

    def broken():
        raise RuntimeError("this factory is broken")

    def not_a_model():
        return [1, 2]
''')


@pytest.fixture
def models_file(tmp_path):
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / "my_models.py").write_text(MODELS)
    return folder / "my_models.py"


def test_a_sweep_file_runs_your_models_from_a_file_relative_to_it(tmp_path, models_file):
    sweep = models_file.parent / "mine.json"
    sweep.write_text(json.dumps({"name": "mine", "impls": ["jacobian_contraction", "structured"],
                                 "time_budget_s": 0.01, "arch": [
        {"factory": "my_models.py:tiny", "params": {"width": 4}, "inputs": {"shape": [5]}, "N": [3], "O": [1, 2]},
        {"name": "tok", "factory": "my_models.py:tokens", "inputs": {"shape": [7], "dtype": "int64", "range": [0, 20]},
         "N": [2], "NM": [[2, 3]]},
        {"name": "fn_inputs", "factory": "my_models.py:tiny", "inputs_factory": "my_models.py:batch", "N": [2]},
    ]}))
    cases = sweeps.expand(sweeps.load(str(sweep)))
    problems = {c.problem for c in cases}
    assert {p.arch for p in problems} == {"tiny", "tok", "fn_inputs"} and len(cases) == 2 * (2 + 2 + 1)
    src = next(p.source for p in problems if p.arch == "tok")
    assert src.factory == f"{models_file.resolve()}:tokens" and src.input_range == (0, 20)
    # the worker rebuilds the model from the case alone (a plain dataclass, through JSON)
    wire = json.loads(json.dumps(Job("case", cases[0], 1.0).wire()))
    assert Job.from_wire(wire).payload == cases[0]
    infos = sweeps.check_models(cases)
    assert {i.o for i in infos.values()} == {1, 2, 3}
    tok = next(c for c in cases if c.problem.arch == "tok" and c.problem.m is not None)
    from ntk_bench.bench.measurement import problem_build

    _, _, x1, x2 = problem_build.build_problem(tok.problem, problem_build.DTYPES["float32"], "cpu")
    assert x1.dtype == x2.dtype == torch.int64 and x1.shape == (2, 7) and x2.shape == (3, 7)
    assert 0 <= int(x1.min()) and int(x2.max()) < 20
    # the float models, run and checked (token-id models go as far as the engine takes integer inputs)
    float_cases = [c for c in cases if c.problem.arch != "tok"]
    run_dir = tmp_path / "run"
    summary = runner.run(float_cases, run_dir, "mine", executor=InlineExecutor(run_dir))
    rows = list(summary.rows.values())
    assert {r["status"] for r in rows} == {"ok"}, [(r["case_id"], r.get("error")) for r in rows]
    assert {r["factory"].rsplit(":", 1)[1] for r in rows} == {"tiny"} and {r["O"] for r in rows} == {1, 2}


def test_a_module_factory_and_the_zoo_api_take_references(tmp_path, models_file, monkeypatch):
    monkeypatch.syspath_prepend(str(models_file.parent))
    arch = architectures.build("my_models:tiny", input_spec=architectures.InputSpec((5,)), width=3)
    assert arch.num_outputs == 2 and arch.num_parameters == 5 * 3 + 3 + 3 * 2 + 2
    arch = architectures.build(f"{models_file}:tiny", inputs_fn=architectures.load_callable(f"{models_file}:batch"))
    assert architectures.inputs(arch, 4).shape == (4, 5)


@pytest.mark.parametrize("entry, message", [
    ({"factory": "my_models.py:nope", "inputs": {"shape": [5]}}, "'my_models.py' has no function 'nope'"),
    ({"factory": "missing.py:tiny", "inputs": {"shape": [5]}}, "no such file"),
    ({"factory": "my_models.py:tiny", "params": {"depth": 2}, "inputs": {"shape": [5]}},
     "unexpected keyword argument 'depth'; tiny takes: width, out"),
    ({"factory": "my_models.py:tokens", "O": [3], "inputs": {"shape": [7], "dtype": "int64", "range": [0, 20]}},
     "tokens takes no `out` parameter; O comes from the model"),
    ({"factory": "my_models.py:tokens", "inputs": {"shape": [7], "dtype": "int64"}}, "int64 inputs need range"),
    ({"factory": "my_models.py:tiny", "inputs": {"shape": [5], "range": [0, 3]}}, "range is for dtype = \"int64\""),
    ({"factory": "my_models.py:tiny", "inputs": {"shape": [5]}, "inputs_factory": "my_models.py:batch"},
     "give inputs or inputs_factory, not both"),
    ({"factory": "my_models"}, "expected 'package.module:function' or 'path/to/file.py:function'"),
])
def test_a_factory_that_cannot_be_used_is_one_line_before_any_work(tmp_path, models_file, entry, message):
    with pytest.raises(sweeps.SweepError) as info:
        sweeps.expand({"name": "bad", "impls": ["structured"], "arch": [{**entry, "N": [2]}]},
                      base_dir=models_file.parent)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("factory, inputs, message", [
    ("broken", {"shape": [5]}, "broken(): cannot build the model: RuntimeError: this factory is broken"),
    ("not_a_model", {"shape": [5]}, "the factory returned list, expected an nn.Module"),
    # inputs the model cannot take: the shape given and what the first layer takes
    ("tiny", {"shape": [4]}, "(--input-shape, or inputs.shape in a sweep file): the model's forward fails on a "
                             "batch of shape (1, 4) (per sample (4,)); its first layer 0 (Linear) takes inputs whose "
                             "last dimension is 5"),
    # ids past the vocabulary: their range and the embedding's size
    ("tokens", {"shape": [7], "dtype": "int64", "range": [0, 50]}, "(Embedding) has 20 rows: ids must lie in [0, 19]"),
])
def test_a_model_that_cannot_be_built_or_fed_is_caught_before_any_work(models_file, factory, inputs, message):
    cases = sweeps.expand({"name": "bad", "impls": ["structured"], "arch": [
        {"factory": f"my_models.py:{factory}", "inputs": inputs, "N": [2]}]}, base_dir=models_file.parent)
    with pytest.raises(sweeps.SweepError) as info:
        sweeps.check_models(cases)
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_factory_returning_a_model_alone_needs_its_inputs(models_file):
    with pytest.raises(architectures.FactoryError, match="returned a model alone; give its inputs"):
        architectures.build(f"{models_file}:tiny")
