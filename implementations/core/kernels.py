"""The old name of :mod:`.contractions`, for ``structured`` until it imports ``contractions`` (then this file goes).

It is the same module object, so that setting one of its constants (``SYMMETRIC_SPLIT_MIN_ROWS``) under either name
changes what the code reads.
"""

import sys

from . import contractions

sys.modules[__name__] = contractions
