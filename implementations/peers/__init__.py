"""Peers: other libraries' NTK routines wrapped as plugins of origin ``"peer"``, built on ``core``."""
