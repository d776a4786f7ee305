"""The style checks of ``make lint`` (pyproject.toml's [tool.ruff] and [tool.mypy]), so that a plain pytest run fails
on a regression too: pyflakes and the import order everywhere, docstrings on the public names of the files listed
in fully_documented.txt, and the types of the packages mypy is configured for."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIST = ROOT / "fully_documented.txt"
# make lint's second ruff run: the D1 rules only (pyflakes and the import order are the first run's), without the
# per-file-ignores that keep them off the files not listed
DOCSTRING_CHECK = ("--config", "lint.per-file-ignores = {}", "--extend-ignore", "F,I")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def _tool(name: str) -> None:
    if _run(name, "--version").returncode:
        pytest.skip(f"{name} is not installed (the dev extra has it)")


def _documented() -> list[str]:
    return [line.strip() for line in LIST.read_text().splitlines() if line.strip()]


def test_ruff_whole_tree():
    _tool("ruff")
    r = _run("ruff", "check", "--quiet", "--output-format", "concise", ".")
    assert r.returncode == 0, f"ruff check . (ruff check --fix . sorts imports):\n{r.stdout}{r.stderr}"


def test_fully_documented_files_pass_the_docstring_rules():
    _tool("ruff")
    files = _documented()
    missing = [f for f in files if not (ROOT / f).is_file()]
    assert not missing, f"fully_documented.txt lists files that are gone (renamed? list the new path): {missing}"
    assert len(set(files)) == len(files), "fully_documented.txt lists a file twice"
    r = _run("ruff", "check", "--quiet", "--output-format", "concise", *DOCSTRING_CHECK, *files)
    assert r.returncode == 0, f"a file of fully_documented.txt has an undocumented public name:\n{r.stdout}{r.stderr}"


def test_the_docstring_check_would_catch_an_undocumented_name(tmp_path):
    """The ratchet's command reports a public function without a docstring (the per-file-ignores that keep the
    D rules off the other files do not switch it off)."""
    _tool("ruff")
    bad = tmp_path / "undocumented.py"
    bad.write_text('"""A module."""\n\n\ndef public(x):\n    return x\n')
    r = _run("ruff", "check", "--output-format", "concise", *DOCSTRING_CHECK, str(bad))
    assert r.returncode == 1 and "D103" in r.stdout, r.stdout + r.stderr


def test_mypy():
    _tool("mypy")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "typecheck.py")], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, f"mypy (the [tool.mypy] section of pyproject.toml):\n{r.stdout}{r.stderr}"
