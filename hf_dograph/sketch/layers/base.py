"""What a layer handler of the factored engine is, and the small pieces every handler shares.

A *handler* owns one module instance. While the engine captures a micro-batch it intercepts the module's
calls (`install` / `remove`), keeps what the per-sample gradients of the module's trainable parameters
can be rebuilt from, and afterwards

* `collect` — writes each sample's sketch contribution into the engine's `SketchSink`:
  a (B, f_r, f_c) *factored* sketch for a 2-D weight (`add_factored`) or the exact (B, numel)
  per-sample gradient of a small parameter (`add_exact`);
* `accumulate` — adds Σ_i c_i g_i of its factored weights into `.grad` (c_i = scale · α_i), exactly.

The engine owns everything that is shared between handlers (projection matrices per weight, the final
hashing into `projection_dim`), so that a weight used by two modules (GPT-2's tied `wte` / `lm_head`)
gets one projection pair and the two contributions add up to the sketch of the summed gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from ..projection import gaussian_matrix

if TYPE_CHECKING:  # pragma: no cover
    from ..factored import FactoredEngine


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype that autocast would run a matmul in right now, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == dtype:
        return t
    return t.to(dtype)


def batch_rows(t: torch.Tensor, batch: int, features: int, what: str) -> torch.Tensor:
    """View `t` (batch-first, features last) as (B, tokens, features)."""
    if t.dim() < 2 or t.shape[0] != batch:
        raise ValueError(
            f"{what}: expected a batch-first tensor with batch size {batch}, got shape {tuple(t.shape)}"
        )
    return t.reshape(batch, -1, features)


class WeightSlot:
    """The factored projection pair of one 2-D weight `W ∈ R^{rows×cols}` (in the parameter's own layout).

    S_i = P_r G_i P_cᵀ with P_r ∈ R^{f_r×rows}, P_c ∈ R^{f_c×cols}, entries N(0, 1/f) so that
    E‖S_i‖² = ‖G_i‖². An axis is not projected at all (P = identity, exact) when

    * it is no longer than `factor_dim` (e.g. the rank axis of a LoRA adapter), or
    * it is the short axis of a very lopsided weight (the other axis ≥ `lopsided` × longer, e.g. hidden vs
      vocabulary in `lm_head` / `wte`) and at most `max_exact_axis` long: projecting the long axis costs
      rows·f per token, keeping the short one exact adds only f·short (the outer product), a fraction
      short/long of that, while the variance of a Kronecker sketch, ≈ 2/f_r + 2/f_c for a rank-1 gradient,
      loses one of its two terms.
    """

    def __init__(self, name: str, param: nn.Parameter, *, index: int, factor_dim: int, seed: int,
                 lopsided: int = 8, max_exact_axis: int = 1024):
        if param.dim() != 2:
            raise ValueError(f"{name}: a factored sketch needs a 2-D weight, got shape {tuple(param.shape)}")
        self.name = name
        self.param = param
        self.index = index
        self.seed = seed
        self.rows, self.cols = param.shape
        self.f_rows = self.rows if self.rows <= factor_dim else factor_dim
        self.f_cols = self.cols if self.cols <= factor_dim else factor_dim
        short, long_ = min(self.rows, self.cols), max(self.rows, self.cols)
        if long_ >= lopsided * short and short <= max_exact_axis:
            if self.rows == short:
                self.f_rows = self.rows
            else:
                self.f_cols = self.cols
        self._cache: dict[tuple, torch.Tensor | None] = {}

    @property
    def sketch_numel(self) -> int:
        return self.f_rows * self.f_cols

    def projection(self, axis: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """P_r (axis 0) or P_c (axis 1), transposed for right-multiplication: (dim, f). None = identity."""
        key = (axis, device.type, device.index, dtype)
        if key not in self._cache:
            dim, f = (self.rows, self.f_rows) if axis == 0 else (self.cols, self.f_cols)
            if f == dim:
                self._cache[key] = None
            else:
                # Streams are the engine's per-parameter ids; block 0/1 pick the axis.
                p = gaussian_matrix(f, dim, seed=self.seed, stream=self.index, block=axis, std=1.0 / math.sqrt(f),
                                    device=device)
                self._cache[key] = p.T.contiguous().to(dtype)
        return self._cache[key]

    def project(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """x (..., dim of `axis`) → (..., f) in x's dtype (identity where the axis is not projected)."""
        p = self.projection(axis, x.device, x.dtype)
        return x if p is None else x @ p


class SketchSink:
    """Where handlers put per-sample sketch material during `collect` (one micro-batch)."""

    def __init__(self, batch: int):
        self.batch = batch
        self.factored: dict[int, torch.Tensor] = {}  # id(weight) → (B, f_r, f_c) float32
        self.exact: dict[int, torch.Tensor] = {}  # id(param) → (B, numel) float32

    def add_factored(self, param: nn.Parameter, s: torch.Tensor) -> None:
        key = id(param)
        s = s.float()
        self.factored[key] = s if key not in self.factored else self.factored[key] + s

    def add_exact(self, param: nn.Parameter, g: torch.Tensor) -> None:
        key = id(param)
        g = g.float().reshape(self.batch, -1)
        self.exact[key] = g if key not in self.exact else self.exact[key] + g


@dataclass
class CallRecord:
    """One call of a module during the captured forward; filled in by the backward."""

    tensors: dict = field(default_factory=dict)
    done: bool = False


class LayerHandler:
    """Base class of the per-module handlers (see the module docstring)."""

    #: short name used in logs
    kind: ClassVar[str] = "layer"

    def __init__(self, name: str, module: nn.Module, engine: FactoredEngine):
        self.name = name
        self.module = module
        self.engine = engine
        self.records: list[CallRecord] = []

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this handler can take `module` (called only for modules that own trainable parameters)."""
        raise NotImplementedError

    def factored_params(self) -> list[nn.Parameter]:
        """Trainable 2-D weights this handler sketches by factors (and whose weighted grad it forms)."""
        return []

    def exact_params(self) -> list[nn.Parameter]:
        """Small trainable parameters whose exact per-sample gradients this handler gives to the sink."""
        return []

    def deferred_params(self) -> list[nn.Parameter]:
        """Parameters whose gradient autograd does not compute while capturing (this handler forms it)."""
        return self.factored_params()

    def install(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def collect(self, sink: SketchSink) -> None:
        raise NotImplementedError

    def accumulate(self, coef: torch.Tensor, bad: torch.Tensor | None) -> None:
        """weight.grad += Σ_i coef_i G_i for the factored weights, exactly.

        coef_i = 0 for left-out samples. `bad` (B,) bool, when given, marks left-out samples whose tensors
        hold inf/NaN: their rows must contribute exact zeros (0 · NaN would be NaN), see `drop_rows`."""

    def done_records(self) -> list[CallRecord]:
        return [r for r in self.records if r.done]

    def clear(self) -> None:
        self.records = []


class DeferredHandler(LayerHandler):
    """A handler that, while installed, swaps its module's `forward` for a custom autograd Function which
    records the call and defers the weight gradient (linear maps, embeddings). Subclasses give that call in
    `_deferred_forward`."""

    def __init__(self, name: str, module: nn.Module, engine: FactoredEngine):
        super().__init__(name, module, engine)
        self._patch = ForwardPatch(module, self._forward)

    def install(self) -> None:
        self._patch.install()

    def remove(self) -> None:
        self._patch.remove()

    def _forward(self, input, *args, **kwargs):
        # Outside a recorded training forward (extra arguments, evaluation, a replay, no grad) the module's
        # own forward runs unchanged.
        if args or kwargs or not self.engine.recording or self.engine.replaying or not torch.is_grad_enabled():
            return self._patch.original(input, *args, **kwargs)
        rec = CallRecord()
        self.records.append(rec)
        return self._deferred_forward(input, rec)

    def _deferred_forward(self, input: torch.Tensor, rec: CallRecord) -> torch.Tensor:
        raise NotImplementedError


class ForwardPatch:
    """Replaces one module instance's `forward` while installed (names and types stay unchanged)."""

    def __init__(self, module: nn.Module, replacement):
        self.module = module
        self.replacement = replacement
        self.had_instance_forward = "forward" in module.__dict__
        self.original = module.forward

    def install(self) -> None:
        self.had_instance_forward = "forward" in self.module.__dict__
        self.original = self.module.forward
        self.module.forward = self.replacement

    def remove(self) -> None:
        if self.had_instance_forward:
            self.module.forward = self.original
        else:
            self.module.__dict__.pop("forward", None)


def add_to_grad(param: nn.Parameter, contrib: torch.Tensor) -> None:
    contrib = contrib.reshape(param.shape).to(param.dtype)
    if param.grad is None:
        param.grad = contrib.clone() if contrib._base is not None else contrib
    else:
        param.grad.add_(contrib)


def scaled(x: torch.Tensor, coef: torch.Tensor, bad: torch.Tensor | None = None) -> torch.Tensor:
    """x (B, ...) with sample i multiplied by coef_i: one temporary the size of x. Rows of `bad` samples
    are set to exact zeros (whatever x holds there)."""
    out = x * coef.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    if bad is not None:
        out[bad] = 0
    return out


def drop_rows(x: torch.Tensor, bad: torch.Tensor | None, *, in_place: bool) -> torch.Tensor:
    """x with the rows of `bad` samples zeroed. In place for output gradients δ: they are the engine's own
    (autograd handed them to the layer's backward), everything else derived from them is already computed,
    and those samples are left out of every sum, so this avoids a copy of e.g. the B×T×V logits gradient.
    Saved inputs may be tensors the caller also sees (hidden states): those are copied."""
    if bad is None:
        return x
    if in_place:
        x[bad] = 0
        return x
    return x.masked_fill(bad.reshape(-1, *([1] * (x.dim() - 1))), 0)
