"""The architecture zoo: the models sweeps run on (small built-ins and real models).

``real_models`` registers its architectures in ``architectures.ZOO`` when imported, which this package does, so
that whoever imports the zoo sees them all and ``architectures`` does not import ``real_models`` back.
"""

from . import architectures, real_models  # noqa: F401 - real_models registers itself
