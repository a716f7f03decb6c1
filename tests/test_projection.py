"""The seeded Gaussian projection: JL distance preservation, determinism, bounded memory."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import hf_dograph.sketch.projection as projection
from hf_dograph.sketch.projection import BlockGaussianProjection


def test_pairwise_distances_within_jl_tolerance():
    n, d, k = 20, 5000, 1024
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z = BlockGaussianProjection(d, k, seed=0, block_numel=1 << 16)(x)
    eps = math.sqrt(8 * math.log(n) / k)  # JL: k ≥ 8 ln N / ε²  ⇒  ε = 0.153 here
    ratio = torch.pdist(z) / torch.pdist(x)
    assert (ratio - 1).abs().max() < eps, float((ratio - 1).abs().max())
    # The entries have variance 1/k: squared norms are preserved on average.
    assert float((z.norm(dim=1) ** 2 / x.norm(dim=1) ** 2).mean()) == pytest.approx(1.0, rel=0.05)


def test_same_seed_same_projection_and_blocks_independent_of_order():
    x = torch.randn(4, 3001)
    a = BlockGaussianProjection(3001, 64, seed=7, block_numel=64 * 100)
    b = BlockGaussianProjection(3001, 64, seed=7, block_numel=64 * 100)
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.block(5), b.block(5)) and torch.equal(a.block(29), a.block(29))
    assert not torch.equal(BlockGaussianProjection(3001, 64, seed=8)(x), a(x))
    assert not torch.equal(BlockGaussianProjection(3001, 64, seed=7, stream=1)(x), BlockGaussianProjection(3001, 64, seed=7)(x))
    # Projecting pieces and summing equals projecting the whole (linearity, one R).
    x2 = x.clone()
    x2[:, :1500] = 0
    x1 = x - x2
    assert torch.allclose(a(x1) + a(x2), a(x), atol=1e-5)


def test_no_block_larger_than_the_budget(monkeypatch):
    biggest = []
    original = projection.gaussian_matrix

    def spy(rows, cols, **kw):
        biggest.append(rows * cols)
        return original(rows, cols, **kw)

    monkeypatch.setattr(projection, "gaussian_matrix", spy)
    k, d, budget = 256, 200_000, 1 << 16
    BlockGaussianProjection(d, k, seed=0, block_numel=budget)(torch.randn(2, d))
    assert max(biggest) <= budget and sum(biggest) == k * d


def test_peak_memory_is_bounded_for_a_large_projection():
    """k × d = 256 × 4M would be 4 GB in fp32; the projection's peak stays near one block."""
    code = textwrap.dedent(
        """
        import resource, torch
        from hf_dograph.sketch.projection import BlockGaussianProjection
        x = torch.randn(2, 4_000_000)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        z = BlockGaussianProjection(4_000_000, 256, seed=0)(x)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
        """
    )
    grown_mb = float(subprocess.check_output([sys.executable, "-c", code]).decode().split()[-1])
    assert grown_mb < 300, grown_mb  # one 16 MB block plus allocator slack; 4096 MB if materialized
