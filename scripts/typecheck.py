"""mypy on the packages that pyproject.toml's [tool.mypy] names, read the way they are installed: as ``ntk_bench.*``.

The repository keeps implementations/, bench/ and reference/ at its top while the package is ``ntk_bench.*``
(setuptools' package-dir), and mypy names a module by its folders: a relative import that climbs to the root
package (``from ...modes import MODES``) would not resolve. So mypy reads ``.mypy_tree/ntk_bench/`` (ignored by
git), whose entries are links to ntk_bench's own files and to the top-level folders, rebuilt on every run; its
messages name files under that folder.

    python scripts/typecheck.py [mypy options]      (make lint runs it; so does tests/test_style.py)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / ".mypy_tree"
FOLDERS = ("implementations", "bench", "reference")


def build_tree() -> Path:
    """(Re)build ``.mypy_tree/ntk_bench``: links to ntk_bench's files and to the top-level folders."""
    package = TREE / "ntk_bench"
    if TREE.exists():
        shutil.rmtree(TREE)
    package.mkdir(parents=True)
    for f in sorted((ROOT / "ntk_bench").iterdir()):
        if f.suffix in (".py", ".typed"):
            (package / f.name).symlink_to(f)
    for folder in FOLDERS:
        (package / folder).symlink_to(ROOT / folder, target_is_directory=True)
    return TREE


def main(argv: list[str] | None = None) -> int:
    """Build the tree, then run mypy from the repository's root with its configuration; mypy's exit status."""
    build_tree()
    args = sys.argv[1:] if argv is None else argv
    return subprocess.run([sys.executable, "-m", "mypy", *args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
