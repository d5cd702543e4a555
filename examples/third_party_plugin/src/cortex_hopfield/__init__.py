"""cortex-hopfield: a modern Hopfield associative memory tier and an Oja Hebbian rule for Cortex."""

__version__ = "0.1.0"
