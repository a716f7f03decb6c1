"""Gaussian random projections generated from a seed, block by block.

A sketch is z = R g with R ∈ R^{k×d}, R_ab ~ N(0, 1/k) i.i.d. For a model, d is the number of
trainable parameters, so R itself (k·d numbers) is never stored: each block of columns is generated
from (seed, stream, block index) when needed and dropped after use. The same seed gives the same R
on the same device type, whatever the order in which blocks are asked for.
"""

from __future__ import annotations

import math

import torch

DEFAULT_BLOCK_NUMEL = 1 << 22  # 4M numbers (16 MB in fp32) per generated block


def _block_seed(seed: int, stream: int, block: int) -> int:
    # SplitMix64-style mixing: distinct (seed, stream, block) triples give unrelated generator seeds.
    x = (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + block * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    x ^= x >> 32
    return x & (2**63 - 1)


def gaussian_matrix(
    rows: int,
    cols: int,
    *,
    seed: int,
    stream: int = 0,
    block: int = 0,
    std: float = 1.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A (rows × cols) matrix of i.i.d. N(0, std²) entries, a pure function of (seed, stream, block, device type)."""
    device = torch.device(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(_block_seed(seed, stream, block))
    out = torch.randn(rows, cols, generator=gen, device=device, dtype=torch.float32)
    if std != 1.0:
        out.mul_(std)
    return out.to(dtype)


class BlockGaussianProjection:
    """z = R x for x ∈ R^{in_features}, R ∈ R^{k×in_features} with N(0, 1/k) entries, never materialized.

    Columns are generated `block_columns` at a time (at most `block_numel` numbers), so memory is
    O(block_numel) whatever `in_features` is. Different `stream`s give independent matrices, so one seed
    serves every parameter of a model (stream = the parameter's index).

    By Johnson–Lindenstrauss, ‖R x − R y‖ = (1 ± ε) ‖x − y‖ for N points with high probability once
    k ≳ 8 ln N / ε².
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        seed: int = 0,
        stream: int = 0,
        block_numel: int = DEFAULT_BLOCK_NUMEL,
    ):
        if in_features < 1 or out_features < 1:
            raise ValueError(f"projection needs in_features >= 1 and out_features >= 1, got {in_features}, {out_features}")
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.seed = int(seed)
        self.stream = int(stream)
        self.block_columns = max(1, int(block_numel) // self.out_features)
        self.std = 1.0 / math.sqrt(self.out_features)

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.in_features / self.block_columns)

    def block(self, j: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """Columns [j·c, min((j+1)·c, in_features)) of R, shape (k, c_j)."""
        start = j * self.block_columns
        width = min(self.block_columns, self.in_features - start)
        return gaussian_matrix(
            self.out_features, width, seed=self.seed, stream=self.stream, block=j, std=self.std,
            device=device or "cpu", dtype=dtype,
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Project rows: x (N, in_features) → (N, k), accumulated in float32 (float64 input stays float64)."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected vectors of size {self.in_features}, got {tuple(x.shape)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.reshape(-1, self.in_features).to(dtype)
        out = torch.zeros(x.shape[0], self.out_features, device=x.device, dtype=dtype)
        for j in range(self.num_blocks):
            start = j * self.block_columns
            r = self.block(j, device=x.device, dtype=dtype)
            out.addmm_(x[:, start : start + r.shape[1]], r.T)
        return out
