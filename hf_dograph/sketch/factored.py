"""The fast engine (`grad_engine="factored"`): per-sample gradient sketches without per-sample gradients.

Per layer type (see `layers/`):

* **linear maps** (`nn.Linear`, HF `Conv1D`) and **embeddings**: the weight's sketch is S_i = P_r G_i P_cᵀ ∈
  R^{f×f}, built from f-dimensional projections of the output gradients δ and inputs a (for embeddings, a
  column of P_r per token id), without forming the per-sample gradient G_i ∈ R^{r×c}: METHOD.md's factored
  sketch. Autograd never computes dW either: the backward returns the input gradient only and keeps δ and a,
  and `accumulate_weighted_gradient` forms dW = δᵀ(α ⊙ a) once α is known — the same single matmul the plain
  backward would have done. One forward, one backward. A linear layer that is narrow for its samples' length
  (rows·cols ≤ `form_below`·T·(rows + cols), default ½) forms the G_i instead, in one batched matmul of the
  same cost, and takes both the same S_i and the weighted sum from them (`layers/linear.py`).
* **small parameters** (biases, LayerNorm/RMSNorm weights, any layer without a handler): exact per-sample
  gradients (B × numel), closed form where known, `torch.func` otherwise (the reference path).

**Combining the blocks (ours).** METHOD.md concatenates the layers' sketches. With a budget of k = 1024
split over ~20–100 weights, each layer would get only a few × a few dimensions, and a Kronecker-structured
projection that small is a poor JL map. Instead every weight keeps an f_r × f_c factored sketch (f =
`factor_dim` = 32 per axis by default; an axis no longer than f, or the short axis of a lopsided weight such
as the hidden axis of `lm_head`/`wte`, is kept exact: see `WeightSlot`), small parameters keep their exact
gradients, and the concatenation s_i of all these blocks (dimension D₂, a few 10⁴) is hashed into k
dimensions with a CountSketch C (bucket h(j), sign σ(j), both seeded): z_i = C s_i. C is a norm-preserving
random projection too (E‖Cs‖² = ‖s‖², and the variance of ⟨Cs, Ct⟩ is at most that of a dense N(0, 1/k)
projection of the same k), it costs O(B·D₂) and needs no k × D₂ matrix. So z_i = C·[S_i^(1); …; g_i^(small)] has exactly `projection_dim` entries and
E‖z_i‖² = ‖g_i‖².

Everything random is a pure function of (seed, parameter index): the same seed gives the same sketch, and on
CPU the same batch gives bit-identical sketches and weighted gradients whatever the machine's load (a fixed
thread count, and accumulations in a fixed order: `index_add_`, never atomic `index_put_`).

Under FSDP2 (`fully_shard`) the same sketch and the same weighted gradient are formed from the recorded δ and a,
and each weight's gradient is reduce-scattered into its shard's `.grad` as soon as it is formed (`fsdp.py`).

Samples may be rows or packed segments (`SampleLayout`): linear maps, embeddings and LayerNorm split their
token-level tensors by segment exactly; token-wise norms on the exact path are split per token; any other
exact-path layer refuses a segment layout, naming itself.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from . import fsdp as _fsdp
from .base import GradEngine, UnsupportedLayerError, register_engine, resolve_layout
from .buffers import BufferWatch, refuse_stateful_layers
from .layers import GenericHandler, SketchSink, WeightSlot, handler_for
from .layers.base import add_to_grad, weighted_sum
from .layers.generic import is_norm_layer
from .layout import SampleLayout
from .projection import _block_seed
from ..tensors import as_device, as_rows

logger = logging.getLogger(__name__)

DEFAULT_FACTOR_DIM = 32
DEFAULT_FORM_BELOW = 0.5
_STREAM_OFFSET = 1 << 20  # keeps this engine's random streams apart from the reference engine's


_NO_CONTEXT = contextlib.nullcontext()


@contextlib.contextmanager
def _intra_op_threads(n: int | None):
    """Temporarily limit torch's intra-op CPU threads to n (None: leave them alone)."""
    old = torch.get_num_threads()
    if not n or n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@register_engine
