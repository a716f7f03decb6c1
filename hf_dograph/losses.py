"""Per-sample losses ℓ_i (METHOD.md step 1): the mean token loss of each sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, token_counts), each (B,): the mean cross-entropy of each sequence over its label tokens that
    are not -100, with the causal shift HF causal LMs apply (position t predicts label t+1).

    Computed in float32 whatever the logits' dtype, as HF's own loss does. A sequence with no label token
    gets loss 0 (and so a zero gradient).
    """
    # Shift the labels, not the logits: slicing the (B, T, V) logits would copy them forward and backward.
    labels = labels.to(logits.device)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    token_loss = F.cross_entropy(
        logits.float().flatten(0, 1), shift_labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    return token_loss.sum(dim=1) / counts.clamp(min=1), counts


def classification_per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, counts) for sequence classification: one cross-entropy per sample."""
    losses = F.cross_entropy(logits.float(), labels.to(logits.device), reduction="none")
    return losses, torch.ones_like(losses, dtype=torch.long)


def causal_lm_terms(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """A ready `per_sample_loss_func` for a causal LM of your own (any module returning `logits` (B, T, V)):
    each sequence's summed next-token cross-entropy over the normalizer the Trainer uses (`num_items_in_batch`,
    or the micro-batch's label tokens), so that the terms add up to the usual token-mean loss::

        DoGraphTrainer(model=my_lm, args=args, per_sample_loss_func=causal_lm_terms, ...)
    """
    logits = outputs["logits"] if isinstance(outputs, dict) else getattr(outputs, "logits", outputs[0])
    losses, counts = causal_lm_per_sample_loss(logits, labels)
    total = counts.sum().clamp(min=1) if num_items_in_batch is None else torch.as_tensor(
        num_items_in_batch, device=losses.device, dtype=losses.dtype)
    return losses * counts / total
