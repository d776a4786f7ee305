"""The docstring ratchet's list: which files outside fully_documented.txt now pass its check (candidates to add).

    python scripts/fully_documented.py          prints them
    python scripts/fully_documented.py --add    adds them to fully_documented.txt (sorted)

The check is make lint's: pydocstyle's D1 rules of pyproject.toml's [tool.ruff.lint] on every Python file outside
tests/ (test functions are named for what they check).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIST = ROOT / "fully_documented.txt"


def candidates() -> list[str]:
    """The files outside tests/ and outside the list that have no undocumented public name."""
    files = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    files = [f for f in files if not f.startswith("tests/") and (ROOT / f).is_file()]
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", "--exit-zero", "--output-format",
                          "concise", "--config", "lint.per-file-ignores = {}", "--extend-ignore", "F,I", *files],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    failing = {line.split(":", 1)[0] for line in out.splitlines() if line.strip()}
    listed = set(LIST.read_text().split())
    return sorted(set(files) - failing - listed)


def main(argv: list[str] | None = None) -> int:
    """Print the candidates, or with ``--add`` add them to the list."""
    args = sys.argv[1:] if argv is None else argv
    found = candidates()
    if "--add" in args:
        LIST.write_text("\n".join(sorted(set(LIST.read_text().split()) | set(found))) + "\n")
    print("\n".join(found) if found else "no file to add")
    return 0


if __name__ == "__main__":
    sys.exit(main())
