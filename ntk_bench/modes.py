"""The kernel modes, named once: the plugins, the reference, the sweeps and the command line take them from here.

``full``: the whole kernel, (N, M, O, O); ``trace``: its trace over the outputs, (N, M); ``diagonal``: its
diagonal over the outputs, (N, M, O). This module imports nothing (not even torch), so the command line and the
report, which run without torch, can use it too.
"""

MODES = ("full", "trace", "diagonal")
