"""greenopt: the most accurate compressed variant of a causal LM that reaches an energy label.

Every figure greenopt prints is measured, never predicted from a configuration, and carries
its tier (M1 counter, M2 sampled power, E1 estimate), device and protocol. See the README.
"""

__version__ = "0.1.0"
