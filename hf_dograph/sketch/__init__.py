"""Per-sample gradient sketch engines: the reference (Opacus) engine and the fast factored engine."""

from .base import ENGINES, GradEngine, UnsupportedLayerError, build_engine, register_engine, trainable_parameters
from .layout import SampleLayout
from .projection import BlockGaussianProjection, gaussian_matrix
from . import factored, opacus_engine  # noqa: F401  (register "factored" and "opacus")
from .checks import check_training_setup
from .layers.generic import register_tokenwise
from .loss_only import LossOnlyEngine

__all__ = [
    "ENGINES",
    "GradEngine",
    "LossOnlyEngine",
    "SampleLayout",
    "UnsupportedLayerError",
    "build_engine",
    "check_training_setup",
    "register_engine",
    "register_tokenwise",
    "trainable_parameters",
    "BlockGaussianProjection",
    "gaussian_matrix",
]
