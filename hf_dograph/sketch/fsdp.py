"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the factored engine: exact, and as lean as FSDP's own step.

Under FSDP2 a trainable parameter is a sharded DTensor; its unsharded value exists only while its unit is
gathered (around the unit's forward and again around its backward). The factored engine needs the unsharded
weights at neither time it works outside autograd:

* **Sketch.** The sketch of layer ℓ is built from δ (output gradients) and a (inputs), which the layer's
  backward records; the weight is not needed, so the sketch is exactly the single-process one (the
  projections and the CountSketch depend only on (seed, parameter index, global shape), and FSDP keeps
  `named_parameters` order and global shapes). Small parameters on the exact path that need their value
  (RMSNorm weights re-run under `torch.func`) get it by one all-gather of that small parameter
  (`full_value`).
* **Weighted gradient.** Once α is known, each rank forms dW_r = δ_rᵀ(α ⊙ a_r) for its own samples into a
  full-size temporary, one weight at a time, and reduce-scatters it (a SUM) straight into its shard's `.grad`
  (`ShardedGradients.flush`): Σ_r dW_r is the single-process Σ_i α_i g_i, and the temporary is freed before
  the next weight is formed. Peak extra memory: one unsharded gradient of the largest weight (FSDP's own
  backward holds the unsharded gradients of a whole unit at once), plus δ and a of every layer, which the
  factored engine keeps anyway until α is known. Small parameters are all-reduced in one flat bucket and
  each rank keeps its slice. One reduction per parameter per micro-batch, in the same order on every rank.
* **FSDP's own reduction is switched off** while the engine back-propagates (`local_autograd_gradients`):
  autograd forms only the unweighted gradients of the exact-path parameters there, which are not the step's
  gradient; they are taken from FSDP's unsharded parameters (this rank's sums, which the engine's first-step
  check compares with its per-sample gradients) and dropped, so FSDP never reduce-scatters, averages or
  accumulates anything of DoGraph's.

Every collective here is issued by every rank, in parameter order, whatever its samples: a rank whose
micro-batch did not use a layer reduces zeros.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

try:  # torch >= 2.6: FSDP2 and DTensor are public
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor, Partial, Replicate
except ImportError:  # pragma: no cover - older torch: nothing can be sharded
    FSDPModule = DTensor = Partial = Replicate = None


def is_sharded(t) -> bool:
    """Whether `t` is a DTensor (an FSDP2-sharded parameter or gradient)."""
    return DTensor is not None and isinstance(t, DTensor)


