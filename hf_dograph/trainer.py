"""`DoGraphTrainer`: `transformers.Trainer` whose training step weights each sample by its model-perceived domain.

Swap `Trainer` for `DoGraphTrainer` in an existing script. Every micro-batch goes through `training_step`,
top to bottom:

  1. the Trainer's own loss, one term per sample: L = Σ_i μ_i ℓ_i (`trainer_objective.py`), and, through the
     engine, a sketch z_i of each sample's gradient ∇ℓ_i (one forward, one backward);
  2. each sample's weight v_i from the strategy (`weighting.py`): by default the persistent domain model
     (`domain_model.py`) as it stood when the optimizer step began — nearest domain of z_i, that domain's
     weight; v ≡ 1 is the plain Trainer;
  3. the exact gradient of Σ_i v_i μ_i ℓ_i added into `.grad` (mixed-precision loss scaling included);
  4. after the optimizer step's last micro-batch: the gradients summed over ranks, the domain model updated.

Clipping, the optimizer (and its GradScaler), the scheduler, logging and checkpointing are the Trainer's own.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from transformers import Trainer

from .card import DoGraphCardMixin
from .checkpointing import DoGraphCheckpointMixin
from .config import DoGraphSettings
from .distributed import all_reduce_gradients, is_distributed, no_sync
from .errors import NonFiniteTrainingError
from .sketch import LossOnlyEngine, build_engine
from .step_record import DoGraphStepRecord, StepAccumulator, history_entry, summarize_step
from .trainer_objective import SampleTerms, TrainerObjective
from .weighting import MicroBatch, PerBatchDoGraph, SampleWeights, build_strategy

logger = logging.getLogger(__name__)


class DoGraphTrainer(DoGraphCheckpointMixin, DoGraphCardMixin, Trainer):
    """A `transformers.Trainer` that reweights each sample's share of its own loss by DoGraph's domains.

    Takes the same arguments as `Trainer`, plus:

    - `per_sample_loss_func`: needed only with `compute_loss_func` or an own `compute_loss`:
      f(outputs, labels, num_items_in_batch=None) → (batch,) tensor of per-sample terms summing to the loss.

    `args` may be a `DoGraphConfig` (TrainingArguments + DoGraph settings) or a plain `TrainingArguments`
    (DoGraph's defaults apply). With `mixing_strategy="uniform"` (or during the warm-up) the update and the
    logged loss are the plain Trainer's.

    After each micro-batch `trainer.dograph_last` holds a `DoGraphStepRecord`; every logging step adds DoGraph's
    metrics (`dograph/*`) to the Trainer's logs, so TensorBoard/W&B receive them.
    """

    def __init__(self, *args, per_sample_loss_func=None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        # Validate DoGraph settings before the (slow) Trainer set-up, so bad input fails at once.
        self.dograph_settings = (
            DoGraphSettings.from_args(training_args) if training_args is not None else DoGraphSettings()
        )
        super().__init__(*args, **kwargs)
        self._refuse_unsupported_setups()
        s = self.dograph_settings
        self.dograph_strategy = build_strategy(s)
        self.dograph_last: DoGraphStepRecord | None = None
        self.dograph_history: list[dict] = []
        self._metrics: dict[str, list] = defaultdict(list)
        self._engine = None
        self._fallback_engine = None
        self._per_sample_loss_func = per_sample_loss_func
        self._objective: TrainerObjective | None = None
        self._step = StepAccumulator()
        self._pending_history: list[dict] = []
        self._nonfinite_run = 0  # consecutive optimizer steps without a finite sample
        self._nonfinite_steps_since_log = 0
        self._steps_since_log = 0
        if self.model is not None:  # with model_init the model (and its checks) come with train()
            self._check_setup()

    def _check_setup(self) -> None:
        """Everything that can be refused is refused here, at construction, not at the first step."""
        from transformers import DataCollatorWithFlattening

        from .sketch.checks import check_training_setup

        self.trainer_objective  # noqa: B018 - a loss without a per-sample form fails here
        if self.dograph_strategy.needs_sketches:
            check_training_setup(
                self.dograph_settings.grad_engine, self.accelerator.unwrap_model(self.model),
                gradient_checkpointing=bool(self.args.gradient_checkpointing),
                gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs,
                packed_sequences=isinstance(self.data_collator, DataCollatorWithFlattening),
            )
            self.grad_engine  # noqa: B018 - built (and attached) now: unsupported layers fail here too

    def _refuse_unsupported_setups(self) -> None:
        if getattr(self, "is_fsdp_enabled", False):
            from .distributed import check_fsdp_setup

            check_fsdp_setup(self.accelerator.state.fsdp_plugin, self.dograph_settings)
        if getattr(self, "is_deepspeed_enabled", False):
            from .distributed import DEEPSPEED_REFUSAL

            raise NotImplementedError(DEEPSPEED_REFUSAL)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"DoGraphTrainer sees {self.args.n_gpu} GPUs in one process (torch.nn.DataParallel), whose replicas "
                "bypass DoGraph's per-sample hooks. Launch one process per GPU instead: torchrun "
                f"--nproc_per_node {self.args.n_gpu} your_script.py (or accelerate launch)."
            )

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

    # ------------------------------------------------------------------ the parts
    @property
    def trainer_objective(self) -> TrainerObjective:
        """The Trainer's loss split per sample (built once; raises for a loss without a per-sample form)."""
        if self._objective is None:
            self._objective = TrainerObjective(self, self._per_sample_loss_func,
                                               custom_compute_loss=self._overrides_compute_loss())
        return self._objective

    def _overrides_compute_loss(self) -> bool:
        """Whether a subclass replaced `compute_loss` (its loss is then the user's own)."""
        for cls in type(self).__mro__:
            if cls is DoGraphTrainer:
                return False
            if "compute_loss" in cls.__dict__:
                return True
        return False

    @property
    def grad_engine(self):
        """The micro-batch's gradient engine (built with the trainer).

        DoGraph needs per-sample gradient sketches: `grad_engine` picks the engine ("factored" or "opacus").
        The baselines choose their weights from losses alone and get `LossOnlyEngine`: one ordinary backward of
        Σ α_i ℓ_i, so they cost what a plain Trainer step costs.
        """
        if self._engine is None:
            if self.dograph_strategy.needs_sketches:
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

    def _grad_scaler(self):
        """The accelerator's GradScaler (fp16 mixed precision), or None."""
        return getattr(self.accelerator, "scaler", None)

    # ------------------------------------------------------------------ the step
    def per_sample_terms(self, model, inputs: dict, num_items_in_batch=None) -> SampleTerms:
        """The forward and the Trainer's loss for this micro-batch, split per sample (see `trainer_objective`).
        Override for a loss DoGraph does not know (or pass `per_sample_loss_func`)."""
        objective = self.trainer_objective
        terms = objective(model, inputs, num_items_in_batch, with_model_loss=not objective.verified)
        objective.verify(terms, inputs["labels"], num_items_in_batch)
        terms.outputs = None  # the logits (B × T × V) need not outlive the backward
        return terms

    def _check_batch(self, inputs: dict) -> None:
        if "labels" not in inputs:
            raise ValueError(
                "DoGraph needs per-sample losses, but the batch has no 'labels' (keys: "
                f"{', '.join(inputs)}). For causal LM training use "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) or hf_dograph's DomainCollator, which set "
                "labels (with -100 on padding)."
            )

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        human = inputs.pop(self.dograph_settings.domain_label_column, None)
        self._check_batch(inputs)
        engine = self.grad_engine
        scaler = self._grad_scaler()
        if isinstance(engine, LossOnlyEngine):
            engine.keep_nonfinite = scaler is not None  # an overflow must reach the scaler (see step 2)

        # 1. The Trainer's loss, per sample, and per-sample gradient information (one forward, one backward).
        #    Under DDP the backward must not all-reduce: the unweighted gradient is not the step's.
        terms, kept = self._terms_and_gradients(engine, model, inputs, num_items_in_batch, scaler)
        if not engine.computes_sketches and scaler is None and not bool(kept.all()):
            # A baseline's single weighted backward cannot leave a NaN sample out (0 · NaN = NaN): redo this
            # micro-batch with per-sample gradients, which can.
            engine.clear()
            engine = self._per_sample_fallback()
            terms, kept = self._terms_and_gradients(engine, model, inputs, num_items_in_batch, scaler)

        # 2. Each sample's weight v_i (1 = the Trainer's); α_i = v_i μ_i multiplies ℓ_i in the backward.
        if isinstance(self.dograph_strategy, PerBatchDoGraph):
            self.dograph_strategy.set_step(self.state.global_step)
        sketches = self._unscaled_sketches(engine, scaler) if self.dograph_strategy.needs_sketches else None
        if human is not None and human.shape[0] != terms.num_samples:
            human = None  # packed rows: labels per row, not per packed sequence (logged once, see _record)
            self._warn_once("packed_human", "DoGraph: the batch's human domain labels are per row, its samples "
                            "are packed sequences: model-vs-human agreement is not logged for packed batches.")
        decision = self.dograph_strategy.weights(MicroBatch(
            losses=terms.losses.detach(), items=terms.items, kept=kept, sketches=sketches,
            human=None if human is None else human.to(kept.device)))
        alpha = decision.multipliers * terms.shares
        if scaler is not None:
            # Under a GradScaler an overflow must reach .grad, so that the scaler skips the step and lowers its
            # scale exactly as it does for the plain Trainer: non-finite samples keep their plain share.
            alpha = torch.where(kept, alpha, terms.shares)

        # 3. The exact gradient of Σ_i α_i ℓ_i into .grad (scaled like the Trainer's when a GradScaler is on).
        #    DoGraph's one device→host read of the micro-batch (the plain Trainer also reads its loss once):
        #    whether a left-out sample holds inf/NaN (the engine must then zero it), and whether any was usable.
        left_out_nonfinite, usable = torch.stack([
            ((alpha == 0) & ~engine.finite_samples().to(alpha.device)).any(),
            (torch.isfinite(terms.losses) & (terms.items > 0) if scaler is not None else kept).any()]).tolist()
        self._step.add_finite(usable)
        with no_sync(model):
            engine.accumulate_weighted_gradient(alpha, nonfinite_left_out=left_out_nonfinite)
        dropped = engine.samples_dropped_after_weighting()
        engine.clear()
        self._record(terms, kept, alpha, decision, human, dropped, scaler)

        # 4. After the optimizer step's last micro-batch: sum over ranks, update the domain model.
        if self.accelerator.sync_gradients:
            self._end_optimizer_step(engine)

        # The Trainer's loss on this process (what it logs): over the samples with a finite loss; NaN if none has.
        finite = torch.isfinite(terms.losses)
        trainer_loss = (torch.where(finite, terms.shares * terms.losses, 0.0)).sum()
        trainer_loss = trainer_loss / self.trainer_objective._rank_factor(num_items_in_batch)
        return torch.where(finite.any(), trainer_loss, torch.full_like(trainer_loss, float("nan")))

    def _terms_and_gradients(self, engine, model, inputs, num_items_in_batch, scaler):
        """One forward and the engine's backward: the per-sample terms and which samples are usable."""
        with engine.capturing(), no_sync(model):
            with self.compute_loss_context_manager():
                terms = self.per_sample_terms(model, inputs, num_items_in_batch)
            losses = terms.losses if scaler is None else scaler.scale(terms.losses)
            if terms.segment_ids is None:
                engine.backward(losses)
            else:
                engine.backward(losses, layout=_segments_layout(terms.segment_ids))
        finite = torch.isfinite(terms.losses.detach()) & (terms.items > 0)
        kept = finite & engine.finite_samples().to(finite.device)
        terms.losses = terms.losses.detach()
        return terms, kept

    def _unscaled_sketches(self, engine, scaler) -> torch.Tensor:
        z = engine.sketches()
        if scaler is None:
            return z
        scale = getattr(scaler, "_scale", None)
        return z / (scale.to(z.device) if scale is not None else scaler.get_scale())

    def _end_optimizer_step(self, engine) -> None:
        self._steps_since_log += 1
        params = [p for _, p in engine.params]
        if is_distributed():
            all_reduce_gradients(params)
        if not self._step.any_finite():
            self._nonfinite_step(params)
        else:
            self._nonfinite_run = 0
        self.dograph_strategy.end_step()
        self._flush_step()

    def _nonfinite_step(self, params) -> None:
        """No sample of this optimizer step had a finite loss and gradient: skip the update, stop if it repeats."""
        self._nonfinite_run += 1
        self._nonfinite_steps_since_log += 1
        if self._grad_scaler() is None:
            for p in params:  # an optimizer skips parameters without gradient: no update from zeros (momentum)
                p.grad = None
        limit = self.dograph_settings.nonfinite_step_limit
        if self._nonfinite_run >= limit:
            bad = self._nonfinite_parameter_names()
            where = (f"these parameters hold NaN/inf: {bad}" if bad
                     else "the parameters are finite, so the data or the loss produce NaN/inf")
            raise NonFiniteTrainingError(
                f"DoGraph stopped training at step {self.state.global_step + 1}: {self._nonfinite_run} optimizer steps in "
                f"a row had no sample with a finite loss and gradient ({where}). Check the learning rate, "
                "max_grad_norm (gradient clipping), mixed precision and the data of these steps; resume from the "
                "last checkpoint after fixing it (nonfinite_step_limit sets how many such steps are tolerated)."
            )

    # ------------------------------------------------------------------ logging
    def _warn_once(self, key: str, message: str) -> None:
        warned = self.__dict__.setdefault("_dograph_warned", set())
        if key not in warned:
            warned.add(key)
            logger.warning(message)

    def _record(self, terms: SampleTerms, kept, alpha, decision: SampleWeights, human, dropped: int, scaler) -> None:
        """Keep the micro-batch's decision (tensors only: nothing here waits for the device)."""
        self.dograph_last = DoGraphStepRecord(
            assignments=decision.assignments, sample_weights=alpha, multipliers=decision.multipliers,
            losses=terms.losses, shares=terms.shares, domain_weights=decision.domain_weights,
            cluster_sizes=decision.cluster_sizes, sigma2=decision.sigma2, domain_losses=decision.domain_losses,
            objective_value=decision.objective_value, warmup=decision.warmup, human_domains=human,
            extra=decision.extra,
        )
        self._step.add(alpha=torch.where(kept, alpha, torch.zeros_like(alpha)), shares=terms.shares, kept=kept,
                       losses=terms.losses, assignments=decision.assignments, human=human,
                       dropped=dropped, decision=decision)
        if self.dograph_strategy.per_micro_batch_history:
            self._flush_step(micro_batch=True)

    def _flush_step(self, micro_batch: bool = False) -> None:
        """Turn the accumulated micro-batch(es) into metrics and one pending history entry (tensors)."""
        if not self._step.alphas:
            self._step.reset_samples()
            return
        metrics, entry = summarize_step(self._step, step_number=int(self.state.global_step), per_micro_batch=micro_batch,
                                        dograph=self.dograph_settings.mixing_strategy == "dograph")
        for key, value in metrics.items():
            self._metrics[key].append(value)
        self._pending_history.append(entry)

    def flush_dograph_history(self) -> list[dict]:
        """Materialize the pending history entries (python numbers): the weight-history plot and card read them.
        Called at logging and saving time, so that the training step itself never waits for the device."""
        for e in self._pending_history:
            self.dograph_history.append(history_entry(e))
        self._pending_history = []
        return self.dograph_history

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Flush DoGraph's metrics with the training logs (not with evaluation logs).
        if "loss" in logs and not any(k.startswith("eval_") for k in logs):
            for key, values in self._metrics.items():
                if values:
                    logs[f"dograph/{key}"] = float(torch.stack([torch.as_tensor(v, dtype=torch.float64).cpu()
                                                                for v in values]).mean())
            logs["dograph/nonfinite_samples"] = int(sum(float(v) for v in self._metrics.get("nonfinite_samples", [])))
            logs["dograph/nonfinite_steps"] = self._nonfinite_steps_since_log
            nmi = self._step.take_nmi()
            if nmi is not None:
                logs["dograph/nmi"] = nmi
            last = self.dograph_last
            if last is not None and last.domain_weights is not None and not self.dograph_strategy.per_micro_batch_history:
                for j, wj in enumerate(last.domain_weights.tolist()):
                    logs[f"dograph/domain_weight/{j}"] = wj
                freq = last.extra.get("frequencies")
                if freq is not None:
                    for j, fj in enumerate(freq.tolist()):
                        logs[f"dograph/domain_frequency/{j}"] = fj
            if self._nonfinite_steps_since_log and self._nonfinite_steps_since_log >= self._steps_since_log:
                logs["loss"] = float("nan")  # every step since the last log was non-finite: say so, not 0
            self._metrics.clear()
            self._nonfinite_steps_since_log = 0
            self._steps_since_log = 0
            self.flush_dograph_history()
        super().log(logs, start_time)

    # ------------------------------------------------------------------ saving: never a NaN model
    def _nonfinite_parameter_names(self) -> str:
        """The first few parameters holding NaN/inf, comma-separated ('' if none does)."""
        model = self.accelerator.unwrap_model(self.model)
        bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p.detach()).all())]
        return f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}"

    def _check_finite_parameters(self) -> None:
        bad = self._nonfinite_parameter_names()
        if bad:
            raise NonFiniteTrainingError(
                f"DoGraph refuses to save a model whose parameters hold NaN/inf ({bad}) at step "
                f"{self.state.global_step}: it would look like a trained model. Resume from the last good checkpoint "
                "with a lower learning rate or max_grad_norm."
            )

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._check_finite_parameters()
        self.flush_dograph_history()
        super().save_model(output_dir, _internal_call=_internal_call)

    def _save_checkpoint(self, model, trial):
        self._check_finite_parameters()
        self.flush_dograph_history()
        return super()._save_checkpoint(model, trial)


def _segments_layout(segment_ids: torch.Tensor):
    from .sketch.layout import SampleLayout

    return SampleLayout.segments(segment_ids)
