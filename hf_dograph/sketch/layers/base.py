"""What a layer handler of the factored engine is, and the small pieces every handler shares.

A *handler* owns one module instance. While the engine captures a micro-batch it intercepts the module's
calls (`install` / `remove`), keeps what the per-sample gradients of the module's trainable parameters
can be rebuilt from, and afterwards

* `collect` — writes each sample's sketch contribution into the engine's `SketchSink`:
  a (S, f_r, f_c) *factored* sketch for a 2-D weight (`add_factored`) or the exact (S, numel)
  per-sample gradient of a small parameter (`add_exact`);
* `accumulate` — adds Σ_s c_s g_s of its factored weights into `.grad` (c_s = scale · α_s), exactly.

Samples are those of the micro-batch's `SampleLayout` (`sink.layout`, and the `layout` argument of
`accumulate`): rows of the batch, or packed segments of rows. Handlers work on token tensors (B, T, F) and
use the layout's helpers (`token_view`, `padded`, `sum_tokens`, `scale_tokens`, `zero_tokens`) to turn
them into per-sample quantities, so one code path serves both.

The engine owns everything that is shared between handlers (projection matrices per weight, the final
hashing into `projection_dim`), so that a weight used by two modules (GPT-2's tied `wte` / `lm_head`)
gets one projection pair and the two contributions add up to the sketch of the summed gradient.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

import torch
from torch import nn

from ..layout import SampleLayout
from ..projection import gaussian_matrix
from ...tensors import as_dtype, as_float, as_rows
from .record import register_recipient


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower-precision dtype that autocast would run a matmul in right now, or None (also on a device type
    autocast does not know)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    if t is None or dtype is None or not t.is_floating_point():
        return t
    return as_dtype(t, dtype)


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

    def sketch(self, g: torch.Tensor) -> torch.Tensor:
        """Per-sample gradients g (S, rows, cols) → their sketches P_r g P_cᵀ (S, f_r, f_c), in g's dtype. The
        longer axis is projected first: the second product then runs over the shorter one."""
        p_rows = self.projection(0, g.device, g.dtype)
        p_cols = self.projection(1, g.device, g.dtype)
        if p_cols is not None and (p_rows is None or self.cols >= self.rows):
            g = g @ p_cols
            return g if p_rows is None else (g.transpose(1, 2) @ p_rows).transpose(1, 2)
        g = g if p_rows is None else (g.transpose(1, 2) @ p_rows).transpose(1, 2)
        return g if p_cols is None else g @ p_cols


class SketchSink:
    """Where handlers put per-sample sketch material during `collect` (one micro-batch)."""

    def __init__(self, layout: SampleLayout):
        self.layout = layout
        self.num_samples = layout.num_samples
        self.factored: dict[int, torch.Tensor] = {}  # id(weight) → (S, f_r, f_c) float32
        self.exact: dict[int, torch.Tensor] = {}  # id(param) → (S, numel) float32

    def add_factored(self, param: nn.Parameter, s: torch.Tensor) -> None:
        key = id(param)
        s = as_float(s)
        self.factored[key] = s if key not in self.factored else self.factored[key] + s

    def add_exact(self, param: nn.Parameter, g: torch.Tensor) -> None:
        key = id(param)
        g = as_rows(as_float(g), self.num_samples)
        self.exact[key] = g if key not in self.exact else self.exact[key] + g


@dataclass
class CallRecord:
    """One call of a module: what its backward saw (the output gradient δ and the tensors saved in the forward)."""

    tensors: dict = field(default_factory=dict)
    done: bool = False


class HandlerEngine(Protocol):
    """What a handler uses of the engine that owns it (the factored engine is one): handlers are handed their
    engine, they never import it."""

    #: inside the engine's capture of a micro-batch: patched layers record
    recording: bool
    #: the engine re-runs modules (exact per-sample gradients): nobody records
    replaying: bool
    #: linear layers form per-sample weight gradients when rows·cols ≤ form_below · T·(rows + cols)
    form_below: float
    #: the samples of the backward in progress (None outside one): what records are reduced to there
    #: (`LayerHandler.reduce_in_backward`)
    backward_layout: SampleLayout | None

    def slot(self, param: nn.Parameter) -> WeightSlot:
        """The projection pair of a 2-D weight, shared by every module that uses the weight."""

    def small_ops(self, device: torch.device) -> AbstractContextManager:
        """Where a handler runs its small per-sample operations on `device`."""

    def add_grad(self, param: nn.Parameter, contrib: torch.Tensor) -> None:
        """`param.grad += contrib`, the whole gradient of `param` (the engine knows where a sharded one goes)."""

    def grad_target(self, param: nn.Parameter, create: bool = False) -> torch.Tensor | None:
        """The whole-size tensor to accumulate `param`'s weighted gradient into in place: `param.grad`, or under
        FSDP2 the engine's buffer for a sharded `param`; None if there is none yet and not `create`."""


