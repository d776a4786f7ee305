"""``python -m ntk_bench.bench``: the ``ntk-bench`` command line."""

import sys

from .cli import main

sys.exit(main())
