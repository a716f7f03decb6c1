"""DoGraph's own state in every checkpoint, restored on resume.

The Trainer saves the weights, the optimizer, the scheduler, the RNG states and `trainer_state.json`;
what DoGraph adds is written beside them as `dograph_state.json` (JSON, so it can be read and diffed
without torch):

- the DoGraph settings (m, k, objective, engine, λ, ...) and the projection seed: the projection R is
  regenerated from the seed, never stored;
- the domain finder's state (the online centroids and when they were fitted, if any);
- the group-DRO baseline's log-weights, if that strategy runs;
- the weight history (one entry per micro-batch: what the plots and the model card show) and a
  summary of the last micro-batch (weights, sizes, centroid affinities, model × human counts);
- the global step and the trainer's micro-step counter `_micro_step`, on which the K-means seed
  depends (`DoGraphTrainer._step_key`);
- the DoGraph metrics accumulated since the last log, so the first log after a resume averages the
  same micro-batches as an uninterrupted run.

`DoGraphCheckpointMixin` (a base class of `DoGraphTrainer`) writes the file with every `save_model`
(so into each `checkpoint-N` and into `output_dir`, hence onto the Hub) and reads it back when
`train(resume_from_checkpoint=...)` is given; `resume_from_checkpoint` may also name a Hub repo
(`user/name`, `user/name@revision`, `user/name:subfolder`), downloaded first (see `hub.resolve_checkpoint`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

DOGRAPH_STATE_NAME = "dograph_state.json"
STATE_FORMAT = "hf_dograph.dograph_state"
STATE_VERSION = 1


# ----------------------------------------------------------------------------- the last micro-batch
def centroid_affinity(centroids: torch.Tensor) -> torch.Tensor:
    """A_jk = max(0, cos(z̄_j, z̄_k)) with a zero diagonal: the domain graph's edge weights (METHOD.md)."""
    c = centroids.detach().to("cpu", torch.float64)
    norms = c.norm(dim=1, keepdim=True).clamp(min=1e-300)
    cos = (c / norms) @ (c / norms).T
    a = cos.clamp(min=0.0)
    a.fill_diagonal_(0.0)
    return a


def contingency(model_domains: torch.Tensor, human_domains: torch.Tensor) -> list[list[int]]:
    """counts[j][h]: samples of model domain j with human label h (samples left out, id -1, skipped)."""
    keep = model_domains >= 0
    md, hd = model_domains[keep].long(), human_domains[keep].long()
    if md.numel() == 0:
        return []
    m, h = int(md.max()) + 1, int(hd.max()) + 1
    counts = torch.zeros(m, h, dtype=torch.long)
    counts.index_put_((md, hd), torch.ones_like(md), accumulate=True)
    return counts.tolist()


def summarize_record(record) -> dict:
    """A JSON-able summary of a `DoGraphStepRecord`: what the graph plot and the heatmap need.

    Centroids are m × k (k ~ 1024), too big to keep per step: only their m × m affinity is kept.
    """
    summary = {
        "domain_weights": [float(x) for x in record.domain_weights],
        "cluster_sizes": [int(x) for x in record.cluster_sizes],
    }
    centroids = (record.extra or {}).get("centroids")
    if centroids is not None and centroids.shape[0] == record.domain_weights.numel():
        summary["affinity"] = centroid_affinity(torch.as_tensor(centroids)).tolist()
    if record.human_domains is not None:
        summary["contingency"] = contingency(record.assignments, record.human_domains)
    return summary


# ----------------------------------------------------------------------------- state <-> trainer
def _finite_or_none(x: float):
    return x if math.isfinite(x) else None  # JSON has no NaN; a NaN metric is dropped on the way back


def dograph_state(trainer) -> dict:
    """Everything DoGraph needs to continue a run exactly, and the history the card and plots show."""
    s = trainer.dograph_settings
    gs, i = getattr(trainer, "_micro_step", (None, 0))
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "global_step": int(trainer.state.global_step),
        "micro_step": [gs, int(i)],
        "settings": s.to_dict(),
        "projection_seed": int(s.projection_seed),
        "domain_finder": trainer.domain_finder.state_dict(),
        "group_dro": trainer.group_dro.state_dict() if getattr(trainer, "group_dro", None) is not None else None,
        "history": list(trainer.dograph_history),
        "last_step": getattr(trainer, "_dograph_last_summary", None),
        "pending_metrics": {k: [_finite_or_none(float(v)) for v in vs] for k, vs in trainer._metrics.items()},
        "pending_nonfinite": int(getattr(trainer, "_nonfinite_since_log", 0)),
    }


