"""Per-sample gradient sketch engines: the reference (Opacus) engine and the fast factored engine."""

from .base import ENGINES, GradEngine, UnsupportedLayerError, build_engine, register_engine, trainable_parameters
from .projection import BlockGaussianProjection, gaussian_matrix
from . import opacus_engine  # noqa: F401  (registers "opacus")

try:  # the factored engine registers "factored" when present
    from . import factored  # noqa: F401
except ImportError:  # pragma: no cover - during development only
    pass

__all__ = [
    "ENGINES",
    "GradEngine",
    "UnsupportedLayerError",
    "build_engine",
    "register_engine",
    "trainable_parameters",
    "BlockGaussianProjection",
    "gaussian_matrix",
]
