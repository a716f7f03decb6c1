"""The plain `Trainer`'s objective, one term per sample: what DoGraph reweights.

For a micro-batch the `Trainer` back-propagates one number, its loss L (the model's own loss, the label
smoother's, or `compute_loss_func`'s, normalized by `num_items_in_batch` across accumulation and ranks, or
by the micro-batch and the number of accumulation steps). DoGraph writes that same number as

    L = Σ_i μ_i ℓ_i

with ℓ_i sample i's *mean* loss over its items (its label tokens; 1 item for a classifier) and μ_i its share
(items_i / normalizer, times the Trainer's accumulation and rank factors). DoGraph then back-propagates
Σ_i v_i μ_i ℓ_i: a sample's weight v_i multiplies exactly its share of the Trainer's loss, so v ≡ 1 *is* the
Trainer's step (to float precision), whatever the loss, the padding, the accumulation or the number of ranks.
The per-sample gradients DoGraph sketches are those of ℓ_i (a mean), so that a long and a short sequence of
the same kind point alike.

What is supported, and checked (see `TrainerObjective.verify`): causal LMs (the shift, `shift_labels` from
padding-free collators), masked LMs and token classifiers (token cross-entropy), sequence classifiers
(`problem_type` regression / single-label / multi-label, as transformers resolves it), the label smoother
(`label_smoothing_factor`), and any `compute_loss_func` or own `compute_loss` for which the user gives a
per-sample form (`per_sample_loss_func`). Packed rows (position_ids restarting inside a row, as
`DataCollatorWithFlattening` makes them) are split into one sample per packed sequence.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
KINDS = ("causal_lm", "token", "sequence_classification", "custom")
# How closely our per-sample decomposition must reproduce the Trainer's loss on the first step.
VERIFY_RTOL = 1e-4


@dataclass
class SampleTerms:
    """One micro-batch's loss, per sample: L = Σ_i shares_i · losses_i.

    losses:      (S,) float32, differentiable: ℓ_i, the mean loss over sample i's items (0 if it has none)
    shares:      (S,) float32, detached: μ_i, sample i's share of the Trainer's loss on this process
    items:       (S,) float32: how many items (label tokens, or 1 per classified sample) sample i has
    segment_ids: (B, T) long, the sample of each token when rows hold packed sequences; None: sample = row
    outputs:     the model's outputs (logits ...)
    """

    losses: torch.Tensor
    shares: torch.Tensor
    items: torch.Tensor
    segment_ids: torch.Tensor | None
    outputs: Any
    local_items: torch.Tensor | None = None  # the micro-batch's item count (the per-batch mean's divisor)
    uses_items: bool = True  # whether the loss kind may be normalized by num_items_in_batch

    @property
    def num_samples(self) -> int:
        return int(self.losses.shape[0])

    def trainer_loss(self) -> torch.Tensor:
        """Σ_i μ_i ℓ_i (detached): this process's part of the Trainer's loss."""
        return (self.shares * self.losses.detach()).sum()


def packed_segment_ids(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None = None
                       ) -> torch.Tensor | None:
    """(B, T) sample id of every token when some row holds several packed sequences, else None.

    A new sequence starts wherever the position does not follow the previous one (the rule transformers'
    masks use for packed rows); tokens masked out by `attention_mask` belong to no sample (-1).
    """
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[1] < 2:
        return None
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    if not bool(starts[:, 1:].any()):
        return None
    ids = starts.flatten().long().cumsum(0).view_as(position_ids) - 1
    if attention_mask is not None and attention_mask.shape == ids.shape:
        ids = ids.masked_fill(attention_mask == 0, -1)
    return ids


def _sum_per_sample(values: torch.Tensor, segment_ids: torch.Tensor | None, num_samples: int) -> torch.Tensor:
    """Σ over each sample's tokens of a (B, T) tensor: per row, or per packed segment."""
    if segment_ids is None:
        return values.sum(dim=1)
    flat_ids = segment_ids.flatten()
    keep = flat_ids >= 0
    out = torch.zeros(num_samples, dtype=values.dtype, device=values.device)
    return out.index_add(0, flat_ids.clamp(min=0), values.flatten() * keep)


