"""``python -m ntk_bench``: the ``ntk-bench`` command line."""

import sys

from .bench.cli import main

sys.exit(main())
