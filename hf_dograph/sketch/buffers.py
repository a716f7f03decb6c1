"""Layers with buffers: constant ones are fine, state that changes in training is refused.

Per-sample gradients need each sample's loss to depend on that sample alone and each layer to be a fixed
function of its parameters. Buffers that are constants (Gemma's `embed_scale`, BERT's `position_ids`,
rotary `inv_freq`) keep that true; buffers a layer updates while training (BatchNorm's running statistics)
do not. Two checks:

* at engine construction, `stateful_layer_problems` names the known kinds: `_BatchNorm` layers (they
  normalize with statistics of the whole batch, so a sample's output depends on the other samples, and they
  update running statistics) and instance norms that track running statistics while trainable;
* on the first captured step, `BufferWatch` compares the buffers of every sketched layer (one that owns
  trainable parameters) before the forward and after the backward, and names any that changed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .base import UnsupportedLayerError


def _owns_trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters(recurse=False))


def stateful_layer_problems(model: nn.Module) -> list[str]:
    """'name (Class): why' for each layer whose training-time state rules out per-sample gradients."""
    out = []
    for name, module in model.named_modules():
        label = f"{name or '<root>'} ({type(module).__name__})"
        if isinstance(module, _BatchNorm):
            out.append(f"{label}: normalizes with statistics of the whole batch (a sample's output depends on the "
                       "other samples) and updates running statistics in buffers")
        elif isinstance(module, _NormBase) and module.track_running_stats and _owns_trainable(module):
            out.append(f"{label}: updates running statistics in buffers while training")
    return out


def refuse_stateful_layers(model: nn.Module) -> None:
    """Raise `UnsupportedLayerError` naming every layer `stateful_layer_problems` finds."""
    bad = stateful_layer_problems(model)
    if bad:
        raise UnsupportedLayerError(
            "DoGraph cannot compute per-sample gradients with these layers: " + "; ".join(bad) + ". Replace them "
            "(e.g. BatchNorm → LayerNorm/GroupNorm, InstanceNorm(track_running_stats=False)) or freeze them and keep "
            "them out of training mode. Layers whose buffers are constants are supported."
        )


class BufferWatch:
    """First-step check that the buffers of sketched layers are constants.

    `start()` before the first captured forward copies them, `check()` after that step's backward compares and
    raises naming the layer and buffer that changed; later steps cost nothing.
    """

    def __init__(self, model: nn.Module):
        self._modules = [(name or "<root>", m) for name, m in model.named_modules() if _owns_trainable(m)]
        self._before: dict | None = None
        self.done = not any(True for _, m in self._modules for _ in m.buffers(recurse=False))

    def start(self) -> None:
        if self.done or self._before is not None:
            return
        self._before = {
            (name, bname): b.detach().clone()
            for name, m in self._modules for bname, b in m.named_buffers(recurse=False) if b is not None
        }

    def check(self) -> None:
        if self.done or self._before is None:
            return
        changed = []
        for name, m in self._modules:
            for bname, b in m.named_buffers(recurse=False):
                old = self._before.get((name, bname))
                if old is None or b is None:
                    continue
                if old.shape != b.shape or old.dtype != b.dtype or not torch.equal(old, b.detach()):
                    changed.append(f"{name} ({type(m).__name__}).{bname}")
        self._before = None
        self.done = True
        if changed:
            raise UnsupportedLayerError(
                "buffers of trainable layers changed during a training step: " + ", ".join(changed) + ". Per-sample "
                "gradients need layers whose buffers are constants (state updated in training, like running "
                "statistics, mixes steps and samples). Freeze these layers (requires_grad=False) or replace them."
            )