class LayerHandler:
    """Base class of the per-module handlers (see the module docstring).

    A handler's layer hands it one record per call, from the layer's backward, through `receive` (see
    `record.py`: the op that carries them works in eager and compiled code alike)."""

    #: short name used in logs
    kind: ClassVar[str] = "layer"

    def __init__(self, name: str, module: nn.Module, engine: HandlerEngine):
        self.name = name
        self.module = module
        self.engine = engine
        self.records: list[CallRecord] = []
        self.key = register_recipient(self)

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

    def receive(self, tensors: list[torch.Tensor]) -> None:
        """One call's tensors, from its backward (the order is the handler's own)."""
        raise NotImplementedError

    def collect(self, sink: SketchSink) -> None:
        raise NotImplementedError

    def accumulate(self, coef: torch.Tensor, bad: torch.Tensor | None, layout: SampleLayout) -> None:
        """weight.grad += Σ_s coef_s G_s for the factored weights, exactly.

        coef_s = 0 for left-out samples. `bad` (S,) bool, when given, marks left-out samples whose tensors
        hold inf/NaN: their tokens must contribute exact zeros (0 · NaN would be NaN), see
        `SampleLayout.scale_tokens` / `zero_tokens`."""

    def reduce_in_backward(self, rec: CallRecord, layout: SampleLayout) -> dict | None:
        """What a complete record can be reduced to right away, in the backward (its new `tensors`), so that
        its big token tensors are not kept until `collect`; None keeps it as it is (the default). May raise
        ValueError where the tensors do not fit `layout`: the record is then kept, and `collect` reports it."""
        return None

    def _reduce_now(self, rec: CallRecord) -> None:
        """Called by a handler as its record becomes complete: reduces it (`reduce_in_backward`) when the engine
        is inside its backward, i.e. knows the samples of the tokens."""
        layout = self.engine.backward_layout
        if layout is None:
            return
        try:
            with torch.no_grad():
                reduced = self.reduce_in_backward(rec, layout)
        except ValueError:
            return  # not token-aligned: `collect` reports it, naming the layer
        if reduced is not None:
            rec.tensors = reduced

    def done_records(self) -> list[CallRecord]:
        return [r for r in self.records if r.done]

    def clear(self) -> None:
        self.records = []


class PatchedHandler(LayerHandler):
    """A handler that, while installed, swaps its module instance's `forward` for `_recorded_forward` during a
    recorded training forward; outside one (evaluation, no grad, the engine's own replays) the module's own
    forward runs unchanged. The patch object is the same for the whole run, so compiled code that guards on
    the module's `forward` sees the same function every step."""

    def __init__(self, name: str, module: nn.Module, engine: HandlerEngine):
        super().__init__(name, module, engine)
        self._patch = ForwardPatch(module, self._forward)

    def install(self) -> None:
        self._patch.install()

    def remove(self) -> None:
        self._patch.remove()

    def _active(self) -> bool:
        eng = self.engine
        return eng.recording and not eng.replaying and torch.is_grad_enabled()

    def _forward(self, *args, **kwargs):
        if not self._active():
            return self._patch.original(*args, **kwargs)
        return self._recorded_forward(*args, **kwargs)

    def _recorded_forward(self, *args, **kwargs):
        raise NotImplementedError


class DeferredHandler(PatchedHandler):
    """A handler whose recorded forward is a custom autograd Function that defers the weight gradient and
    records (δ, inputs) in its backward (linear maps, embeddings). Subclasses give that call in
    `_deferred_forward(input)`; calls with other arguments run the module's own forward."""

    def _forward(self, *args, **kwargs):
        if len(args) != 1 or kwargs or not self._active():
            return self._patch.original(*args, **kwargs)
        return self._deferred_forward(args[0])

    def _deferred_forward(self, input: torch.Tensor) -> torch.Tensor:
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


def weighted_sum(per_sample: torch.Tensor, coef: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
    """Σ_s coef_s g_s over the rows g_s of `per_sample` (S, n) → (n,). Rows of `bad` samples (S,) bool, left out
    and holding inf/NaN, count as exact zeros (0 · NaN would be NaN)."""
    if bad is not None:
        per_sample = per_sample.masked_fill(bad.to(per_sample.device).unsqueeze(1), 0)
    return coef.to(device=per_sample.device, dtype=per_sample.dtype) @ per_sample


def add_to_grad(param: nn.Parameter, contrib: torch.Tensor) -> None:
    if contrib.shape != param.shape:
        contrib = contrib.reshape(param.shape)
    contrib = as_dtype(contrib, param.dtype)
    if param.grad is None:
        param.grad = contrib.clone() if contrib._base is not None else contrib
    else:
        param.grad.add_(contrib)
