"""``structured``: the NTK layer by layer from each layer's structure (the plugin registered as "structured").

- ``plugin.py``: the plugin (record, backward, per-use rule data, assembly, its cost estimate);
- ``plan.py``: which rule covers which parameter (the only classifier of parameters), and recording;
- ``table.py``: module type -> rule, ``register_rule`` for your own module types, and the rule catalogue;
- ``rules/``: the rule contract (``rules/base.py``) and one file per layer family;
- ``rewrites.py``: attention and recurrent layers in forms vmap batches, scoped to a call.
"""

from __future__ import annotations

from .plugin import Factors, StaleFactors, Structured, plugin
from .rules.base import Options, Rule, RuleError
from .table import register_rule, rule_for

__all__ = ["Factors", "Options", "Rule", "RuleError", "StaleFactors", "Structured", "plugin", "register_rule",
           "rule_for"]
