"""The package version, importable without the rest of greenopt."""

__version__ = "0.1.0"
