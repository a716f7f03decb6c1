"""The DoGraph model card: a run folder's facts read (`facts`), turned into tables (`sections`) and rendered
from the template (`render`); `DoGraphTrainer` writes it through `trainer_mixin`.

`eval_command` and `lm_eval_scores` live in `hf_dograph.evaluation`; they stay importable from here.
"""

from ..evaluation import eval_command, lm_eval_scores
from .facts import RunFacts, read_run_facts
from .render import (
    ARXIV_ID,
    BASE_TAGS,
    CARD_MARKER,
    TEMPLATE_NAME,
    build_model_card,
    is_dograph_card,
    render_model_card,
    template_path,
    write_model_card,
)
from .trainer_mixin import DoGraphCardMixin

__all__ = [
    "ARXIV_ID", "BASE_TAGS", "CARD_MARKER", "TEMPLATE_NAME", "DoGraphCardMixin", "RunFacts", "build_model_card",
    "eval_command", "is_dograph_card", "lm_eval_scores", "read_run_facts", "render_model_card", "template_path",
    "write_model_card",
]
