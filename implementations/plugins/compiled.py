"""The compiled variants of ours (``core.compiled``): ``explicit_mlp_compiled``, ``jacobian_contraction_compiled``
and ``structured_compiled``, the same plugins with their kernel run through ``torch.compile``. Registered, not in
``names()`` by default (``names(compiled=True)``), never among auto's candidates: each first call per model and
shapes compiles for seconds.

``structured`` offers no ``pure_kernel`` yet: its ``_kernel`` is tried as it is and falls back to eager (the
reason is in ``info()``), so ``structured_compiled`` is ``structured`` with that one failed attempt.
"""

from __future__ import annotations

from .. import structured as _structured
from ..core.compiled import CompiledPlugin
from . import explicit_mlp as _explicit_mlp
from . import jacobian_contraction as _jacobian_contraction

plugins = [CompiledPlugin(m.plugin) for m in (_explicit_mlp, _jacobian_contraction, _structured)]
explicit_mlp_compiled, jacobian_contraction_compiled, structured_compiled = plugins

__all__ = ["explicit_mlp_compiled", "jacobian_contraction_compiled", "plugins", "structured_compiled"]
