"""codi2: the workspace audit daemon."""

__version__ = "0.1.0"