def _model_name(model) -> str:
    base = getattr(model, "base_model", None)
    inner = getattr(base, "model", None) if base is not None else None
    # PEFT: PeftModel.base_model (LoraModel).model is the transformers model
    target = inner if inner is not None and hasattr(inner, "config") and hasattr(model, "peft_config") else model
    return type(target).__name__, target


def _loss_kind(model) -> str | None:
    """What the model's own loss is, from its head (transformers' auto mappings), or None if unknown."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES,
    )

    name, _ = _model_name(model)
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        return "causal_lm"
    if name in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.values():
        return "sequence_classification"
    if name in MODEL_FOR_MASKED_LM_MAPPING_NAMES.values() or name in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES.values():
        return "token"
    return None


def _problem_type(config, labels: torch.Tensor) -> str:
    """transformers' rule (ForSequenceClassificationLoss), without writing it into the config."""
    if getattr(config, "problem_type", None):
        return config.problem_type
    if config.num_labels == 1:
        return "regression"
    if labels.dtype in (torch.long, torch.int):
        return "single_label_classification"
    return "multi_label_classification"


class TrainerObjective:
    """Splits the Trainer's loss into per-sample terms (see the module docstring). Built once per trainer;
    raises at construction for a loss that has no per-sample form."""

    def __init__(self, trainer, per_sample_loss_func: Callable | None = None, *, custom_compute_loss: bool = False):
        """`custom_compute_loss`: whether the trainer's class replaced `compute_loss` (the loss is then the
        user's own, and needs `per_sample_loss_func`)."""
        self.trainer = trainer
        model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
        self.config = getattr(_model_name(model)[1], "config", None)
        self.per_sample_loss_func = per_sample_loss_func
        self.label_smoother = getattr(trainer, "label_smoother", None)
        if per_sample_loss_func is not None:
            self.kind = "custom"
        elif trainer.compute_loss_func is not None or custom_compute_loss:
            what = "compute_loss_func" if trainer.compute_loss_func is not None else \
                f"{type(trainer).__name__}.compute_loss"
            raise ValueError(
                f"DoGraph weights each sample's share of the loss, and {what} gives only the batch's total. Pass "
                "per_sample_loss_func=f to DoGraphTrainer, with f(outputs, labels, num_items_in_batch=None) "
                "returning a (batch,) tensor whose sum is your loss (DoGraph checks that on the first step), or "
                "override DoGraphTrainer.per_sample_terms."
            )
        else:
            kind = _loss_kind(model)
            if kind is None:
                raise ValueError(
                    f"DoGraph does not know how {type(model).__name__} computes its loss, so it cannot split it per "
                    "sample (it knows causal LMs, masked LMs, token and sequence classifiers). Pass "
                    "per_sample_loss_func=f to DoGraphTrainer, with f(outputs, labels, num_items_in_batch=None) "
                    "returning a (batch,) tensor whose sum is the loss (for a causal LM of your own: "
                    "hf_dograph.losses.causal_lm_terms)."
                )
            self.kind = kind
        self.shift = self.kind == "causal_lm" and not getattr(self.config, "is_encoder_decoder", False)
        if self.label_smoother is not None and self.kind in ("causal_lm", "token", "sequence_classification"):
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            # The Trainer shifts for label smoothing by class name, exactly as here.
            self.shift = _model_name(model)[0] in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
        # Whether the model normalizes its loss by num_items_in_batch: decided by `verify` on the first step(s)
        # (models differ: those calling `self.loss_function` do, those with their own CrossEntropyLoss do not).
        self.model_uses_num_items: bool | None = None
        self.verified = False

    # ------------------------------------------------------------------ normalization (the Trainer's rules)
    def _accepts_loss_kwargs(self) -> bool:
        return bool(getattr(self.trainer, "model_accepts_loss_kwargs", False))

    def _ga_divisor(self, num_items_in_batch) -> float:
        """The Trainer divides its loss by the accumulation steps unless it counts it as already scaled."""
        t = self.trainer
        scaled = t.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (self._accepts_loss_kwargs() and num_items_in_batch is not None) or t.compute_loss_func is not None
        if scaled:
            return 1.0
        return float(getattr(t, "current_gradient_accumulation_steps", t.args.gradient_accumulation_steps))

    def _rank_factor(self, num_items_in_batch) -> float:
        """The Trainer's loss on this process times this factor, summed over processes, is the step's loss.

        DDP averages the processes' gradients; the Trainer multiplies its loss by the number of processes when
        it normalized by a token count taken across them (`average_tokens_across_devices`). DoGraph sums the
        processes' gradients by hand (distributed.py), so each process contributes its loss / world size.
        """
        t = self.trainer
        world = max(1, int(t.accelerator.num_processes))
        factor = 1.0
        if (t.args.average_tokens_across_devices and (self._accepts_loss_kwargs() or t.compute_loss_func is not None)
                and num_items_in_batch is not None):
            factor = float(world // max(1, t.get_tp_size()))
        return factor / world

    def _step_factor(self, num_items_in_batch) -> float:
        """The Trainer's rank and accumulation factors, applied to every share."""
        return self._rank_factor(num_items_in_batch) / self._ga_divisor(num_items_in_batch)

    # ------------------------------------------------------------------ the forward
    def model_inputs(self, model, inputs: dict) -> tuple[dict, torch.Tensor | None]:
        """The model's inputs (labels removed) and the packed-segment ids, if rows hold packed sequences.

        Per-sample gradients need every input batched: a (1, T) position_ids broadcast over the batch would
        give the position embedding one gradient for the whole batch, so position_ids are expanded to (B, T).
        """
        model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "shift_labels")}
        ids = model_inputs.get("input_ids")
        if ids is not None and ids.dim() == 2 and accepts_argument(self.trainer, model, "position_ids"):
            if model_inputs.get("position_ids") is None:
                b, t = ids.shape
                model_inputs["position_ids"] = torch.arange(t, device=ids.device).expand(b, t)
            elif model_inputs["position_ids"].shape[0] != ids.shape[0]:
                model_inputs["position_ids"] = model_inputs["position_ids"].expand(ids.shape[0], -1)
        segments = None
        if self.kind in ("causal_lm", "token"):
            segments = packed_segment_ids(model_inputs.get("position_ids") if "position_ids" in inputs else None,
                                          model_inputs.get("attention_mask"))
        return model_inputs, segments

    def __call__(self, model, inputs: dict, num_items_in_batch=None, *, with_model_loss: bool = False) -> SampleTerms:
        """Forward the micro-batch and split the Trainer's loss per sample.

        `with_model_loss` also passes the labels to the model, so that it computes its own loss from the same
        logits (the first-step check in `verify`)."""
        labels = inputs["labels"]
        model_inputs, segments = self.model_inputs(model, inputs)
        if with_model_loss and self.kind != "custom" and self.label_smoother is None:
            model_inputs = {**model_inputs, "labels": labels}
            if self._accepts_loss_kwargs() and num_items_in_batch is not None:
                model_inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**model_inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if self.kind == "custom":
            return self._custom_terms(outputs, labels, num_items_in_batch)
        if self.kind == "sequence_classification" and self.label_smoother is None:
            sums, items, local = self._classification_sums(logits, labels)
            uses_items = self._problem_type(labels) == "single_label_classification"
        else:
            sums, items, local = self._token_sums(logits, labels, inputs.get("shift_labels"), segments)
            uses_items = True
        terms = SampleTerms(losses=sums / items.clamp(min=1), shares=items, items=items.detach().float(),
                            segment_ids=segments, outputs=outputs, local_items=local, uses_items=uses_items)
        terms.shares = self.shares(terms, num_items_in_batch)
        return terms

    def shares(self, terms: SampleTerms, num_items_in_batch) -> torch.Tensor:
        """μ_i = items_i / normalizer × the Trainer's accumulation and rank factors (detached)."""
        factor = self._step_factor(num_items_in_batch)
        normalizer = self._normalizer(num_items_in_batch, terms.local_items, terms.uses_items)
        return (terms.items / normalizer * factor).detach().float()

    def _normalizer(self, num_items_in_batch, local_items: torch.Tensor, uses_items: bool):
        """What the Trainer's loss divides the summed item losses by."""
        if not uses_items or num_items_in_batch is None:
            return local_items.clamp(min=1)
        total = torch.as_tensor(num_items_in_batch, device=local_items.device, dtype=torch.float32)
        if self.label_smoother is not None:  # the smoother divides by num_items_in_batch whenever it gets it
            return total
        if self.model_uses_num_items is False or not self._accepts_loss_kwargs():
            return local_items.clamp(min=1)
        return total

    # ------------------------------------------------------------------ per-sample sums
    def _token_sums(self, logits, labels, shift_labels, segments):
        """Σ of each sample's token losses, its token count, and the micro-batch's token count."""
        if logits.dim() == 2:  # a classifier under label smoothing: one "token" per sample
            logits, labels = logits.unsqueeze(1), labels.reshape(-1, 1)
        if shift_labels is not None:
            targets = shift_labels.to(logits.device)
        elif self.shift:
            # Shift the labels, not the logits: slicing (B, T, V) logits would copy them.
            targets = F.pad(labels.to(logits.device)[:, 1:], (0, 1), value=IGNORE_INDEX)
        else:
            targets = labels.to(logits.device)
        valid = targets != IGNORE_INDEX
        if self.label_smoother is not None:
            token_loss = self._smoothed_token_loss(logits, targets, valid)
        else:
            token_loss = F.cross_entropy(logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX,
                                         reduction="none").view(targets.shape)
        num = targets.shape[0] if segments is None else int(segments.max()) + 1
        sums = _sum_per_sample(token_loss, segments, num)
        items = _sum_per_sample(valid.float(), segments, num)
        return sums, items, valid.sum().float()

    def _smoothed_token_loss(self, logits, targets, valid):
        """The label smoother's loss per token: (1-ε)·nll + ε·Σ_v(-log p_v)/V, in its precision (log-softmax in
        the logits' dtype, the smoothing sum in float32), so that its sum / normalizer is the smoother's loss."""
        eps = float(self.label_smoother.epsilon)
        neg_log_probs = -F.log_softmax(logits, dim=-1)
        nll = neg_log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        smooth = neg_log_probs.sum(dim=-1, dtype=torch.float32)
        token = (1 - eps) * nll.float() + eps * smooth / neg_log_probs.shape[-1]
        return token.masked_fill(~valid, 0.0)

    def _problem_type(self, labels) -> str:
        return _problem_type(self.config, labels)

    def _classification_sums(self, logits, labels):
        labels = labels.to(logits.device)
        b = logits.shape[0]
        problem = self._problem_type(labels)
        if problem == "regression":
            pred = logits.float().reshape(b, -1)
            target = labels.float().reshape(b, -1)
            err = ((pred - target) ** 2).sum(dim=1)
            items = torch.full((b,), float(pred.shape[1]), device=logits.device)
            return err, items, items.sum()
        if problem == "single_label_classification":
            ce = F.cross_entropy(logits.float().view(b, -1), labels.view(-1), ignore_index=IGNORE_INDEX, reduction="none")
            items = (labels.view(-1) != IGNORE_INDEX).float()
            return ce, items, items.sum()
        if problem == "multi_label_classification":
            bce = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none").reshape(b, -1)
            items = torch.full((b,), float(bce.shape[1]), device=logits.device)
            return bce.sum(dim=1), items, items.sum()
        raise ValueError(f"problem_type={problem!r} of the model config is unknown to DoGraph (and to transformers).")

    def _custom_terms(self, outputs, labels, num_items_in_batch) -> SampleTerms:
        terms = self.per_sample_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
        if not isinstance(terms, torch.Tensor) or terms.dim() != 1:
            raise ValueError(
                "per_sample_loss_func must return a 1-D tensor with one loss term per sample (their sum being the "
                f"loss); it returned {type(terms).__name__} of shape {tuple(getattr(terms, 'shape', ()))}."
            )
        ones = torch.ones_like(terms, dtype=torch.float32).detach()
        factor = self._step_factor(num_items_in_batch)
        # The user's terms already carry their normalization: each is its own share (μ_i = 1 × the factors).
        return SampleTerms(losses=terms.float(), shares=ones * factor, items=ones, segment_ids=None, outputs=outputs,
                           local_items=ones.sum(), uses_items=False)

    # ------------------------------------------------------------------ the first-step check
    def verify(self, terms: SampleTerms, labels: torch.Tensor, num_items_in_batch) -> None:
        """Check on the first step(s) that Σ_i μ_i ℓ_i is the loss the Trainer would have computed, and learn
        whether the model normalizes by `num_items_in_batch` (then `terms.shares` is recomputed). Raises a
        ValueError naming both numbers if no reading reproduces the Trainer's loss."""
        if self.verified:
            return
        if not bool(torch.isfinite(terms.losses.detach()).all()):
            return  # a NaN sample says nothing about the normalization: check on a later step
        factor = self._step_factor(num_items_in_batch)
        ours = float(terms.trainer_loss()) / factor
        if self.kind == "custom":
            reference = self._reference_custom(terms.outputs, labels, num_items_in_batch)
            if reference is not None:
                self._compare(ours, reference, "your compute_loss_func")
            self.verified = True
            return
        if self.label_smoother is not None:
            with torch.no_grad():  # a number to compare with, not part of the step's graph
                reference = float(self.label_smoother(terms.outputs, labels, shift_labels=self.shift,
                                                      num_items_in_batch=num_items_in_batch))
            self._compare(ours, reference, "the Trainer's label-smoothed loss")
            self.verified = True
            return
        model_loss = terms.outputs.get("loss") if isinstance(terms.outputs, dict) else None
        if model_loss is None:
            raise ValueError(
                f"{type(self.trainer.model).__name__} returned no loss for labels, so DoGraph cannot check its split "
                "of the loss per sample; pass per_sample_loss_func to DoGraphTrainer."
            )
        reference = float(model_loss.detach().float().mean())
        # A loss returned in low precision (bf16 outputs under FSDP's mixed precision) is only that exact.
        rtol = max(VERIFY_RTOL, 2 * torch.finfo(model_loss.dtype).eps) if model_loss.is_floating_point() else VERIFY_RTOL
        if not terms.uses_items:  # MSE / BCE: the model's mean over the micro-batch, never num_items
            self._compare(ours, reference, f"{type(self.trainer.model).__name__}'s own loss", rtol)
            self.verified = True
            return
        # Two readings of the model's normalizer: the Trainer's num_items_in_batch, or its own per-batch mean.
        total = float((terms.items * terms.losses.detach()).sum())
        readings = {False: float(terms.local_items.clamp(min=1))}
        if num_items_in_batch is not None and self._accepts_loss_kwargs():
            readings[True] = float(num_items_in_batch)
        matches = [uses for uses, divisor in readings.items() if _close(total / divisor, reference, rtol)]
        if not matches:
            raise ValueError(
                f"DoGraph's per-sample split of {type(self.trainer.model).__name__}'s loss does not add up to the "
                f"model's own loss on this batch ({ours:.6g} vs {reference:.6g}): the model computes its loss in a way "
                "DoGraph does not know. Pass per_sample_loss_func to DoGraphTrainer (one term per sample, summing "
                "to the loss)."
            )
        if len(matches) == 1 or len(readings) == 1:
            self.model_uses_num_items = matches[0]
            self.verified = True
        # else: both readings agree on this batch (one process, no accumulation): decided on a later step.
        terms.shares = self.shares(terms, num_items_in_batch)

    def _reference_custom(self, outputs, labels, num_items_in_batch):
        fn = self.trainer.compute_loss_func
        if fn is None:
            return None
        return float(fn(outputs, labels, num_items_in_batch=num_items_in_batch))

    @staticmethod
    def _compare(ours: float, reference: float, what: str, rtol: float = VERIFY_RTOL) -> None:
        if not _close(ours, reference, rtol):
            raise ValueError(
                f"DoGraph's per-sample terms add up to {ours:.6g}, but {what} is {reference:.6g} on this batch: "
                "per_sample_loss_func (or DoGraph's split of the loss) does not reproduce the loss the Trainer "
                "optimizes. Make the per-sample terms sum to the loss."
            )


def _close(a: float, b: float, rtol: float = VERIFY_RTOL) -> bool:
    return abs(a - b) <= rtol * max(abs(a), abs(b), 1e-12)


def accepts_argument(trainer, model, name: str) -> bool:
    """Whether the model's forward takes `name` (or **kwargs); cached on the trainer."""
    cache = trainer.__dict__.setdefault("_dograph_forward_args", {})
    if name not in cache:
        fwd = trainer.accelerator.unwrap_model(model).forward
        try:
            params = inspect.signature(fwd).parameters
            cache[name] = name in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())
        except (TypeError, ValueError):
            cache[name] = False
    return cache[name]
