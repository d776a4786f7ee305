"""The old name of :mod:`.module_walks`, for ``structured`` until it imports ``module_walks`` (then this file goes).

It is the same module object, so that a module-level cache or switch set under either name is the one the code reads.
"""

import sys

from . import module_walks

sys.modules[__name__] = module_walks
