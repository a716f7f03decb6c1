"""Domain finding: statistics by hand, order invariance, online centroids kept between refits."""

from __future__ import annotations

import torch

from hf_dograph.domains import DomainFinder, domain_statistics


def blobs(seed=0, n_per=6, centers=((0, 0), (10, 0), (0, 10))):
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.tensor(c, dtype=torch.float64) + 0.3 * torch.randn(n_per, 2, generator=g, dtype=torch.float64)
                      for c in centers])


def test_statistics_match_a_hand_computation():
    z = torch.tensor([[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]])
    losses = torch.tensor([1.0, 3.0, 7.0])
    s = domain_statistics(z, losses, torch.tensor([0, 0, 1]))
    assert s.sizes.tolist() == [2, 1]
    assert s.centroids.tolist() == [[1.0, 0.0], [5.0, 5.0]]
    assert s.sigma2.tolist() == [1.0, 0.0]  # mean of ‖z - z̄‖² = (1 + 1) / 2
    assert s.losses.tolist() == [2.0, 7.0]
    assert s.mean_sketch.tolist() == [7 / 3, 5 / 3]


def test_partition_does_not_depend_on_batch_order():
    z = blobs()
    finder = DomainFinder(3, seed=0)
    a = finder.assign(z, step=4)
    perm = torch.randperm(len(z), generator=torch.Generator().manual_seed(1))
    b = DomainFinder(3, seed=0).assign(z[perm], step=4)
    # Same partition: samples grouped together in one ordering are grouped together in the other.
    same_a = a[:, None] == a[None, :]
    inv = torch.argsort(perm)
    same_b = (b[inv][:, None] == b[inv][None, :])
    assert torch.equal(same_a, same_b)
    assert sorted(torch.bincount(a).tolist()) == [6, 6, 6]


def test_online_domains_keep_centroids_until_the_refit_step():
    finder = DomainFinder(3, seed=0, refit_steps=3)
    finder.assign(blobs(0), step=0)
    fitted = finder.centroids.copy()
    for step, micro in ((0, 1), (1, 0), (2, 0), (2, 1)):  # same or later steps before the refit: kept
        finder.assign(blobs(step + 10) + 0.5, step=step, micro=micro)
        assert (finder.centroids == fitted).all() and finder.last_fit_step == 0
    finder.assign(blobs(99) + 0.5, step=3)  # three optimizer steps later: refitted
    assert finder.last_fit_step == 3 and not (finder.centroids == fitted).all()
    restored = DomainFinder(3, seed=0, refit_steps=3)
    restored.load_state_dict(finder.state_dict())
    z = blobs(5)
    assert torch.equal(restored.assign(z, step=4), finder.assign(z, step=4))
