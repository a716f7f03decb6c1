"""hf_dograph: DoGraph data mixing as a drop-in for the Hugging Face Trainer."""

from .config import DoGraphConfig, DoGraphSettings

__all__ = ["DoGraphConfig", "DoGraphSettings", "DoGraphTrainer", "DoGraphStepRecord"]
__version__ = "0.1.0"


def __getattr__(name):
    # The trainer pulls in opacus and scikit-learn: import it only when asked for.
    if name in ("DoGraphTrainer", "DoGraphStepRecord"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
