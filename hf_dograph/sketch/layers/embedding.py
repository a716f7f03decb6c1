"""Embeddings (`nn.Embedding`: GPT-2 `wte`/`wpe`, LLaMA `embed_tokens`): the sparse factored sketch.

Sample i's gradient is G_i = Σ_t e_{x_{i,t}} δ_{i,t}ᵀ (V × D), one row per token. Its sketch
S_i = P_V G_i P_Dᵀ = Σ_t P_V[:, x_{i,t}] (P_D δ_{i,t})ᵀ takes a column of P_V per token (a gather) and a
D-dimensional projection of δ: nothing of size B × V × D (or even V × D per sample) is ever formed.
The weighted gradient is the embedding backward with α-scaled rows: an `index_add_` into `.grad`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_layer
from .base import CallRecord, DeferredHandler, SketchSink, batch_rows, scaled


class _DeferredEmbedding(torch.autograd.Function):
    """F.embedding whose backward only records δ (the weight gradient is formed later from α)."""

    @staticmethod
    def forward(ctx, ids, weight, record: CallRecord, padding_idx):
        ctx.record = record
        record.tensors["ids"] = ids
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, gy):
        ctx.record.tensors["delta"] = gy
        ctx.record.done = True
        return None, None, None, None


@register_layer
class EmbeddingHandler(DeferredHandler):
    """Plain `nn.Embedding` (no max_norm, not sparse, no scale_grad_by_freq; padding_idx is honoured)."""

    kind = "embedding"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return (
            isinstance(module, nn.Embedding)
            and type(module).forward is nn.Embedding.forward
            and module.max_norm is None
            and not module.sparse
            and not module.scale_grad_by_freq
            and module.weight.requires_grad
        )

    def __init__(self, name, module, engine):
        super().__init__(name, module, engine)
        self.weight = module.weight
        self.num, self.dim = module.weight.shape

    def factored_params(self):
        return [self.weight]

    def _deferred_forward(self, input, rec):
        return _DeferredEmbedding.apply(input, self.module.weight, rec, self.module.padding_idx)

    def _rows(self, rec: CallRecord, batch: int):
        what = f"{self.name} ({type(self.module).__name__})"
        ids = rec.tensors["ids"]
        if ids.dim() < 1 or ids.shape[0] != batch:
            raise ValueError(
                f"{what}: expected batch-first indices with batch size {batch}, got shape {tuple(ids.shape)} "
                "(pass position_ids expanded to (B, T))"
            )
        ids = ids.reshape(batch, -1)
        d = batch_rows(rec.tensors["delta"], batch, self.dim, what)
        # F.embedding gives the padding row no gradient: drop those tokens from sketch and sum alike.
        valid = None if self.module.padding_idx is None else ids != self.module.padding_idx
        return ids, d, valid

    def collect(self, sink: SketchSink) -> None:
        slot = self.engine.slot(self.weight)
        for rec in self.done_records():
            ids, d, valid = self._rows(rec, sink.batch)
            p_rows = slot.projection(0, ids.device, torch.float32)  # (V, f_V), or None = identity
            u = F.one_hot(ids, self.num).float() if p_rows is None else p_rows[ids]  # (B, T, f_V)
            if valid is not None:
                u = u * valid.unsqueeze(-1)
            v = slot.project(d, 1).float()  # (B, T, f_D)
            sink.add_factored(self.weight, torch.bmm(u.transpose(1, 2), v))

    def accumulate(self, coef: torch.Tensor, bad: torch.Tensor | None) -> None:
        for rec in self.done_records():
            ids, d, valid = self._rows(rec, coef.shape[0])
            p = self.weight
            with self.engine.small_ops(d.device):
                d = scaled(d, coef, bad)
                if valid is not None:
                    d = torch.where(valid.unsqueeze(-1), d, torch.zeros((), dtype=d.dtype, device=d.device))
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                rows, vals = ids.reshape(-1), d.reshape(-1, self.dim).to(p.grad.dtype)
                if p.grad.device.type == "cpu":
                    # index_put_ (accumulate) is much faster than index_add_ on a busy multi-core CPU.
                    p.grad.index_put_((rows,), vals, accumulate=True)
                else:
                    p.grad.index_add_(0, rows, vals)
