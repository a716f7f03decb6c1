"""Engine-level helpers shared by the sketch tests: run one captured micro-batch through an engine, compare
gradients with autograd, build packed (padding-free) batches.

    out = run_engine("factored", model, losses_fn, alpha, layout=None)   # .sketches, .finite, .grads
    ref = autograd_grads(model, losses_fn, alpha)                          # ∇ Σ_s α_s ℓ_s by plain autograd
    assert_grads_close(out.grads, ref)                                     # 1e-5 relative, per parameter too
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hf_dograph.sketch import ENGINES

from helpers_models import VOCAB, relative_error, trainable


@dataclass
class EngineRun:
    sketches: torch.Tensor
    finite: torch.Tensor
    grads: dict


def run_engine(name: str, model, losses_fn, alpha, *, layout=None, scale: float = 1.0, projection_dim: int = 64,
               seed: int = 0, **engine_kw) -> EngineRun:
    """One micro-batch: capture, backward(losses, layout), sketches, accumulate α; the engine is detached after."""
    model.zero_grad(set_to_none=True)
    eng = ENGINES[name](model, projection_dim=projection_dim, seed=seed, **engine_kw)
    eng.attach()
    try:
        with eng.capturing():
            eng.backward(losses_fn(model), layout)
        assert all(p.grad is None for p in model.parameters())  # backward leaves .grad alone
        z, ok = eng.sketches().clone(), eng.finite_samples().clone()
        eng.accumulate_weighted_gradient(torch.as_tensor(alpha), scale)
        grads = {n: p.grad.detach().clone() for n, p in trainable(model) if p.grad is not None}
        eng.clear()
    finally:
        eng.detach()
        model.zero_grad(set_to_none=True)
    return EngineRun(z, ok, grads)


def autograd_grads(model, losses_fn, alpha) -> dict:
    """∇ Σ_s α_s ℓ_s by plain autograd (samples with α_s = 0 left out of the sum)."""
    model.zero_grad(set_to_none=True)
    losses = losses_fn(model)
    a = torch.as_tensor(alpha, dtype=torch.float64)
    keep = (a != 0).nonzero().flatten()
    (losses[keep] * a[keep].to(losses.dtype)).sum().backward()
    out = {n: p.grad.detach().clone() for n, p in trainable(model) if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_grads_close(applied: dict, expected: dict, rel: float = 1e-5) -> float:
    """‖applied − expected‖ / ‖expected‖ < rel overall, and max-abs error per parameter < 10·rel of its max.
    Returns the overall relative error."""
    assert set(applied) == set(expected), set(applied) ^ set(expected)
    err = relative_error(applied, expected)
    assert err < rel, err
    for n in expected:
        scale = expected[n].abs().max().clamp(min=1e-8)
        assert float((applied[n] - expected[n]).abs().max() / scale) < 10 * rel, n
    return err


# ------------------------------------------------------------------------------------- packed batches
def packed_batch(seqs: list[list[torch.Tensor]], pad_to: int | None = None) -> dict:
    """Rows of sequences laid end to end as `DataCollatorWithFlattening` does: position_ids restart at 0 for each
    sequence, labels = ids with -100 at each sequence's first token. `pad_to` right-pads every row to that length
    with a trailing padding run (position_ids restarting at 0, labels -100, segment id -1)."""
    rows_ids, rows_pos, rows_lab, rows_seg = [], [], [], []
    sid = 0
    for row in seqs:
        ids, pos, lab, seg = [], [], [], []
        for s in row:
            ids.append(s)
            pos.append(torch.arange(len(s)))
            lab.append(torch.cat([torch.tensor([-100]), s[1:]]))
            seg.append(torch.full((len(s),), sid))
            sid += 1
        width = sum(len(s) for s in row)
        if pad_to is not None and pad_to > width:
            n = pad_to - width
            ids.append(torch.zeros(n, dtype=torch.long))
            pos.append(torch.arange(n))
            lab.append(torch.full((n,), -100))
            seg.append(torch.full((n,), -1))
        rows_ids.append(torch.cat(ids))
        rows_pos.append(torch.cat(pos))
        rows_lab.append(torch.cat(lab))
        rows_seg.append(torch.cat(seg))
    return {"input_ids": torch.stack(rows_ids), "position_ids": torch.stack(rows_pos),
            "labels": torch.stack(rows_lab), "segment_ids": torch.stack(rows_seg)}


def segment_losses(logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """ℓ_s (S,): mean token cross-entropy of segment s, with the causal shift inside the row (position t predicts
    label t+1; the -100 at each segment's first token keeps a segment from predicting the next one)."""
    shift = F.pad(labels[:, 1:], (0, 1), value=-100)
    tok = F.cross_entropy(logits.float().flatten(0, 1), shift.flatten(), ignore_index=-100, reduction="none")
    seg = segment_ids.flatten()
    valid = (shift.flatten() != -100) & (seg >= 0)
    s = int(segment_ids.max()) + 1
    total = torch.zeros(s, dtype=tok.dtype).index_add(0, seg[valid], tok[valid])
    count = torch.bincount(seg[valid], minlength=s).clamp(min=1)
    return total / count


def random_sequences(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    """Token sequences of the given lengths (ids 1..VOCAB-1), drawn in order from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in lengths]


def packed_losses(batch: dict):
    """The per-segment losses function of a `packed_batch` (model → (S,)), position_ids given to the model."""
    def losses(model):
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
        return segment_losses(out.logits, batch["labels"], batch["segment_ids"])
    return losses


def rows_batch(seqs: list[torch.Tensor]) -> dict:
    """The same sequences one per row, right-padded (attention_mask 0, labels -100 there)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
        labels[i, :len(s)] = s
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
