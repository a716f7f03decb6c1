"""Embeddings (`nn.Embedding`: GPT-2 `wte`/`wpe`, LLaMA `embed_tokens`; and scaled embeddings such as Gemma's
`GemmaTextScaledWordEmbedding`, embedding × a constant c): the sparse factored sketch.

Sample s's gradient is G_s = c · Σ_{t∈s} e_{x_t} δ_tᵀ (V × D), one row per token. Its sketch
S_s = P_V G_s P_Dᵀ = c · Σ_{t∈s} P_V[:, x_t] (P_D δ_t)ᵀ takes a column of P_V per token (a gather) and a
D-dimensional projection of δ: nothing of size S × V × D (or even V × D per sample) is ever formed.
The weighted gradient is the embedding backward with coefficient-scaled rows: an `index_add_` into `.grad`
(deterministic on CPU, unlike `index_put_(accumulate=True)`).

A scaled embedding keeps its own forward (the output is bit for bit the model's); c is read by probing the
module (`scaled_embedding.embedding_scale`), never from its class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..scaled_embedding import embedding_scale, is_plain_embedding, is_scaled_embedding
from ...tensors import as_dtype, as_float, one_hot
from .registry import register_layer
from .base import CallRecord, DeferredHandler, SketchSink
from .record import compiling, record


class _DeferredEmbedding(torch.autograd.Function):
    """The embedding's forward, whose backward only records (δ, ids) (the weight gradient is formed later)."""

    @staticmethod
    def forward(ctx, ids, weight, key: int, padding_idx, own_forward, copy: bool):
        ctx.save_for_backward(ids)
        ctx.key, ctx.copy = key, copy
        # own_forward: the module's forward (a scaled embedding), run as is so the output is the model's own.
        return own_forward(ids) if own_forward is not None else F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, gy):
        (ids,) = ctx.saved_tensors
        record([gy, ids], ctx.key, ctx.copy)
        return None, None, None, None, None, None


@register_layer
class EmbeddingHandler(DeferredHandler):
    """Plain `nn.Embedding` and scaled embeddings (no max_norm, not sparse, no scale_grad_by_freq; padding_idx is
    honoured: its row gets no gradient from this layer)."""

    kind = "embedding"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return module.weight.requires_grad if (is_plain_embedding(module) or is_scaled_embedding(module)) else False

    def __init__(self, name, module, engine):
        super().__init__(name, module, engine)
        self.weight = module.weight
        self.num, self.dim = module.weight.shape
        self.scaled = not is_plain_embedding(module)

    def factored_params(self):
        return [self.weight]

    def _deferred_forward(self, input):
        own = self._patch.original if self.scaled else None
        return _DeferredEmbedding.apply(input, self.module.weight, self.key, self.module.padding_idx, own,
                                        compiling())

    def receive(self, tensors):
        self.records.append(CallRecord(tensors={"delta": tensors[0], "ids": tensors[1]}, done=True))

    def _scale(self) -> float:
        c = embedding_scale(self.module)
        if c is None:  # pragma: no cover - accepted at construction; only a module changed since could do this
            raise ValueError(f"{self.name} ({type(self.module).__name__}): its forward is no longer "
                             "embedding × constant")
        return c

    def _rows(self, rec: CallRecord, layout):
        what = f"{self.name} ({type(self.module).__name__})"
        ids = layout.token_view(rec.tensors["ids"].unsqueeze(-1), 1, what).squeeze(-1)
        d = layout.token_view(rec.tensors["delta"], self.dim, what)
        # F.embedding gives the padding row no gradient: drop those tokens from sketch and sum alike.
        valid = None if self.module.padding_idx is None else ids != self.module.padding_idx
        return ids, d, valid

    def collect(self, sink: SketchSink) -> None:
        layout = sink.layout
        slot = self.engine.slot(self.weight)
        scale = self._scale() if self.scaled else 1.0
        for rec in self.done_records():
            ids, d, valid = self._rows(rec, layout)
            p_rows = slot.projection(0, ids.device, torch.float32)  # (V, f_V), or None = identity
            u = one_hot(ids, self.num, torch.float32) if p_rows is None else p_rows[ids]  # (B, T, f_V)
            if valid is not None:
                u = u * valid.unsqueeze(-1)
            v = as_float(slot.project(d, 1))  # (B, T, f_D)
            s = torch.bmm(layout.padded(u).transpose(1, 2), layout.padded(v))
            sink.add_factored(self.weight, s if scale == 1.0 else s * scale)

    def accumulate(self, coef: torch.Tensor, bad: torch.Tensor | None, layout) -> None:
        if self.scaled:
            coef = coef * self._scale()
        for rec in self.done_records():
            ids, d, valid = self._rows(rec, layout)
            p = self.weight
            with self.engine.small_ops(d.device):
                d = layout.scale_tokens(d, coef, bad)
                if valid is not None:
                    d = torch.where(valid.unsqueeze(-1), d, torch.zeros((), dtype=d.dtype, device=d.device))
                g = self.engine.grad_target(p, create=True)  # .grad, or under FSDP2 a full-size buffer
                # index_add_ accumulates in index order on CPU (bit-reproducible); index_put_(accumulate=True)
                # uses atomic adds across threads and is not.
                g.index_add_(0, ids.reshape(-1), as_dtype(d.reshape(-1, self.dim), g.dtype))
