"""Peers: other libraries' NTK routines wrapped as plugins of kind ``"peer"``, built on ``core``."""