def fsdp_modules(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units (modules `fully_shard` was applied to) inside `model`, itself included."""
    if FSDPModule is None:
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp_model(model: nn.Module) -> bool:
    return bool(fsdp_modules(model))


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state (a unit with reshard_after_forward=False stays gathered
    after an evaluation forward), so that `named_parameters` gives the sharded parameters."""
    for m in fsdp_modules(model):
        m.reshard()


def _param_groups(model: nn.Module):
    for m in fsdp_modules(model):
        state = m._get_fsdp_state()
        yield from state._fsdp_param_groups


def _take_unsharded_grad(fsdp_param) -> torch.Tensor | None:
    """This rank's unreduced gradient of one FSDP parameter (autograd's), removed from FSDP."""
    g = getattr(fsdp_param, "unsharded_accumulated_grad", None)
    fsdp_param.unsharded_accumulated_grad = None
    param = getattr(fsdp_param, "_unsharded_param", None)
    if param is not None and param.grad is not None:
        g = param.grad if g is None else g + param.grad
        param.grad = None
    return g


@contextlib.contextmanager
def local_autograd_gradients(model: nn.Module):
    """Run a backward with FSDP's gradient reduction off; yields a dict filled, on exit, with
    id(sharded parameter) → this rank's autograd gradient (full size, unreduced) of every FSDP parameter that
    got one. FSDP keeps nothing of it. A null context (empty dict) for a model without FSDP2 units."""
    grads: dict[int, torch.Tensor] = {}
    groups = list(_param_groups(model))
    if not groups:
        yield grads
        return
    flags = [(g, g.reduce_grads, g.all_reduce_grads) for g in groups]
    for g in groups:
        g.reduce_grads = False
        g.all_reduce_grads = False
    try:
        yield grads
    finally:
        for g, reduce_grads, all_reduce_grads in flags:
            for fsdp_param in g.fsdp_params:
                local = _take_unsharded_grad(fsdp_param)
                if local is not None:
                    grads[id(fsdp_param.sharded_param)] = local.detach()
            g.reduce_grads = reduce_grads
            g.all_reduce_grads = all_reduce_grads


def full_value(p: torch.Tensor) -> torch.Tensor:
    """The whole (unsharded) detached value of a parameter: an all-gather for a DTensor (collective: every
    rank must call it), the tensor itself otherwise."""
    if is_sharded(p):
        with torch.no_grad():
            mesh, local = p.device_mesh, p.to_local()
            if local.device.type != mesh.device_type:  # offloaded shards (FSDP2 CPUOffloadPolicy)
                p = DTensor.from_local(local.to(mesh.device_type), mesh, p.placements, run_check=False,
                                       shape=p.shape, stride=p.stride())
            return p.full_tensor().detach()
    return p.detach()


def call_without_hooks(module: nn.Module, params: dict, args: tuple, kwargs: dict):
    """`torch.func.functional_call(module, params, args, kwargs)`, except that an FSDP2 unit's forward hooks
    (its all-gather and reshard) do not run: the engine re-runs a module after the backward, with full
    parameter values it passes itself."""
    if FSDPModule is None or not isinstance(module, FSDPModule):
        from torch.func import functional_call

        return functional_call(module, params, args, kwargs)
    from torch.nn.utils.stateless import _reparametrize_module

    with _reparametrize_module(module, params):
        return module.forward(*args, **kwargs)


def _like_param(local: torch.Tensor, p) -> torch.Tensor:
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _add_local(p, local: torch.Tensor) -> None:
    """p.grad += (this rank's shard `local`), p a sharded parameter."""
    local = local.to(device=p.to_local().device, dtype=p.dtype)
    if p.grad is None:
        p.grad = _like_param(local.contiguous(), p)
    else:
        p.grad.to_local().add_(local)


def reduce_scatter_into_grad(p, full: torch.Tensor) -> None:
    """p.grad += this rank's shard of Σ_ranks `full` (each rank's own full-size contribution), p sharded."""
    mesh = p.device_mesh
    full = full.to(p.dtype).contiguous()
    summed = DTensor.from_local(full, mesh, [Partial()] * mesh.ndim, run_check=False, shape=p.shape,
                                stride=full.stride())
    _add_local(p, summed.redistribute(mesh, p.placements).to_local())


def all_reduce_into_grads(params: list, fulls: list[torch.Tensor]) -> None:
    """For small sharded parameters: Σ_ranks of each `full` with one flat all-reduce per device mesh, then each
    rank adds its own slice to `.grad` (a local split, no communication)."""
    by_mesh: dict[int, list[int]] = {}
    for i, p in enumerate(params):
        by_mesh.setdefault(id(p.device_mesh), []).append(i)
    for idx in by_mesh.values():
        mesh = params[idx[0]].device_mesh
        flat = torch.cat([fulls[i].to(torch.float32).reshape(-1) for i in idx])
        if mesh.ndim == 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group())
        else:  # e.g. HSDP (replicate × shard): sum over every mesh dimension
            for d in range(mesh.ndim):
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=mesh.get_group(d))
        offset = 0
        for i in idx:
            p = params[i]
            n = p.numel()
            full = flat[offset: offset + n].view(p.shape).to(p.dtype)
            offset += n
            whole = DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False, shape=p.shape,
                                       stride=full.stride())
            _add_local(p, whole.redistribute(mesh, p.placements).to_local())


class ShardedGradients:
    """The weighted gradient of one micro-batch for sharded parameters: full-size staging buffers that handlers
    accumulate into, reduced into the shards' `.grad` as soon as the last handler owning a weight is done."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[int, torch.Tensor] = {}

    def buffer(self, p) -> torch.Tensor:
        key = id(p)
        if key not in self.buffers:
            self.buffers[key] = torch.zeros(p.shape, dtype=p.dtype, device=self.device)
        return self.buffers[key]

    def add(self, p, contrib: torch.Tensor) -> None:
        key = id(p)
        contrib = contrib.reshape(p.shape).to(device=self.device, dtype=p.dtype)
        if key in self.buffers:
            self.buffers[key].add_(contrib)
        else:  # the contribution itself becomes the buffer (a copy if it is a view of something else)
            self.buffers[key] = contrib.clone() if contrib._base is not None else contrib

    def flush(self, p) -> None:
        """Reduce-scatter p's buffer (zeros if this rank added nothing) into p's shard, and free it."""
        full = self.buffers.pop(id(p), None)
        if full is None:
            full = torch.zeros(p.shape, dtype=p.dtype, device=self.device)
        reduce_scatter_into_grad(p, full)
