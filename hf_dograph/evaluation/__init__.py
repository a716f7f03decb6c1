"""Evaluation: per-domain validation loss and perplexity (`per_domain`), `hf-dograph eval` (`command`), and
downstream scores from lm-evaluation-harness (`lm_harness`)."""

from .command import eval_command
from .lm_harness import LM_EVAL_FILE, PAPER_TASKS, lm_eval_scores, scores_from_lm_eval
from .per_domain import (
    PER_DOMAIN_FILE,
    PerDomainResult,
    compare_table,
    evaluate_per_domain,
    per_domain_perplexity_path,
)

__all__ = [
    "LM_EVAL_FILE",
    "PAPER_TASKS",
    "PER_DOMAIN_FILE",
    "PerDomainResult",
    "compare_table",
    "eval_command",
    "evaluate_per_domain",
    "lm_eval_scores",
    "per_domain_perplexity_path",
    "scores_from_lm_eval",
]
