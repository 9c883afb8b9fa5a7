"""The package version, in a module of its own so that any module can read it without
importing `lmlab` itself (whose `__init__` reaches the model loader)."""

__version__ = "0.1.0"
