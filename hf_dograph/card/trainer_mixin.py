"""The trainer's side of the card: `DoGraphTrainer` writes the DoGraph card instead of the Trainer's, and its
checkpoint pushes carry the card, plots and DoGraph state along.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..checkpointing import dograph_state
from ..evaluation.per_domain import PER_DOMAIN_FILE, evaluate_per_domain
from ..plots import domain_names_from
from ..state_file import DOGRAPH_STATE_NAME
from .facts import looks_like_hub_id
from .render import write_model_card
from .sections import enum_value, training_from_args

logger = logging.getLogger(__name__)


def _base_model_of(model) -> str | None:
    """The Hub id a model was loaded from, when it was (PEFT: the adapter's base)."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and peft_config:
        name = getattr(next(iter(peft_config.values())), "base_model_name_or_path", None)
        return name if looks_like_hub_id(name) else None
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    return name if looks_like_hub_id(name) else None


class DoGraphCardMixin:
    """`create_model_card` writes the DoGraph card (replacing the Trainer's), so `trainer.push_to_hub()` publishes
    it with the checkpoint; checkpoint pushes (`hub_strategy`) carry the card, plots and DoGraph state too.

    Per-domain results come from `create_model_card(per_domain=...)`, else `trainer.dograph_eval_result` (set it
    after your own evaluation), else `output_dir/per_domain_eval.json`, else an evaluation of `eval_dataset` by
    human domain when it has the domain label column.
    """

    dograph_eval_result = None

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None, per_domain=None,
                          lm_eval=None, **kwargs):
        if not self.is_world_process_zero():
            return
        self._write_dograph_card(language=language, license=license, tags=tags, model_name=model_name,
                                 finetuned_from=finetuned_from, dataset=dataset or dataset_tags,
                                 per_domain=per_domain, lm_eval=lm_eval, evaluate=True)

    def _write_dograph_card(self, *, evaluate: bool, finetuned_from=None, dataset=None, per_domain=None, **kwargs):
        out = Path(self.args.output_dir)
        if per_domain is None:
            per_domain = self.dograph_eval_result
        if per_domain is None and not (out / PER_DOMAIN_FILE).is_file() and evaluate:
            per_domain = self.dograph_eval_result = self._dograph_evaluate_per_domain()
        repo_id = getattr(self, "hub_model_id", None) or self.args.hub_model_id
        model = self.accelerator.unwrap_model(self.model)
        return write_model_card(
            out, state=dograph_state(self), repo_id=repo_id, per_domain=per_domain,
            base_model=finetuned_from or _base_model_of(model), datasets=dataset,
            training=training_from_args(self.args, int(self.state.global_step), self.args.world_size), **kwargs,
        )

    def _dograph_evaluate_per_domain(self):
        """Per-domain validation of `eval_dataset` by its human domain column, when it has one; else None."""
        col = self.dograph_settings.domain_label_column
        ds = self.eval_dataset
        names = getattr(ds, "column_names", None)
        if ds is None or isinstance(ds, dict) or names is None or col not in names or "input_ids" not in names:
            return None
        domain_names = domain_names_from(self.args.output_dir) or [f"domain {d}" for d in range(max(ds[col]) + 1)]
        try:
            return evaluate_per_domain(
                self.accelerator.unwrap_model(self.model), ds, self.data_collator, domain_names,
                batch_size=self.args.per_device_eval_batch_size, domain_key=col,
            )
        except (KeyError, TypeError, ValueError) as err:  # a collator that drops the label, an odd dataset
            logger.warning("model card: no per-domain evaluation (%s)", err)
            return None

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        pushing = self.is_world_process_zero() and enum_value(self.args.hub_strategy) != "end"
        busy = (not self.args.hub_always_push and getattr(self, "push_in_progress", None) is not None
                and not self.push_in_progress.is_done())
        if pushing and not busy:
            # The Trainer copies only the weights into output_dir before pushing it: bring DoGraph's state,
            # plots and card along (no evaluation here: it would run at every save).
            src = Path(checkpoint_folder) / DOGRAPH_STATE_NAME
            if src.is_file():
                shutil.copy(src, Path(self.args.output_dir) / DOGRAPH_STATE_NAME)
            self._write_dograph_card(evaluate=False)
        super()._push_from_checkpoint(checkpoint_folder)
