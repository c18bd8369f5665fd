"""greenopt: the most accurate compressed variant of a causal LM that reaches an energy label.

Every figure greenopt prints is measured, never predicted from a configuration, and carries
its tier (M1 counter, M2 sampled power, E1 estimate), device and protocol. See the README.
"""

from greenopt._version import __version__  # noqa: F401


def __getattr__(name: str):
    # Lazy: ``greenopt.load(DIR)`` without importing torch/transformers at package import.
    if name == "load":
        from greenopt.models.checkpoint import load  # lazy: torch and transformers load on first use

        return load
    raise AttributeError(f"module 'greenopt' has no attribute {name!r}")
