"""DoGraph's own state in every checkpoint, restored on resume.

The Trainer saves the weights, the optimizer, the scheduler, the RNG states and `trainer_state.json`;
what DoGraph adds is written beside them as `dograph_state.json` (JSON, so it can be read and diffed
without torch):

- the DoGraph settings (m, k, objective, engine, λ, ...) and the projection seed: the projection R is
  regenerated from the seed, never stored;
- the weighting strategy's state: for the persistent domains the window of recent sketches, the centroids,
  statistics, smoothed weights and counters (tensors stored exactly, base64 inside the JSON); for the
  per-batch mode its K-means step key; for group DRO its log-weights;
- the weight history (one entry per optimizer step, per micro-batch for the per-batch strategies: what the
  plots and the model card show) and a summary of the last micro-batch (weights, sizes, centroid
  affinities, model × human counts);
- the DoGraph metrics accumulated since the last log, so the first log after a resume averages the
  same steps as an uninterrupted run, and the count of consecutive non-finite steps.

`DoGraphCheckpointMixin` (a base class of `DoGraphTrainer`) writes the file with every `save_model`
(so into each `checkpoint-N` and into `output_dir`, hence onto the Hub) and reads it back when
`train(resume_from_checkpoint=...)` is given; `resume_from_checkpoint` may also name a Hub repo
(`user/name`, `user/name@revision`, `user/name:subfolder`), downloaded first (see `hub.resolve_checkpoint`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from .state_file import (
    DOGRAPH_STATE_NAME,
    STATE_FORMAT,
    STATE_VERSION,
    decode_tensors,
    encode_tensors,
    load_dograph_state,
    write_state_file,
)

logger = logging.getLogger(__name__)


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


def summarize_record(record) -> dict | None:
    """A JSON-able summary of a `DoGraphStepRecord`: what the graph plot and the heatmap need (None before any
    domain exists).

    Centroids are m × k (k ~ 1024), too big to keep per step: only their m × m affinity is kept.
    """
    if record is None or record.domain_weights is None or record.cluster_sizes is None:
        return None  # no model domains (warm-up, or a baseline)
    summary = {
        "domain_weights": [float(x) for x in record.domain_weights.tolist()],
        "cluster_sizes": [int(round(float(x))) for x in record.cluster_sizes.tolist()],
    }
    centroids = (record.extra or {}).get("centroids")
    if centroids is not None and centroids.shape[0] == record.domain_weights.numel():
        summary["affinity"] = centroid_affinity(torch.as_tensor(centroids)).tolist()
    if record.human_domains is not None:
        summary["contingency"] = contingency(record.assignments.cpu(), record.human_domains.cpu())
    return summary


# ----------------------------------------------------------------------------- state <-> trainer
def _finite_or_none(x: float):
    return x if math.isfinite(x) else None  # JSON has no NaN; a NaN metric is dropped on the way back


# Settings whose change makes the stored domain model meaningless (other sketches) or a different shape.
_SKETCH_SETTINGS = ("projection_dim", "projection_seed", "grad_engine")


def dograph_state(trainer) -> dict:
    """Everything DoGraph needs to continue a run exactly, and the history the card and plots show."""
    s = trainer.dograph_settings
    trainer.flush_dograph_history()
    meta, tensors = trainer.dograph_strategy.state_dict()
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "global_step": int(trainer.state.global_step),
        "settings": s.to_dict(),
        "projection_seed": int(s.projection_seed),
        "strategy": {"name": type(trainer.dograph_strategy).__name__, "meta": meta,
                     "tensors": encode_tensors(tensors)},
        "history": list(trainer.dograph_history),
        "last_step": summarize_record(getattr(trainer, "dograph_last", None)),
        "pending_metrics": {k: [_finite_or_none(float(v)) for v in vs] for k, vs in trainer._metrics.items()},
        "nonfinite": {"run": int(trainer._nonfinite_run), "steps_since_log": int(trainer._nonfinite_steps_since_log)},
    }


def save_dograph_state(trainer, output_dir: str | os.PathLike) -> Path:
    """Write `dograph_state.json` into `output_dir` (created if needed); returns its path."""
    return write_state_file(output_dir, dograph_state(trainer))


def settings_differences(saved: dict, current: dict) -> dict:
    """{field: (saved, current)} for the settings that differ."""
    return {k: (saved[k], current.get(k)) for k in saved if k in current and saved[k] != current[k]}


def restore_dograph_state(trainer, state: dict) -> None:
    """Put a saved DoGraph state back into `trainer` (before `train()` continues from the checkpoint).

    Settings come from the trainer's arguments, never from the checkpoint. Every restored piece is checked
    against them: the domain model is kept only if it was built for the same sketches (projection_dim,
    projection_seed, grad_engine) and the same strategy; a changed num_domains or domain_window refits the
    domains from the stored window at the next step; anything else that differs is reported, and the run
    continues (it is then not the run that was checkpointed).
    """
    saved = state.get("settings", {})
    current = trainer.dograph_settings.to_dict()
    diff = settings_differences(saved, current)
    if diff:
        logger.warning(
            "Resuming with DoGraph settings that differ from the checkpoint's (%s): the run continues, but it is not "
            "the run that was checkpointed.", ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()),
        )
    strategy = state.get("strategy") or {}
    sketch_changed = [k for k in _SKETCH_SETTINGS if k in diff]
    if strategy.get("name") != type(trainer.dograph_strategy).__name__:
        if strategy:
            logger.warning("The checkpoint's DoGraph state is for %s, this run uses %s: it starts afresh.",
                           strategy.get("name"), type(trainer.dograph_strategy).__name__)
    elif sketch_changed:
        logger.warning(
            "The checkpoint's domain model was built from other gradient sketches (%s changed): its window and "
            "domains cannot be reused, so DoGraph starts a new warm-up (uniform weights until "
            "domain_warmup_samples samples have been seen).", ", ".join(sketch_changed))
    else:
        meta, tensors = strategy.get("meta") or {}, decode_tensors(strategy.get("tensors"))
        meta, tensors = _adapt_domain_model(meta, tensors, saved, current)
        device = trainer.args.device
        trainer.dograph_strategy.load_state_dict(meta, tensors, device=device)
    trainer.dograph_history = list(state.get("history") or [])
    trainer._pending_history = []
    trainer._metrics.clear()
    for k, vs in (state.get("pending_metrics") or {}).items():
        trainer._metrics[k].extend(torch.tensor(float(v), dtype=torch.float64) for v in vs if v is not None)
    nonfinite = state.get("nonfinite") or {}
    trainer._nonfinite_run = int(nonfinite.get("run", 0))
    trainer._nonfinite_steps_since_log = int(nonfinite.get("steps_since_log", 0))


def _adapt_domain_model(meta: dict, tensors: dict, saved: dict, current: dict) -> tuple[dict, dict]:
    """Make a stored persistent domain model fit changed settings, safely: the window is kept (same sketches),
    centroids and weights of another num_domains are dropped (a refit follows at the next step), a window of
    another size is cut to its most recent rows or padded."""
    if "z" not in tensors:
        return meta, tensors
    meta = dict(meta)
    capacity = int(current.get("domain_window") or len(tensors["z"]))
    new_domains = saved.get("num_domains") != current.get("num_domains")
    if new_domains or capacity != len(tensors["z"]):
        # the rows' domains under the old centroids / in the old ring: recomputed when the model is loaded
        tensors = {k: v for k, v in tensors.items() if k not in ("domain", "spread")}
    if new_domains:
        for name in ("centroids", "weights", "multipliers"):
            tensors.pop(name, None)
        tensors = {k: v for k, v in tensors.items() if not k.startswith("stats.")}
        meta["last_refit_step"] = None
        meta["refit_now"] = True
    old = len(tensors["z"])
    if capacity != old:
        # Unroll the ring (oldest first), keep the newest rows, pad with empty (invalid) rows.
        ptr, filled = int(meta.get("ptr", 0)), int(meta.get("filled", old))
        order = torch.arange(ptr - filled, ptr) % old
        for name in ("z", "loss", "items", "valid"):
            rows = tensors[name][order][-capacity:]
            pad = torch.zeros((capacity - len(rows), *rows.shape[1:]), dtype=rows.dtype)
            tensors[name] = torch.cat([rows, pad])
        meta["filled"] = min(filled, capacity)
        meta["ptr"] = meta["filled"] % capacity
    meta["capacity"] = capacity
    return meta, tensors


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
        from .redaction import pickle_without_credentials

        # The Trainer pickles its arguments into training_args.bin here, in each checkpoint and before each Hub
        # push: from now on that pickle holds no hub_token (or any credential field); self.args keeps them.
        pickle_without_credentials(self.args)
        if self.args.should_save:  # files this process writes are its own run, not "another run" (run_folder)
            from .run_folder import mark_owned

            mark_owned(output_dir if output_dir is not None else self.args.output_dir)
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            save_dograph_state(self, output_dir if output_dir is not None else self.args.output_dir)

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`, plus: the output folder is locked for the run and a folder holding another run is
        refused unless `resume_from_checkpoint` or `overwrite_output_dir=True` is given (`run_folder`);
        `resume_from_checkpoint=True` takes the last *complete* checkpoint; a Hub reference is downloaded;
        DoGraph's state is restored from the checkpoint; plots are written at the end."""
        from .redaction import pickle_without_credentials
        from .run_folder import claim_output_dir, resume_checkpoint

        overwrite = bool(kwargs.pop("overwrite_output_dir", False) or getattr(self.args, "overwrite_output_dir", False))
        pickle_without_credentials(self.args)  # training_args.bin, in every checkpoint and push, holds no token
        resuming = resume_from_checkpoint is not None and resume_from_checkpoint is not False
        # The main process holds the lock for all; every process checks the folder (all see the same files).
        with claim_output_dir(self.args.output_dir, overwrite=overwrite, resume=resuming,
                              lock=self.args.process_index == 0):
            checkpoint = resume_checkpoint(self.args.output_dir, resume_from_checkpoint)
            if checkpoint is not None:
                resume_from_checkpoint = checkpoint
                if checkpoint_has_state(checkpoint):
                    restore_dograph_state(self, load_dograph_state(checkpoint))
                else:
                    logger.warning(
                        "%s has no %s (a checkpoint of a plain Trainer or an older run): DoGraph's state (weight "
                        "history, online domains) starts afresh; the weights, optimizer and schedule are restored as "
                        "usual.", checkpoint, DOGRAPH_STATE_NAME,
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
