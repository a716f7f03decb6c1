"""Scaled embeddings: `nn.Embedding` subclasses whose forward is the embedding times a constant.

Gemma, Gemma 2/3 and ~25 other transformers model files scale their token embeddings by √hidden
(`GemmaTextScaledWordEmbedding`: ``super().forward(ids) * self.embed_scale.to(self.weight.dtype)``, the
scale kept in a non-persistent buffer). Both engines support such layers without knowing their class:
`embedding_scale` *probes* the module — runs its own forward on a few ids with stand-in weights — and
accepts it when the output is c · F.embedding(ids, W) for one constant c. Sample i's weight gradient is then
c · Σ_t e_{x_{i,t}} δ_{i,t}ᵀ, the plain embedding's gradient with δ scaled by c.

The probe reads c in the weight's dtype (the forward may round the scale to it, as Gemma's does), once per
(module, dtype, device). That the scale stays constant during training is checked on the first captured
step like every buffer of a sketched layer (`buffers.BufferWatch`).
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

_PROBE_ROWS = 8
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module → {(dtype, device): c or None}


def is_plain_embedding(module: nn.Module) -> bool:
    """`nn.Embedding` with its own forward and no option that changes the gradient's form."""
    return (isinstance(module, nn.Embedding) and type(module).forward is nn.Embedding.forward
            and _plain_options(module))


def _plain_options(module: nn.Embedding) -> bool:
    return module.max_norm is None and not module.sparse and not module.scale_grad_by_freq


def embedding_scale(module: nn.Module, dtype: torch.dtype | None = None, device: torch.device | None = None
                    ) -> float | None:
    """c when `module`'s forward computes F.embedding(ids, weight, padding_idx) · c, c a constant; 1.0 for a plain
    `nn.Embedding`; None when the module is not an embedding of that form (then it is not a scaled embedding).

    `dtype`/`device` (default: the weight's) are those the forward will run in: c is read as the forward rounds it.
    """
    if not isinstance(module, nn.Embedding) or not _plain_options(module):
        return None
    if type(module).forward is nn.Embedding.forward:
        return 1.0
    w = module.weight
    dtype = w.dtype if dtype is None else dtype
    device = w.device if device is None else torch.device(device)
    if device.type == "meta":
        return None
    per_module = _CACHE.setdefault(module, {})
    key = (dtype, device)
    if key not in per_module:
        per_module[key] = _probe(module, dtype, device)
    return per_module[key]


def _probe(module: nn.Embedding, dtype: torch.dtype, device: torch.device) -> float | None:
    rows = min(_PROBE_ROWS, module.num_embeddings)
    ids = torch.arange(rows, device=device).unsqueeze(0)
    gen = torch.Generator(device="cpu").manual_seed(0)
    random_w = torch.randn(rows, module.embedding_dim, generator=gen).to(device=device, dtype=dtype)
    ones_w = torch.ones(rows, module.embedding_dim, device=device, dtype=dtype)
    # padding_idx changes the backward only; the stand-in weights are too small for it, so it is lifted for
    # the probe (single-threaded, restored whatever happens).
    saved_pad = module.padding_idx
    module.padding_idx = None
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            out_ones = torch.func.functional_call(module, {"weight": ones_w}, (ids,))
            out_rand = torch.func.functional_call(module, {"weight": random_w}, (ids,))
    except Exception:  # noqa: BLE001 - a forward that cannot run on stand-in weights is not a scaled embedding
        return None
    finally:
        module.padding_idx = saved_pad
    if not all(isinstance(o, torch.Tensor) and o.shape == (1, rows, module.embedding_dim)
               for o in (out_ones, out_rand)):
        return None
    scale = float(out_ones.flatten()[0])
    if not math.isfinite(scale) or scale == 0.0 or not bool((out_ones == out_ones.flatten()[0]).all()):
        return None
    expected = F.embedding(ids, random_w).double() * scale
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-2
    if not torch.allclose(out_rand.double(), expected, rtol=tol, atol=tol * abs(scale)):
        return None
    return scale


def is_scaled_embedding(module: nn.Module) -> bool:
    """An `nn.Embedding` subclass with its own forward that `embedding_scale` accepts."""
    return (isinstance(module, nn.Embedding) and type(module).forward is not nn.Embedding.forward
            and embedding_scale(module) is not None)
