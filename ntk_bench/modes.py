"""The kernel modes, named once: every plugin, the reference, the sweeps and the command line take their names from here.

``full``: the whole kernel, (N, M, O, O); ``trace``: its trace over the outputs, (N, M); ``diagonal``: its
diagonal over the outputs, (N, M, O). This module imports nothing (not even torch), so the command line and the
report, which run without torch, can use it too.
"""

MODES = ("full", "trace", "diagonal")
