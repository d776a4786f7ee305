"""The installed package is the tested one: a wheel installed (not editable) into a fresh virtual environment, used
from a directory holding its own ``reference.py``, ``bench.py`` and ``implementations.py``, imports only the
``ntk_bench`` namespace, finds its packaged calibration, and runs a sweep whose rows are checked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHADOWS = {  # what a user's project might hold: the harness must not import any of it
    "reference.py": "raise ImportError('the user project reference.py was imported')\n",
    "bench.py": "raise ImportError('the user project bench.py was imported')\n",
    "implementations.py": "raise ImportError('the user project implementations.py was imported')\n",
}


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh venv with the wheel installed, the wheel's path)."""
    tmp = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp / "dist"), str(ROOT)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp / "dist").glob("ntk_bench-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp / "venv")], check=True, timeout=120)
    python = tmp / "venv" / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, capture_output=True, timeout=300)
    # torch & co. from the development environment, through a path (its .pth files, the editable install's finder
    # among them, are not processed for a path added this way)
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, wheel


@pytest.fixture()
def user_project(tmp_path):
    for name, text in SHADOWS.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def _run(python, cwd, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NTK_BENCH_CALIBRATION")}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_wheel_holds_one_namespace_with_its_data(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"ntk_bench"}, top
    for needed in ("ntk_bench/implementations/plugins/auto_calibration.json", "ntk_bench/py.typed",
                   "ntk_bench/bench/zoo/real_models.py", "ntk_bench/reference/__init__.py",
                   "ntk_bench/bench/measurement/correctness.py", "ntk_bench/bench/measurement/problems.py", "ntk_bench/bench/measurement/bruteforce.py",
                   "ntk_bench/bench/sweeps/quick.toml", "ntk_bench/bench/sweeps/smoke.toml"):
        assert needed in names


def test_the_installed_package_is_imported_not_the_checkout_or_the_user_project(installed, user_project):
    python, _ = installed
    code = ("import json, ntk_bench, ntk_bench.implementations as i, ntk_bench.reference as r, ntk_bench.bench.cli\n"
            "print(json.dumps({'files': [ntk_bench.__file__, i.__file__, r.__file__],\n"
            "                  'version': ntk_bench.__version__, 'calibrated': sorted(i.get('auto').calibration)}))")
    out = _run(python, user_project, "-c", code)
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", f"importing the package printed: {out.stderr}"
    info = json.loads(out.stdout)
    venv = str(python.parent.parent)
    assert all(f.startswith(venv) for f in info["files"]), info["files"]
    assert "cpu" in info["calibrated"], "the packaged calibration was not found"
    script = python.parent / "ntk-bench"
    version = _run(script, user_project, "--version")
    assert version.returncode == 0 and info["version"] in version.stdout + version.stderr


def test_a_sweep_runs_and_checks_its_rows_from_a_user_project(installed, user_project):
    python, _ = installed
    out = _run(python, user_project, "-m", "ntk_bench", "run", "--sweep", "smoke", "--impls",
               "structured,jacobian_contraction", "--out", "run", "--no-progress")
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [json.loads(line) for line in (user_project / "run" / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "header" not in r]
    assert rows and all(r["status"] == "ok" for r in rows), rows
    assert all(r.get("rel_err") is not None and r["rel_err"] <= 1e-4 for r in rows), rows


def test_the_correctness_check_runs_a_user_plugin_file_from_the_wheel(installed, user_project):
    """``ntk-bench check`` needs nothing of the repository's tests/: the suite ships in the wheel."""
    python, _ = installed
    (user_project / "my_plugin.py").write_text(
        "from ntk_bench.implementations.plugins.jacobian_contraction import JacobianContraction\n\n"
        "class Mine(JacobianContraction):\n    name = 'mine'\n\nplugin = Mine()\n")
    out = _run(python, user_project, "-m", "ntk_bench", "check", "--plugin", "my_plugin.py", "--problems",
               "mlp-relu-O3-x2None", "--dtype", "float64", "--reference", "harness", "--junit", "check.xml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check passed: 1 of 1" in out.stdout and (user_project / "check.xml").is_file()
