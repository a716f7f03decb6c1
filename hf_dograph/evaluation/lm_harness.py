"""Downstream scores from lm-evaluation-harness: by default the paper's nine tasks, or your own task YAMLs.

Needs the optional extra (`pip install "hf_dograph[lm-eval]"`). `lm_eval_scores` runs the harness on a
checkpoint and writes `lm_eval_results.json` beside a local one, which the model card then shows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..hub import resolve_model
from ..jsonfiles import write_json

LM_EVAL_FILE = "lm_eval_results.json"
#: The nine lm-eval-harness tasks of the paper (HellaSwag, PiQA, OBQA, COPA, LogiQA, WinoGrande, SciQ,
#: ARC-Easy, Lambada), by their lm-eval task names.
PAPER_TASKS = ("hellaswag", "piqa", "openbookqa", "copa", "logiqa", "winogrande", "sciq", "arc_easy", "lambada_openai")
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


def scores_from_lm_eval(results: dict, tasks: Sequence[str] | None = None) -> dict:
    """{task: {"metric": "acc_norm" | "acc" | ..., "value": fraction}} from `lm_eval.simple_evaluate`'s output:
    acc_norm where the task has it (as the paper), else acc, else its first numeric non-stderr metric."""
    out = {}
    per_task = results.get("results", results)
    for task in tasks or list(per_task):
        metrics = per_task.get(task)
        if not metrics:
            continue
        values = {k.split(",")[0]: v for k, v in metrics.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k}
        for name in ("acc_norm", "acc", *values):
            if name in values:
                out[task] = {"metric": name, "value": float(values[name])}
                break
    return out


def lm_eval_scores(
    checkpoint: str,
    tasks: Sequence[str] = PAPER_TASKS,
    *,
    batch_size: int | str = 8,
    device: str | None = None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    save: bool = True,
    token: str | None = None,
    include_path: str | os.PathLike | None = None,
) -> dict:
    """Run lm-eval-harness tasks (default: the paper's nine) on a checkpoint (folder or Hub reference).

    Needs the optional extra: `pip install "hf_dograph[lm-eval]"`. Returns `scores_from_lm_eval`'s dict and,
    for a local folder with `save`, writes it to `lm_eval_results.json` there, which the card then shows.
    `include_path`: a folder of your own lm-eval task YAMLs (e.g. on local data files, for offline machines),
    whose task names may then appear in `tasks`.
    """
    try:
        import lm_eval
    except ImportError as err:
        raise ImportError(
            'lm-eval-harness is not installed; it is an optional extra: pip install "hf_dograph[lm-eval]"'
        ) from err
    path = resolve_model(checkpoint, token=token)
    kwargs = dict(model="hf", model_args=f"pretrained={path}", tasks=list(tasks), batch_size=batch_size, limit=limit)
    if device is not None:
        kwargs["device"] = device
    if num_fewshot is not None:
        kwargs["num_fewshot"] = num_fewshot
    if include_path is not None:
        from lm_eval.tasks import TaskManager

        kwargs["task_manager"] = TaskManager(include_path=str(include_path))
    results = lm_eval.simple_evaluate(**kwargs)
    scores = scores_from_lm_eval(results, tasks)
    if save and os.path.isdir(checkpoint):
        write_json(Path(checkpoint) / LM_EVAL_FILE, scores)
    return scores
