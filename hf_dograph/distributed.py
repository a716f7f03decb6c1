"""Data-parallel plumbing for DoGraph (METHOD.md, "Data parallel").

Sketches are small (B × k), so every rank all-gathers them, runs the same K-means with the same seed, and
so holds the same domains and weights. Each rank then adds Σ_{i on this rank} α_i g_i (α global: Σ over all
ranks = 1) and the gradients are summed across ranks by hand, which gives exactly the single-process
gradient. DDP's own all-reduce is bypassed (its backward runs under `no_sync`) because it would average the
*unweighted* gradient, and the fast engine writes weight gradients outside autograd where DDP cannot see them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_rows(t: torch.Tensor) -> tuple[torch.Tensor, slice]:
    """All ranks' rows of `t` concatenated in rank order, and this rank's slice of them.

    Ranks may hold different numbers of rows (an uneven last batch): rows are padded to the largest count
    for the collective and trimmed again.
    """
    if not is_distributed():
        return t, slice(0, t.shape[0])
    world, rank = dist.get_world_size(), dist.get_rank()
    device = _collective_device(t)
    n = torch.tensor([t.shape[0]], device=device, dtype=torch.long)
    counts = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(counts, n)
    counts = [int(c) for c in counts]
    biggest = max(counts)
    padded = torch.zeros((biggest, *t.shape[1:]), dtype=t.dtype, device=device)
    padded[: t.shape[0]] = t.to(device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.cat([p[:c] for p, c in zip(parts, counts)]).to(t.device)
    start = sum(counts[:rank])
    return out, slice(start, start + counts[rank])


def all_reduce_gradients(params: list[torch.nn.Parameter], bucket_numel: int = 1 << 24) -> None:
    """Sum every parameter's `.grad` across ranks (in flat buckets, as DDP would)."""
    if not is_distributed():
        return
    grads = [p.grad for p in params if p.grad is not None]
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads + [None]:
        if g is not None and (size + g.numel() <= bucket_numel or not bucket):
            bucket.append(g)
            size += g.numel()
            continue
        if bucket:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            work_dev = _collective_device(flat)
            flat = flat.to(work_dev)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        bucket, size = ([g], g.numel()) if g is not None else ([], 0)


def _collective_device(t: torch.Tensor) -> torch.device:
    # NCCL needs CUDA tensors; gloo works on CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def no_sync(model):
    """DDP's `no_sync` for a DDP-wrapped model, a null context otherwise."""
    fn = getattr(model, "no_sync", None)
    return fn() if callable(fn) and is_distributed() else contextlib.nullcontext()


def shutdown() -> None:
    """Wait for every rank, then tear the process group down.

    A rank that leaves while another is still writing its checkpoint can abort in gloo's teardown
    ("terminate called without an active exception"), and the launcher then kills the writer. Ending with a
    barrier and an explicit `destroy_process_group` makes every rank leave together and cleanly.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