def save_dograph_state(trainer, output_dir: str | os.PathLike) -> Path:
    """Write `dograph_state.json` into `output_dir` (created if needed); returns its path."""
    path = Path(output_dir) / DOGRAPH_STATE_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    # Write then rename: a run killed mid-write never leaves a truncated state beside good weights.
    # Compact: the history has one entry per micro-batch, so long runs make this file several MB.
    tmp.write_text(json.dumps(dograph_state(trainer), separators=(",", ":")), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_dograph_state(path: str | os.PathLike) -> dict:
    """Read a `dograph_state.json` (or the one inside a folder)."""
    p = Path(path)
    if p.is_dir():
        p = p / DOGRAPH_STATE_NAME
    state = json.loads(p.read_text(encoding="utf-8"))
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{p} is not a DoGraph state file (format {state.get('format')!r})")
    if int(state.get("version", 0)) > STATE_VERSION:
        raise ValueError(
            f"{p} was written by a newer hf_dograph (state version {state['version']} > {STATE_VERSION}): upgrade"
        )
    return state


def settings_differences(saved: dict, current: dict) -> dict:
    """{field: (saved, current)} for the settings that differ."""
    return {k: (saved[k], current.get(k)) for k in saved if k in current and saved[k] != current[k]}


def restore_dograph_state(trainer, state: dict) -> None:
    """Put a saved DoGraph state back into `trainer` (before `train()` continues from the checkpoint).

    Settings are not overwritten: they come from the trainer's arguments. If they differ from the
    checkpoint's the run still resumes, with a warning, since it is then no longer the same run.
    """
    diff = settings_differences(state.get("settings", {}), trainer.dograph_settings.to_dict())
    if diff:
        logger.warning(
            "Resuming with DoGraph settings that differ from the checkpoint's (%s): the run continues, but it is not "
            "the run that was checkpointed.", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()),
        )
    trainer.domain_finder.load_state_dict(state.get("domain_finder") or {})
    if state.get("group_dro") is not None and getattr(trainer, "group_dro", None) is not None:
        trainer.group_dro.load_state_dict(state["group_dro"])
    trainer.dograph_history = list(state.get("history") or [])
    trainer._dograph_last_summary = state.get("last_step")
    gs, i = state.get("micro_step") or [None, 0]
    trainer._micro_step = (gs, int(i))
    trainer._metrics.clear()
    for k, vs in (state.get("pending_metrics") or {}).items():
        trainer._metrics[k].extend(float(v) for v in vs if v is not None)
    trainer._nonfinite_since_log = int(state.get("pending_nonfinite", 0))


def checkpoint_has_state(checkpoint: str | os.PathLike) -> bool:
    return (Path(checkpoint) / DOGRAPH_STATE_NAME).is_file()


# ----------------------------------------------------------------------------- the mixin
class DoGraphCheckpointMixin:
    """Hooks `DoGraphTrainer` gets from this module (a base class placed before `Trainer`).

    - `save_model`: after the Trainer's save, writes `dograph_state.json` beside the weights (main
      process only). `_save_checkpoint` and `push_to_hub` both go through `save_model`, so every
      checkpoint and every push carries it, written *before* any upload starts.
    - `train`: `resume_from_checkpoint` may be a Hub reference; DoGraph's state is restored from the
      checkpoint before the Trainer continues; plots are written at the end (`write_dograph_plots`).
    - `_dograph_observe`: called by `DoGraphTrainer._record` for every micro-batch; keeps the summary
      of the last one and adds the model/human NMI to its history entry.
    """

    #: write the plots into output_dir (and TensorBoard) when `train()` ends; set False to skip
    dograph_write_plots: bool = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            save_dograph_state(self, output_dir if output_dir is not None else self.args.output_dir)

    def _dograph_observe(self, record) -> None:
        self._dograph_last_summary = summarize_record(record)
        if record.human_domains is not None and self.dograph_history:
            kept = record.assignments >= 0
            if bool(kept.any()) and self.dograph_settings.mixing_strategy == "dograph":
                from .domains import normalized_mutual_information

                nmi = normalized_mutual_information(record.assignments[kept], record.human_domains[kept])
                self.dograph_history[-1]["nmi"] = round(nmi, 6)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        checkpoint = resume_from_checkpoint
        if isinstance(checkpoint, bool):
            if checkpoint:
                from transformers.trainer_utils import get_last_checkpoint

                # None lets the Trainer raise its own "no valid checkpoint" error below.
                checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
                resume_from_checkpoint = checkpoint or True
            else:
                checkpoint = None
        elif checkpoint is not None and not os.path.isdir(str(checkpoint)):
            from .hub import resolve_checkpoint

            checkpoint = resume_from_checkpoint = resolve_checkpoint(str(checkpoint))
        if checkpoint is not None:
            if checkpoint_has_state(checkpoint):
                restore_dograph_state(self, load_dograph_state(checkpoint))
            else:
                logger.warning(
                    "%s has no %s (a checkpoint of a plain Trainer or an older run): DoGraph's state (weight history, "
                    "online domains) starts afresh; the weights, optimizer and schedule are restored as usual.",
                    checkpoint, DOGRAPH_STATE_NAME,
                )
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )
        if self.dograph_write_plots and self.is_world_process_zero() and self.dograph_history:
            self.write_dograph_plots()
        return output

    def write_dograph_plots(self, output_dir: str | None = None) -> dict:
        """Write the plots into `output_dir` (default: args.output_dir) and, when TensorBoard is among
        `report_to`, log them to the run's TensorBoard folder. Returns {name: path}."""
        from . import plots

        out = output_dir or self.args.output_dir
        state = dograph_state(self)
        paths = plots.write_plots(state, out, domain_names=plots.domain_names_from(out))
        if "tensorboard" in (self.args.report_to or []):
            plots.log_to_tensorboard(state, plots.tensorboard_dir(self), step=int(self.state.global_step),
                                     domain_names=plots.domain_names_from(out))
        return paths
