"""Per-sample gradient sketch engines: the reference (Opacus) engine and the fast factored engine."""

from .base import ENGINES, GradEngine, UnsupportedLayerError, build_engine, register_engine, trainable_parameters
from .projection import BlockGaussianProjection, gaussian_matrix
from . import factored, opacus_engine  # noqa: F401  (register "factored" and "opacus")
from .loss_only import LossOnlyEngine

__all__ = [
    "ENGINES",
    "GradEngine",
    "LossOnlyEngine",
    "UnsupportedLayerError",
    "build_engine",
    "register_engine",
    "trainable_parameters",
    "BlockGaussianProjection",
    "gaussian_matrix",
]