class FactoredEngine(GradEngine):
    """Factored per-sample gradient sketches and the deferred, exact weighted gradient.

    Args:
        model: the model whose trainable parameters are sketched and reweighted.
        projection_dim: k, the sketch dimension returned by `sketches()`.
        seed: seed of every random projection (fixed for the run).
        factor_dim: f, the per-axis dimension of each weight's factored sketch (f × f per weight); axes no
            longer than f are kept exactly. Larger f: better inner-product estimates, more sketch cost
            (≈ 2·B·T·(rows + cols)·f flops per weight per step).
        cpu_sketch_threads: intra-op threads for the sketch's small ops on CPU: None (default: torch's setting)
            or a fixed int. The sketch is ~100 small, skinny ops (f = 32 output columns); on a CPU shared with
            other work each multi-threaded op waits for all its threads to be scheduled, so 1 can be much
            faster there. Measured, GPT-2 4×256 on 2 cores: busy machine, B = 8: 0.89 s with 2 threads, 0.13 s
            with 1; idle machine, B = 32: 0.28 s with 2, 0.54 s with 1. The value is fixed for the run — never
            switched with the machine's load, which could make results depend on it (an op split across a
            different number of threads may round differently). The weighted gradient's matmuls (big, like the
            plain dW) and a narrow layer's formed per-sample gradients (made in the backward) always keep
            torch's setting. No effect on GPU.
        form_below: a linear layer forms its per-sample weight gradients outright when rows·cols ≤ form_below ·
            T·(rows + cols), T its samples' length (`LinearHandler.forms_per_sample`: the same sketch and
            gradient, chosen on cost per micro-batch). 0 never forms them, float('inf') always.
    """

    name = "factored"

    def __init__(self, model: nn.Module, *, projection_dim: int, seed: int, factor_dim: int = DEFAULT_FACTOR_DIM,
                 cpu_sketch_threads: int | None = None, form_below: float = DEFAULT_FORM_BELOW):
        super().__init__(model, projection_dim=projection_dim, seed=seed)
        if factor_dim < 1:
            raise ValueError(f"factor_dim={factor_dim} must be >= 1")
        if cpu_sketch_threads is not None and (isinstance(cpu_sketch_threads, bool)
                                               or not isinstance(cpu_sketch_threads, int) or cpu_sketch_threads < 1):
            raise ValueError(
                f"cpu_sketch_threads={cpu_sketch_threads!r}: use None (torch's thread setting) or a fixed int >= 1. "
                "(The former 'auto', which followed the machine's load, made results depend on that load.)"
            )
        if isinstance(form_below, bool) or not isinstance(form_below, (int, float)) or not form_below >= 0:
            raise ValueError(f"form_below={form_below!r} must be a number >= 0 (0: never form per-sample gradients, "
                             "float('inf'): always)")
        refuse_stateful_layers(model)
        self.factor_dim = int(factor_dim)
        self.form_below = float(form_below)
        self.cpu_sketch_threads = cpu_sketch_threads
        self.recording = False  # inside capturing(): patched layers record
        self.backward_layout: SampleLayout | None = None  # the samples of the backward in progress (see receive)
        self.replaying = False  # re-running modules for exact per-sample grads: nobody records
        self._index = {id(p): i for i, (_, p) in enumerate(self.params)}
        self._names = {id(p): n for n, p in self.params}

        self.handlers = []
        self.fallbacks: list[str] = []
        owner_kind: dict[int, tuple[str, str]] = {}  # id(param) → ("factored"/"exact", module name)
        for mname, module in model.named_modules():
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            cls = handler_for(module)
            if cls is None:
                cls = GenericHandler
                if not is_norm_layer(module):
                    self.fallbacks.append(f"{mname or '<root>'} ({type(module).__name__})")
            h = cls(mname, module, self)
            self.handlers.append(h)
            for kind, plist in (("factored", h.factored_params()), ("exact", h.exact_params())):
                for p in plist:
                    prev = owner_kind.setdefault(id(p), (kind, mname))
                    if prev[0] != kind:
                        raise UnsupportedLayerError(
                            f"parameter {self._names.get(id(p), '?')!r} is shared by {prev[1]!r} and {mname!r}, "
                            "which the factored engine handles in different ways; use grad_engine='opacus'."
                        )
        # Every trainable parameter must belong to a module we watch (named_modules covers all owners).
        missing = [n for n, p in self.params if id(p) not in owner_kind]
        if missing:  # pragma: no cover - only if a handler declares fewer params than it owns
            raise UnsupportedLayerError(f"no handler covers parameters: {', '.join(missing)}")
        self._kind = {k: v[0] for k, v in owner_kind.items()}
        # Parameters whose gradient autograd must not compute while capturing (the handlers form it).
        self._deferred = {id(p) for h in self.handlers for p in h.deferred_params()}

        self.slots: dict[int, WeightSlot] = {}
        for h in self.handlers:
            for p in h.factored_params():
                if id(p) not in self.slots:
                    self.slots[id(p)] = WeightSlot(
                        self._names[id(p)], p, index=_STREAM_OFFSET + self._index[id(p)],
                        factor_dim=self.factor_dim, seed=self.seed,
                    )
        # The CountSketch from the blocks (in parameter order) into k dimensions.
        self._block_sizes = [
            self.slots[id(p)].sketch_numel if id(p) in self.slots else p.numel() for _, p in self.params
        ]
        self._hash_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._validated = False
        self._buffers = BufferWatch(model)
        self._layout: SampleLayout | None = None
        self._z: torch.Tensor | None = None
        self._finite: torch.Tensor | None = None
        self._exact: dict[int, torch.Tensor] = {}
        # FSDP2: parameters are sharded DTensors; each sharded weight's gradient is reduced after the last
        # handler that owns it has formed its part (see fsdp.py).
        self._sharded = any(_fsdp.is_sharded(p) for _, p in self.params)
        self._staging: _fsdp.ShardedGradients | None = None
        self._device: torch.device | None = None
        # Sharded: the owners of a shared weight (GPT-2's tied wte / lm_head) run back to back, so that at most
        # one full-size buffer is alive at a time (a handler is moved to just before that weight's last owner);
        # each weight is reduced once, after the last handler (in that order) that adds to it.
        self._accumulate_order = list(self.handlers)
        self._flush_after: dict[int, list] = {}
        if self._sharded:
            def last_owners(handlers) -> dict[int, tuple]:
                last = {}
                for h in handlers:
                    for p in h.factored_params():
                        if _fsdp.is_sharded(p):
                            last[id(p)] = (h, p)
                return last

            last = last_owners(self.handlers)
            order, postponed = [], {}
            for h in self.handlers:
                later = [last[id(p)][0] for p in h.factored_params() if id(p) in last and last[id(p)][0] is not h]
                if later:
                    postponed.setdefault(id(later[0]), []).append(h)
                    continue
                order.extend(postponed.pop(id(h), []))
                order.append(h)
            self._accumulate_order = order + [h for hs in postponed.values() for h in hs]
            for h, p in last_owners(self._accumulate_order).values():
                self._flush_after.setdefault(id(h), []).append(p)

    # -- description ----------------------------------------------------------------------------
    @property
    def sketch_input_dim(self) -> int:
        """D₂: the total size of the per-sample blocks hashed into `projection_dim`."""
        return sum(self._block_sizes)

    def slot(self, param: nn.Parameter) -> WeightSlot:
        return self.slots[id(param)]

    def small_ops(self, device: torch.device):
        """Context for the engine's small, memory-bound ops (projections, scalings): see `cpu_sketch_threads`."""
        if not self.cpu_sketch_threads or device.type != "cpu":
            return _NO_CONTEXT  # (entered per layer: a generator-based context would be host time for nothing)
        return _intra_op_threads(self.cpu_sketch_threads)

    def describe(self) -> dict:
        """Which parameters take which path (for logs, tests and the benchmark)."""
        return {
            "factored": [self._names[k] for k in self.slots],
            "exact": [n for n, p in self.params if self._kind[id(p)] == "exact"],
            "fallback_modules": list(self.fallbacks),
            "sketch_input_dim": self.sketch_input_dim,
            "projection_dim": self.projection_dim,
            "factor_dim": self.factor_dim,
        }

    def log_lines(self) -> list[str]:
        if not self.fallbacks:
            return []
        return [
            "grad_engine='factored': no factored sketch for these trainable layers; their per-sample gradients "
            f"are materialized exactly (the reference path, B × their parameters): {', '.join(self.fallbacks)}."
        ]

    # -- lifetime -------------------------------------------------------------------------------
    def _follow_sharding(self) -> None:
        """The model was sharded by FSDP2 after this engine was built (the Trainer builds its engine before
        accelerate prepares the model): rebuild on the sharded parameters (same order, same global shapes, so
        the same projections and CountSketch)."""
        if self._sharded or not _fsdp.is_fsdp_model(self.model):
            return
        _fsdp.reshard(self.model)
        self.__init__(self.model, projection_dim=self.projection_dim, seed=self.seed, factor_dim=self.factor_dim,
                      cpu_sketch_threads=self.cpu_sketch_threads, form_below=self.form_below)

    @contextlib.contextmanager
    def capturing(self):
        self._follow_sharding()
        self.clear()
        self._buffers.start()
        installed = []
        try:
            for h in self.handlers:
                h.install()
                installed.append(h)
            self.recording = True
            yield
        finally:
            self.recording = False
            for h in installed:
                h.remove()

    # -- one micro-batch ------------------------------------------------------------------------
    def backward(self, losses: torch.Tensor, layout: SampleLayout | None = None) -> None:
        layout = resolve_layout(losses, layout)
        saved = [p.grad for _, p in self.params]
        for _, p in self.params:
            p.grad = None
        try:
            # Under FSDP2 its own gradient reduction is off here; `local` gets this rank's autograd sums.
            # (`capturing` has just looked for FSDP2 units: without them there is nothing to switch off.)
            sharded = _fsdp.local_autograd_gradients(self.model) if self._sharded else contextlib.nullcontext({})
            with sharded as local:
                self.backward_layout = layout
                losses.sum().backward()
            autograd_sums = {id(p): local.get(id(p), p.grad) for _, p in self.params}
        finally:
            self.backward_layout = None
            # Whatever autograd wrote (the unweighted Σ g_i of the exact-path parameters) is not the step's
            # gradient: put back what was there.
            for (_, p), g in zip(self.params, saved):
                p.grad = g
        for n, p in self.params:
            if id(p) in self._deferred and autograd_sums[id(p)] is not None:
                raise UnsupportedLayerError(
                    f"parameter {n!r} received a gradient outside the calls of the layer that owns it "
                    "(it is used directly in some other forward, e.g. by nn.MultiheadAttention): the factored "
                    "engine cannot see that use. Use grad_engine='opacus' for this model."
                )

        self._buffers.check()  # before the exact path re-runs any layer
        if self._sharded:
            _fsdp.reshard(self.model)  # (a unit kept gathered after its backward) the handlers read shards
        self._device = losses.device

        # No graph: the recorded inputs are activations that require grad, and nothing here is differentiated
        # (the exact path's torch.func.grad is a transform and ignores this).
        with torch.no_grad(), self.small_ops(losses.device):
            self._sketch(layout, losses.device, autograd_sums)
        self._layout = layout

    def _sketch(self, layout: SampleLayout, device: torch.device, autograd_sums: dict) -> None:
        batch = layout.num_samples
        sink = SketchSink(layout)
        self.replaying = True
        try:
            for h in self.handlers:
                try:
                    h.collect(sink)
                except ValueError as err:
                    raise UnsupportedLayerError(str(err)) from err
        finally:
            self.replaying = False
        if not self._validated:
            self._check_exact_sums(sink, autograd_sums)
            self._validated = True

        # One CountSketch of the concatenated blocks (a handful of ops, not a few per parameter: on a busy
        # CPU every multi-threaded op costs a scheduler slice).
        blocks = []
        for _, p in self.params:
            block = sink.factored.get(id(p))
            if block is None:
                block = sink.exact.get(id(p))
            if block is None:  # not used by this batch: its gradient is 0
                block = torch.zeros(batch, self._block_sizes[len(blocks)], device=device)
            blocks.append(as_device(as_rows(block, batch), device))
        flat = torch.cat(blocks, dim=1)
        bucket, sign = self._hash(device)
        z = torch.zeros(batch, self.projection_dim, dtype=torch.float32, device=device)
        z.index_add_(1, bucket, flat.mul_(sign))
        # Every block entry lands in some bucket with sign ±1, so a NaN/inf entry makes its bucket NaN/inf:
        # checking the k entries of z finds what checking the D₂ entries of the blocks would (and also a sketch
        # that overflowed, which would be as unusable).
        finite = torch.isfinite(z).all(dim=1)
        z.masked_fill_(~finite.unsqueeze(1), 0.0)  # a mask, not boolean indexing: nothing read on the host
        self._z, self._finite, self._exact = z, finite, sink.exact

    def _hash(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """CountSketch bucket (D₂,) and sign (D₂,) of every block entry, blocks in parameter order. Each
        parameter's part is generated from its own (seed, stream): it does not depend on the other blocks."""
        key = (device.type, device.index)
        if key not in self._hash_cache:
            buckets, signs = [], []
            for i, size in enumerate(self._block_sizes):
                gen = torch.Generator().manual_seed(_block_seed(self.seed, _STREAM_OFFSET + i, 2))
                buckets.append(torch.randint(0, self.projection_dim, (size,), generator=gen))
                signs.append(torch.randint(0, 2, (size,), generator=gen).float().mul_(2).sub_(1))
            self._hash_cache[key] = (torch.cat(buckets).to(device), torch.cat(signs).to(device))
        return self._hash_cache[key]

    def _check_exact_sums(self, sink: SketchSink, autograd_sums: dict) -> None:
        """First step only: the exact per-sample gradients must add up to autograd's gradient. A mismatch
        means a parameter is used outside the module calls we watch."""
        for n, p in self.params:
            if self._kind[id(p)] != "exact" or id(p) in self._deferred:
                continue
            ref = autograd_sums[id(p)]
            mine = sink.exact.get(id(p))
            total = None if mine is None else mine.sum(dim=0)
            if ref is None and total is None:
                continue
            ref = torch.zeros(p.numel(), device=p.device) if ref is None else ref.detach().float().reshape(-1)
            total = torch.zeros_like(ref) if total is None else total.to(ref.device)
            if not (torch.isfinite(ref).all() and torch.isfinite(total).all()):
                continue
            scale = float(ref.norm()) + 1e-12
            if float((ref - total).norm()) > 5e-2 * scale + 1e-6:
                raise UnsupportedLayerError(
                    f"parameter {n!r}: its per-sample gradients do not add up to its gradient; it is used outside "
                    "the forward of the module that owns it. Use grad_engine='opacus' for this model."
                )

    def sketches(self) -> torch.Tensor:
        return self._z

    def finite_samples(self) -> torch.Tensor:
        return self._finite

    @torch.no_grad()
    def accumulate_weighted_gradient(self, alpha: torch.Tensor, scale: float = 1.0, *,
                                     nonfinite_left_out: bool | None = None) -> None:
        """See `GradEngine`. With `nonfinite_left_out=None` the engine looks itself (a device→host read); the
        trainer passes what its one check per micro-batch read."""
        if self._layout is None:
            raise RuntimeError("accumulate_weighted_gradient needs a captured micro-batch: call backward() first")
        if alpha.shape != (self._layout.num_samples,):
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}; expected ({self._layout.num_samples},): one "
                             f"weight per sample of the last backward ({self._layout!r})")
        keep = alpha != 0
        coef = torch.where(keep, alpha.double() * scale, torch.zeros((), dtype=torch.float64, device=alpha.device))
        coef = coef.to(torch.float32).to(self._finite.device)
        keep = keep.to(self._finite.device)
        bad = ~keep & ~self._finite
        # A left-out sample holding inf/NaN must contribute exact zeros (0 · NaN is NaN): handlers zero it.
        if nonfinite_left_out is None:
            nonfinite_left_out = bool(bad.any())
        bad = bad if nonfinite_left_out else None
        if self._sharded:
            self._staging = _fsdp.ShardedGradients(self._device)
        try:
            for h in self._accumulate_order:
                h.accumulate(coef, bad, self._layout)
                for p in self._flush_after.get(id(h), ()):
                    self._staging.flush(p)  # reduce-scatter into the shard, free the full-size buffer
            sharded, fulls, local = [], [], []
            for _, p in self.params:
                g = self._exact.get(id(p))
                if self._sharded and _fsdp.is_sharded(p) and self._kind[id(p)] == "exact":
                    # every rank reduces every sharded small parameter (zeros if it has no samples using it)
                    sharded.append(p)
                    fulls.append(torch.zeros(p.shape, dtype=p.dtype, device=self._device) if g is None else
                                 weighted_sum(g, coef, bad))
                    continue
                if g is not None:
                    local.append((p, g))
            if local:
                # The small parameters' Σ_s coef_s g_s in one product, not one small one per parameter (a model
                # has a few of them per block: on a GPU each would be a kernel launch, on a CPU a dispatch).
                totals = weighted_sum(torch.cat([g for _, g in local], dim=1), coef, bad)
                # Split into tensors of their own (one op): views of `totals` would each be cloned as .grad.
                for (p, _), total in zip(local, torch.split_with_sizes_copy(totals, [g.shape[1] for _, g in local])):
                    add_to_grad(p, total)
            if sharded:
                _fsdp.all_reduce_into_grads(sharded, fulls)
        finally:
            self._staging = None

    def grad_target(self, param: nn.Parameter, create: bool = False) -> torch.Tensor | None:
        """The tensor a handler accumulates `param`'s weighted gradient into: `param.grad` (made zeros first if
        `create`), or, for a sharded parameter under FSDP2, its full-size buffer for this micro-batch."""
        if self._staging is not None and _fsdp.is_sharded(param):
            return self._staging.buffer(param) if create else self._staging.buffers.get(id(param))
        if param.grad is None and create:
            param.grad = torch.zeros_like(param)
        return param.grad

    def add_grad(self, param: nn.Parameter, contrib: torch.Tensor) -> None:
        """`param.grad += contrib` (full size), or into its FSDP2 buffer for a sharded parameter."""
        if self._staging is not None and _fsdp.is_sharded(param):
            self._staging.add(param, contrib)
        else:
            add_to_grad(param, contrib)

    def clear(self) -> None:
        for h in self.handlers:
            h.clear()
        self._z = None
        self._finite = None
        self._exact = {}
        self._layout = None
