"""The correctness gate can fail: a deliberately wrong plugin, registered from outside the
suite, gets tests without new test code, and those tests fail."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
ROOT = TESTS.parents[1]

WRONG_PLUGIN = '''
from ntk_bench import implementations
from ntk_bench.implementations.plugins.jacobian_contraction import JacobianContraction


class OffByOnePercent(JacobianContraction):
    name = "off_by_one_percent"

    def _kernel(self, model, x1, x2, mode):
        return 1.01 * super()._kernel(model, x1, x2, mode)


implementations.register(OffByOnePercent())
'''


@pytest.mark.usefixtures("nt_available")
def test_a_wrong_plugin_fails_the_suite(pytester, monkeypatch):
    pytester.makepyfile(wrong_plugin=WRONG_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(pytester.path), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess(
        str(TESTS / "test_correctness.py"), "-p", "wrong_plugin", "-p", "no:cacheprovider",
        "-k", "off_by_one_percent and mlp-relu-O3", "-q", "--rootdir", str(ROOT),
    )
    outcomes = result.parseoutcomes()
    # 2 mlp-relu-O3 problems x 3 modes x 2 dtypes (x devices): every one fails.
    assert outcomes.get("failed", 0) >= 12, result.stdout.str()
    assert outcomes.get("passed", 0) == 0
    result.stdout.fnmatch_lines(["*off_by_one_percent on mlp-relu-O3*rel err 1.000e-02*"])
