"""A newcomer's own model on the command line and through the API: run as the factory returns it (its mode, its
seeding), and every input the model cannot take named in one line (the flag, the shape given and what the model's
first layer takes; token ids' range against the embedding's size)."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import ntk_bench
from ntk_bench.bench import cli as cli_module
from ntk_bench.bench.zoo import architectures
from ntk_bench.implementations.core.input_errors import InputMismatchError

FACTORIES = '''
import torch
from torch import nn

def mlp():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))

def with_batchnorm():  # returned in train mode, as nn.Module starts
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))

def tokens():
    return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
'''


@pytest.fixture
def net_file(tmp_path, monkeypatch):
    (tmp_path / "net.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(tmp_path)
    return tmp_path / "net.py"


def _run(capsys, tmp_path, *args):
    code = cli_module.main(["run", *map(str, args), "--N", "2", "--impls", "structured",
                            "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("error:")], err


@pytest.mark.parametrize("args, message", [
    (["--model", "net.py:with_batchnorm", "--input-shape", "5"],
     "1 (BatchNorm1d) is in train mode"),
    (["--model", "net.py:mlp", "--input-shape", "3,8,8"],
     "the per-sample input shape 3,8,8 (--input-shape, or inputs.shape in a sweep file): the model's forward fails "
     "on a batch of shape (1, 3, 8, 8) (per sample (3, 8, 8)); its first layer 0 (Linear) takes inputs whose last "
     "dimension is 5"),
    (["--model", "net.py:tokens", "--input-shape", "3", "--input-dtype", "int64", "--input-range", "0,50"],
     "with ids in [0, 50) (--input-range, inputs.range): token ids range over"),
    (["--model", "net.py:mlp"], "give its inputs: --input-shape"),
])
def test_a_model_the_run_cannot_take_is_one_line_naming_the_flag(capsys, tmp_path, net_file, args, message):
    code, errors, err = _run(capsys, tmp_path, *args)
    assert code == 2 and len(errors) == 1 and message in errors[0], err
    assert "cannot build the model" not in errors[0]
    assert not (tmp_path / "out").exists()  # before any work


def test_train_mode_is_refused_unless_eval_is_asked_for(capsys, tmp_path, net_file):
    code, errors, err = _run(capsys, tmp_path, "--model", "net.py:with_batchnorm", "--input-shape", "5")
    assert code == 2 and "--eval" in errors[0], err
    code, errors, err = _run(capsys, tmp_path, "--model", "net.py:with_batchnorm", "--input-shape", "5", "--eval")
    assert code == 0 and not errors, err


def test_the_factory_runs_as_returned_with_the_callers_generator(net_file):
    torch.manual_seed(7)
    state = torch.get_rng_state()
    arch = architectures.build(f"{net_file}:with_batchnorm", input_spec=architectures.InputSpec((5,)),
                               call_eval=True)
    assert torch.equal(torch.get_rng_state(), state)  # left as found
    torch.manual_seed(7)
    expected = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2))
    assert all(torch.equal(a, b) for a, b in zip(arch.model.state_dict().values(), expected.state_dict().values()))
    torch.manual_seed(8)  # not reseeded: another state, other weights
    other = architectures.build(f"{net_file}:mlp", input_spec=architectures.InputSpec((5,)))
    assert not torch.equal(other.model[0].weight, arch.model[0].weight)
    assert other.model.training  # not put in eval mode behind the user's back
    with pytest.raises(architectures.TrainModeError, match="--eval"):
        architectures.build(f"{net_file}:with_batchnorm", input_spec=architectures.InputSpec((5,)))


def test_the_zoo_is_still_seeded_and_in_eval_mode():
    a, b = architectures.build("mlp", seed=3), architectures.build("mlp", seed=3)
    assert not a.model.training
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_report_on_a_missing_directory_says_so(capsys, tmp_path):
    code = cli_module.main(["report", str(tmp_path / "nothere")])
    err = capsys.readouterr().err
    assert code == 2 and f"no run directory {tmp_path / 'nothere'}" in err and "Errno" not in err


@pytest.mark.parametrize("x, message", [
    (torch.randn(3, 12), "x1: the model's forward fails on a batch of shape (3, 12) (per sample (12,)); its first "
                         "layer 0 (Linear) takes inputs whose last dimension is 10"),
    (torch.randn(2, 3, 8, 8), "per sample (3, 8, 8)); its first layer 0 (Linear) takes inputs whose last dimension"),
])
def test_the_api_names_the_shape_given_and_expected(x, message):
    model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(InputMismatchError) as info:
        ntk_bench.ntk(model, x)
    assert message in str(info.value)
    assert isinstance(info.value, RuntimeError)  # (what torch raised: callers catching it still do)


def test_the_api_names_token_ids_past_the_vocabulary():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(InputMismatchError, match=r"token ids range over \[0, 7\], and 0 \(Embedding\) has 5 rows: "
                                                 r"ids must lie in \[0, 4\]"):
        ntk_bench.ntk(model, torch.tensor([[1, 7], [0, 2]]))


def test_a_conv_net_given_the_wrong_channels_says_how_many_it_takes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(InputMismatchError, match=r"per sample \(1, 8, 8\)\); its first layer 0 \(Conv2d\) takes "
                                                 r"per-sample inputs of shape \(3, size, size\)"):
        ntk_bench.ntk(model, torch.randn(2, 1, 8, 8))
