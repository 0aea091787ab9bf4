"""Exceptions raised by deepmetric. Every message says what was wrong and what to do."""
from __future__ import annotations

__all__ = ["DeepMetricError", "ConfigError", "DataError", "NonFiniteError", "CheckpointError"]


class DeepMetricError(Exception):
    """Base class of every deepmetric error."""


class ConfigError(DeepMetricError, ValueError):
    """A bad configuration value, unknown key, unknown component name or bad keyword argument.

    The command line turns it into exit code 2.
    """


class DataError(DeepMetricError, ValueError):
    """Bad or missing data: shapes that do not match, an empty dataset, a missing file."""


class NonFiniteError(DeepMetricError, FloatingPointError):
    """A NaN or infinity appeared in embeddings, a loss or gradients."""


class CheckpointError(DeepMetricError, ValueError):
    """A checkpoint that is corrupt, foreign (not written by deepmetric) or incompatible."""
