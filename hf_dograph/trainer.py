"""`DoGraphTrainer`: `transformers.Trainer` whose training step weights samples by model-perceived domains.

Swap `Trainer` for `DoGraphTrainer` in an existing script and each micro-batch goes through
METHOD.md's step, top to bottom in `training_step`:

  1. per-sample losses ℓ_i and (through the engine) per-sample gradient sketches z_i;
  2. K-means on the z_i → domains; their statistics (sizes, σ², losses);
  3. domain weights w on the simplex from the objective (+ graph term);
  4. α_i = w_{c(i)} / n_{c(i)} and the exact gradient Σ_i α_i g_i added into `.grad`.

Clipping, the optimizer, the scheduler, logging and checkpointing are the Trainer's own.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from transformers import Trainer

from .card import DoGraphCardMixin
from .checkpointing import DoGraphCheckpointMixin
from .config import DoGraphSettings
from .distributed import all_reduce_gradients, gather_rows, is_distributed, no_sync
from .domains import DomainFinder, domain_statistics, normalized_mutual_information
from .losses import IGNORE_INDEX, causal_lm_per_sample_loss, classification_per_sample_loss
from .sketch import LossOnlyEngine, build_engine

logger = logging.getLogger(__name__)


@dataclass
class DoGraphStepRecord:
    """What DoGraph decided for the last micro-batch (`trainer.dograph_last`).

    Samples left out of the step (non-finite loss or gradient) have assignment -1 and weight 0.
    """

    assignments: torch.Tensor  # LongTensor[B]: model domain of each sample (-1: left out)
    domain_weights: torch.Tensor  # Tensor[m]: w on the simplex
    sample_weights: torch.Tensor  # Tensor[B]: α, sums to 1 over the samples kept
    sigma2: torch.Tensor  # Tensor[m]: intra-domain variance of the sketches
    losses: torch.Tensor  # Tensor[B]: per-sample losses ℓ_i
    cluster_sizes: torch.Tensor  # LongTensor[m]
    domain_losses: torch.Tensor  # Tensor[m]
    objective_value: float = float("nan")
    num_nonfinite: int = 0
    human_domains: torch.Tensor | None = None  # LongTensor[B] if the batch carried them
    extra: dict = field(default_factory=dict)


def _entropy(w: torch.Tensor) -> float:
    w = w[w > 0].double()
    return float(-(w * w.log()).sum())


class DoGraphTrainer(DoGraphCheckpointMixin, DoGraphCardMixin, Trainer):
    """A `transformers.Trainer` that applies DoGraph's weighted gradient at every training step.

    Takes the same arguments as `Trainer`. `args` may be a `DoGraphConfig` (TrainingArguments + DoGraph
    settings) or a plain `TrainingArguments`, in which case DoGraph's defaults apply.

    After each step `trainer.dograph_last` holds a `DoGraphStepRecord`; every logging step adds DoGraph's
    metrics (`dograph/*`) to the Trainer's logs, so TensorBoard/W&B receive them.
    """

    # training_step returns the batch's mean per-sample loss; the Trainer expects it divided by the number
    # of accumulation steps, which training_step does itself.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        # Validate DoGraph settings before the (slow) Trainer set-up, so bad input fails at once.
        self.dograph_settings = (
            DoGraphSettings.from_args(training_args) if training_args is not None else DoGraphSettings()
        )
        super().__init__(*args, **kwargs)
        if getattr(self, "is_fsdp_enabled", False):
            raise NotImplementedError(
                "DoGraphTrainer does not support FSDP yet: its per-sample gradient engines hook whole (unsharded) "
                "weight matrices, which FSDP shards. Use DDP (plain `accelerate launch`/`torchrun` without an FSDP "
                "config), which DoGraph supports exactly; see README, 'Several GPUs'."
            )
        s = self.dograph_settings
        self.dograph_last: DoGraphStepRecord | None = None
        self.dograph_history: list[dict] = []
        self.domain_finder = DomainFinder(
            s.num_domains,
            seed=s.projection_seed,
            n_init=s.kmeans_n_init,
            max_iter=s.kmeans_max_iter,
            refit_steps=s.domain_refit_steps,
        )
        self.group_dro = None
        if s.mixing_strategy == "group_dro":
            from .strategies import GroupDRO

            self.group_dro = GroupDRO(step_size=s.group_dro_step_size)
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._nonfinite_since_log = 0
        self._engine = None
        self._fallback_engine = None
        self._accepts_position_ids: bool | None = None
        self._micro_step = (None, 0)  # (global_step, micro-batch index within it)

    # ------------------------------------------------------------------ columns and evaluation
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        # Keep the human domain label through `remove_unused_columns`: it is logged, never fed to the model.
        col = self.dograph_settings.domain_label_column
        if col not in self._signature_columns:
            self._signature_columns.append(col)

    def _strip_domain_label(self, inputs: dict) -> dict:
        col = self.dograph_settings.domain_label_column
        return {k: v for k, v in inputs.items() if k != col} if col in inputs else inputs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return super().compute_loss(
            model, self._strip_domain_label(inputs), return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        return super().prediction_step(model, self._strip_domain_label(inputs), prediction_loss_only, ignore_keys)

    # ------------------------------------------------------------------ the engine
    @property
    def grad_engine(self):
        """The micro-batch's gradient engine (built on the first training step).

        DoGraph needs per-sample gradient sketches: `grad_engine` picks the engine ("factored" or "opacus").
        The baselines choose α from losses alone and get `LossOnlyEngine`: one ordinary backward of Σ α_i ℓ_i,
        so they cost what a plain Trainer step costs.
        """
        if self._engine is None:
            if self.dograph_settings.mixing_strategy == "dograph":
                self._engine = self._build_per_sample_engine()
            else:
                self._engine = LossOnlyEngine(self.accelerator.unwrap_model(self.model))
        return self._engine

    def _build_per_sample_engine(self):
        s = self.dograph_settings
        engine = build_engine(
            s.grad_engine, self.accelerator.unwrap_model(self.model), projection_dim=s.projection_dim,
            seed=s.projection_seed,
        )
        engine.attach()
        for line in engine.log_lines():
            logger.warning(line)
        return engine

    def _per_sample_fallback(self):
        """A per-sample engine for a baseline micro-batch with a non-finite loss (built once, on first need)."""
        if self._fallback_engine is None:
            self._fallback_engine = self._build_per_sample_engine()
        return self._fallback_engine

    # ------------------------------------------------------------------ the step
    def per_sample_losses(self, model, inputs: dict) -> torch.Tensor:
        """ℓ_i for each sample of the batch, (B,). Override for models other than causal LMs and
        sequence classifiers."""
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        if labels.dim() == 2 and "input_ids" in model_inputs and self._model_accepts_position_ids(model):
            if "position_ids" not in model_inputs:
                # Per-sample gradients need every input batched: a (1, T) position_ids broadcast over the batch
                # would give the position embedding one gradient for the whole batch.
                b, t = model_inputs["input_ids"].shape
                model_inputs["position_ids"] = torch.arange(t, device=labels.device).expand(b, t)
        outputs = model(**model_inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if logits.dim() == 3:
            losses, _ = causal_lm_per_sample_loss(logits, labels)
        else:
            losses, _ = classification_per_sample_loss(logits, labels)
        return losses

    def _model_accepts_position_ids(self, model) -> bool:
        if self._accepts_position_ids is None:
            fwd = self.accelerator.unwrap_model(model).forward
            try:
                params = inspect.signature(fwd).parameters
                self._accepts_position_ids = "position_ids" in params or any(
                    p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()
                )
            except (TypeError, ValueError):
                self._accepts_position_ids = False
        return self._accepts_position_ids

    def _check_batch(self, inputs: dict) -> None:
        if "labels" not in inputs:
            raise ValueError(
                "DoGraph needs per-sample losses, but the batch has no 'labels' (keys: "
                f"{', '.join(inputs)}). For causal LM training use "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) or hf_dograph's DomainCollator, which set "
                "labels (with -100 on padding)."
            )

    def _step_key(self) -> tuple[int, int]:
        """(optimizer step, index of this micro-batch within it): stable across resumes."""
        gs, i = self._micro_step
        i = i + 1 if gs == self.state.global_step else 0
        self._micro_step = (self.state.global_step, i)
        return self._micro_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        human = inputs.pop(self.dograph_settings.domain_label_column, None)
        self._check_batch(inputs)
        engine = self.grad_engine

        # 1. per-sample losses and per-sample gradient information (one forward, one backward). Under DDP the
        #    backward must not all-reduce: the unweighted gradient is not the step's (see distributed.py).
        losses, kept = self._losses_and_gradient_information(engine, model, inputs)
        if not engine.computes_sketches and not bool(kept.all()):
            # A baseline's single weighted backward cannot leave a NaN sample out (0 · NaN = NaN): redo this
            # micro-batch with per-sample gradients, which can.
            engine.clear()
            engine = self._per_sample_fallback()
            losses, kept = self._losses_and_gradient_information(engine, model, inputs)

        # 2-3. domains and weights → α (over the global batch when data-parallel; this rank's share back)
        alpha, record = self.compute_sample_weights(engine, losses, kept, human)

        # 4. the exact weighted gradient; micro-batches of an accumulation are averaged
        accumulation = self._accumulation_steps()
        with no_sync(model):
            engine.accumulate_weighted_gradient(alpha.to(losses.device), scale=1.0 / accumulation)
        record.num_nonfinite += engine.samples_dropped_after_weighting()
        engine.clear()
        if is_distributed() and self.accelerator.sync_gradients:
            all_reduce_gradients([p for _, p in engine.params])
        self._record(record)

        mean_loss = losses[kept].mean() if bool(kept.any()) else torch.tensor(float("nan"), device=losses.device)
        return mean_loss / accumulation

    def _losses_and_gradient_information(self, engine, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward and the engine's backward: the detached per-sample losses and which samples are usable."""
        with engine.capturing(), no_sync(model):
            with self.compute_loss_context_manager():
                losses = self.per_sample_losses(model, inputs)
            engine.backward(losses)
        kept = engine.finite_samples() & torch.isfinite(losses.detach())
        return losses.detach(), kept

    def _accumulation_steps(self) -> int:
        # Set by Trainer's loop for each optimizer step (fewer for a short last step); outside `train()`
        # (a direct `training_step` call) the configured value applies.
        return getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)

    def compute_sample_weights(self, engine, losses: torch.Tensor, kept: torch.Tensor, human: torch.Tensor | None):
        """α for this process's samples (0 where left out) and the step's record.

        Weights are solved over the global batch: with several processes, losses, sketches and labels are
        all-gathered and every rank computes the same α (Σ over all ranks = 1), then keeps its own slice.
        """
        s = self.dograph_settings
        device = losses.device
        all_losses, mine = gather_rows(losses.float())
        all_kept, _ = gather_rows(kept)
        all_human = None if human is None else gather_rows(human.to(device).long())[0].cpu()
        all_losses, all_kept = all_losses.cpu(), all_kept.cpu()
        b = all_losses.shape[0]
        alpha = torch.zeros(b, dtype=torch.float64)
        assignments = torch.full((b,), -1, dtype=torch.long)
        idx = all_kept.nonzero().flatten()
        n = len(idx)
        rec = dict(
            domain_weights=torch.ones(1, dtype=torch.float64), sigma2=torch.zeros(1, dtype=torch.float64),
            cluster_sizes=torch.tensor([n]), domain_losses=torch.zeros(1, dtype=torch.float64), value=float("nan"),
        )
        kept_losses = all_losses[idx]
        if n == 0:
            pass
        elif s.mixing_strategy == "dograph":
            from .objectives import solve_domain_weights

            z = gather_rows(engine.sketches())[0].cpu()[idx]
            step, micro = self._step_key()
            assign = self.domain_finder.assign(z, step=step, micro=micro)
            stats = domain_statistics(z, kept_losses, assign)
            result = solve_domain_weights(stats, s)
            w = result.weights.double()
            alpha[idx] = w[assign] / stats.sizes[assign].double()
            assignments[idx] = assign
            rec.update(domain_weights=w, sigma2=stats.sigma2, cluster_sizes=stats.sizes,
                       domain_losses=stats.losses, value=float(result.value), centroids=stats.centroids)
        else:
            alpha[idx] = self._baseline_weights(kept_losses, all_human, idx).double()
            assignments[idx] = 0
            rec["domain_losses"] = kept_losses.double().mean().reshape(1)
        record = DoGraphStepRecord(
            assignments=assignments,
            domain_weights=rec["domain_weights"],
            sample_weights=alpha,
            sigma2=rec["sigma2"],
            losses=all_losses,
            cluster_sizes=rec["cluster_sizes"],
            domain_losses=rec["domain_losses"],
            objective_value=rec["value"],
            num_nonfinite=b - n,
            human_domains=all_human,
            extra={"centroids": rec["centroids"]} if "centroids" in rec else {},
        )
        return alpha[mine], record

    def _baseline_weights(self, losses: torch.Tensor, human: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor:
        """α over the kept samples `idx` (losses already restricted to them) for the baseline strategies."""
        s = self.dograph_settings
        if s.mixing_strategy == "uniform":
            return torch.full((len(idx),), 1.0 / len(idx), dtype=torch.float64)
        from .strategies import loss_reweighting_weights

        if s.mixing_strategy == "loss_reweighting":
            return loss_reweighting_weights(losses, s.loss_reweighting_temperature)
        if human is None:
            raise ValueError(
                f"mixing_strategy='group_dro' weights human domains, but the batch has no "
                f"{s.domain_label_column!r} column: use a domain-labelled dataset (hf_dograph.data) or set "
                "domain_label_column to the column that holds the labels."
            )
        return self.group_dro.update(losses, human[idx])

    # ------------------------------------------------------------------ logging
    def _record(self, record: DoGraphStepRecord) -> None:
        self.dograph_last = record
        w = record.domain_weights
        kept = record.assignments >= 0
        m = self._metrics
        if self.dograph_settings.mixing_strategy == "dograph":
            ent = _entropy(w)
            m["weight_entropy"].append(ent)
            m["effective_domains"].append(math.exp(ent))
            m["num_domains"].append(float(w.numel()))
            m["cluster_size_min"].append(float(record.cluster_sizes.min()))
            m["cluster_size_max"].append(float(record.cluster_sizes.max()))
            if math.isfinite(record.objective_value):
                m["objective"].append(record.objective_value)
        if bool(kept.any()):
            m["weighted_loss"].append(float((record.sample_weights[kept] * record.losses[kept].double()).sum()))
            alpha = record.sample_weights[kept]
            m["sample_weight_max"].append(float(alpha.max()))
        human = record.human_domains
        if human is not None and bool(kept.any()) and self.dograph_settings.mixing_strategy == "dograph":
            m["nmi"].append(normalized_mutual_information(record.assignments[kept], human[kept]))
        self._nonfinite_since_log += record.num_nonfinite
        self._append_history(record)
        self._dograph_observe(record)  # checkpointing.py: last-step summary for plots, NMI into the history

    def _append_history(self, record: DoGraphStepRecord) -> None:
        """One entry per micro-batch: what the plots and the model card show."""
        entry = {
            "step": int(self.state.global_step),
            "domain_weights": [round(float(x), 6) for x in record.domain_weights],
            "cluster_sizes": [int(x) for x in record.cluster_sizes],
        }
        if record.human_domains is not None:
            # The α mass each human domain received, next to its share of the batch.
            kept = record.assignments >= 0
            h = record.human_domains[kept]
            a = record.sample_weights[kept]
            entry["human_mass"] = {int(d): round(float(a[h == d].sum()), 6) for d in torch.unique(h)}
            entry["human_share"] = {int(d): round(float((h == d).double().mean()), 6) for d in torch.unique(h)}
        self.dograph_history.append(entry)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Flush DoGraph's metrics with the training logs (not with evaluation logs).
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            for key, values in self._metrics.items():
                if values:
                    logs[f"dograph/{key}"] = sum(values) / len(values)
            logs["dograph/nonfinite_samples"] = self._nonfinite_since_log
            self._metrics.clear()
            self._nonfinite_since_log = 0
        super().log(logs, start_time)
