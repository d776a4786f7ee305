"""structured's layer rules: the contract (``base.py``) and one module per layer family."""
