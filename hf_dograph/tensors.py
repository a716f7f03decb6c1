"""Small tensor helpers that keep host work and host reads out of a training step.

Conversions that return their input when nothing would change (`as_dtype`, `as_float`, `as_rows`, `as_device`):
`t.float()`, `t.to(dtype)` and `t.reshape(...)` on a tensor that already has that dtype or shape return it
(or a view) but still pass through torch's dispatcher, ~1.5 µs each on a CPU. The engine makes a few such calls
per layer per micro-batch (≈ 1,300 per step on GPT-2 small's 12 blocks, measured: BENCHMARKS.md, "Host work
per step"); on a GPU that is host time the device may wait for. These check in Python first.

`one_hot`: indicator rows by a comparison (no host read), for the domain statistics, K-means and the identity
embedding sketch. `group_sums`: per-group row sums (the domains' sums of their window rows), deterministic on
every device.
"""

from __future__ import annotations

import torch


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t.to(dtype)`, or `t` itself when it already has that dtype."""
    return t if t.dtype == dtype else t.to(dtype)


def as_float(t: torch.Tensor) -> torch.Tensor:
    """`t.float()`, or `t` itself when it is already float32."""
    return t if t.dtype == torch.float32 else t.float()


def as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """`t.reshape(n, -1)`, or `t` itself when it is already (n, m)."""
    return t if t.dim() == 2 and t.shape[0] == n else t.reshape(n, -1)


def as_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t.to(device)`, or `t` itself when it is already there."""
    return t if t.device == device else t.to(device)


def one_hot(index: torch.Tensor, m: int, dtype: torch.dtype) -> torch.Tensor:
    """(..., m) indicator rows of `index` (values in 0..m-1) in `dtype`: a comparison, not `F.one_hot`, which
    reads the indices' range on the host (on the CPU) to check them."""
    return (index.unsqueeze(-1) == torch.arange(m, device=index.device)).to(dtype)


def group_sums(x: torch.Tensor, group: torch.Tensor, m: int) -> torch.Tensor:
    """(m, k): the sum of the rows of x (N, k) in each group 0..m-1 (`group` (N,); a row whose group is -1
    counts in none). The same sums on every device, in a fixed order: on the CPU `index_add_` (rows added one
    after another; ~3× faster there than the one-hot product, whose m is a handful of rows: 0.09 against 0.27 ms
    for a 512 × 1024 window, measured), elsewhere the one-hot product, because CUDA's `index_add_` adds with
    atomics, in no fixed order."""
    return group_sums_by_index(x, group, m) if x.device.type == "cpu" else group_sums_by_product(x, group, m)


def group_sums_by_index(x: torch.Tensor, group: torch.Tensor, m: int) -> torch.Tensor:
    """`group_sums` by `index_add_` (deterministic on the CPU only)."""
    bucket = torch.where(group >= 0, group, m)  # the rows of no group go to a last bucket, dropped
    return x.new_zeros(m + 1, x.shape[1]).index_add_(0, bucket, x)[:m]


def group_sums_by_product(x: torch.Tensor, group: torch.Tensor, m: int) -> torch.Tensor:
    """`group_sums` as one-hot(group)ᵀ x (a row of group -1 has an all-zero indicator row)."""
    return one_hot(group, m, x.dtype).T @ x
