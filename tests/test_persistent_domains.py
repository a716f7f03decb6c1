"""Persistent domains (the default `domain_mode`): the domain model's parts against hand computations, and the
trainer-level properties: DoGraph acts at small batch sizes, a step does not depend on how its samples are
split, the weights keep most of the batch, the warm-up is uniform, packed sequences are samples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from hf_dograph import DoGraphConfig, DoGraphTrainer
from hf_dograph.config import DoGraphSettings
from hf_dograph.domain_model import PersistentDomains, canonical_order
from hf_dograph.kmeans import kmeans, refine, reseed_empty, squared_distances
from hf_dograph.tensors import group_sums, group_sums_by_index, group_sums_by_product

from compat_matrix import flattening_collator, lm_rows, pad_collator, relative_difference
from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2, tiny_llama


# ------------------------------------------------------------------------------------------------ K-means
def _blobs(seed=0, per=40, k=16, m=4, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(m, k, generator=g) * 3
    x = torch.cat([c + spread * torch.randn(per, k, generator=g) for c in centers])
    return x, centers


def test_kmeans_finds_separated_blobs_like_sklearn():
    from sklearn.cluster import KMeans

    x, _ = _blobs()
    w = torch.ones(len(x))
    centroids, inertia = kmeans(x, w, 4, n_init=3, iters=30, generator=torch.Generator().manual_seed(0))
    ref = KMeans(4, n_init=3, random_state=0).fit(x.double().numpy())
    assert float(inertia) == pytest.approx(ref.inertia_, rel=1e-3)
    # the same partition (up to numbering)
    ours = squared_distances(x, centroids).argmin(1).numpy()
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(ours, ref.labels_) == pytest.approx(1.0)


def test_kmeans_ignores_rows_of_weight_zero():
    x, _ = _blobs(m=2)
    far = torch.full((5, x.shape[1]), 1e3)  # garbage rows: padding of the window, left-out samples
    w = torch.cat([torch.ones(len(x)), torch.zeros(5)])
    centroids, _ = kmeans(torch.cat([x, far]), w, 2, n_init=2, iters=20, generator=torch.Generator().manual_seed(1))
    assert float(centroids.abs().max()) < 50


def test_refine_from_nearby_centroids_keeps_their_order_and_revives_empty_clusters():
    x, centers = _blobs(m=4)
    w = torch.ones(len(x))
    start = centers + 0.5  # near the truth, in a known order
    start[3] = 1e4  # a dead cluster: no row is nearest to it
    assert int((squared_distances(x, start).argmin(1) == 3).sum()) == 0
    got = refine(x, w, start, iters=10)
    assert torch.equal(squared_distances(got[:3], centers[:3]).argmin(1), torch.arange(3))  # identities kept
    assert int((squared_distances(x, got).argmin(1) == 3).sum()) > 0  # re-seeded: it holds rows again
    assert torch.equal(reseed_empty(x, w, centers), centers)  # nothing empty: nothing moves


def test_stopping_early_on_the_cpu_gives_the_fixed_iterations_result_bit_for_bit(monkeypatch):
    """On the CPU Lloyd stops once its assignments repeat and the re-seeding visits only empty clusters: the
    centroids must be exactly those of every iteration run (what a GPU computes), and fewer iterations run."""
    import hf_dograph.kmeans as km

    calls = []
    real_nearest = km.nearest
    monkeypatch.setattr(km, "nearest", lambda *a: calls.append(1) or real_nearest(*a))
    for seed, spread, m in ((0, 0.3, 4), (1, 2.0, 6), (2, 5.0, 8)):  # separated blobs … one cloud
        x, centers = _blobs(seed=seed, m=4, spread=spread)
        w = (torch.rand(len(x), generator=torch.Generator().manual_seed(seed)) > 0.1).float()
        start = torch.cat([centers + 0.5, 1e4 * torch.ones(m - 4, x.shape[1]).cumsum(0)])  # m - 4 dead clusters
        runs = {}
        for early in (False, True):
            calls.clear()
            refined = refine(x, w, start, iters=30, stop_early=early)
            refine_calls = len(calls)
            fitted, inertia = kmeans(x, w, m, n_init=3, iters=30, generator=torch.Generator().manual_seed(seed),
                                     stop_early=early)
            runs[early] = (refined, fitted, inertia, refine_calls, len(calls) - refine_calls)
        for fixed, stopped in zip(runs[False][:3], runs[True][:3]):
            assert torch.equal(fixed, stopped)
        assert runs[False][3:] == (30, 30)
        assert runs[True][3] < 30 and runs[True][4] < 30  # it did stop early
    # The default follows the device: early on the CPU.
    calls.clear()
    refine(x, w, start, iters=30)
    assert len(calls) == runs[True][3]


def test_canonical_order_depends_only_on_the_rows():
    x, _ = _blobs()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(2))
    assert torch.equal(x[canonical_order(x, 0)], x[perm][canonical_order(x[perm], 0)])


# ------------------------------------------------------------------------------------------ domain model
def _settings(**kw):
    base = dict(num_domains=3, projection_dim=16, domain_window=64, domain_warmup_samples=32, domain_refit_steps=3,
                weight_smoothing=1.0, variance_shrinkage=0.0)
    base.update(kw)
    s = DoGraphSettings(**base)
    s.validate_dograph()
    return s


def _feed(dm, steps, seed=0, per_step=16, k=16):
    x, _ = _blobs(seed=seed, per=200, k=k, m=3, spread=0.2)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (per_step,), generator=g)
        z = x[idx]
        dm.sample_weights(z)
        dm.observe(z, torch.rand(per_step, generator=g), torch.randint(5, 20, (per_step,), generator=g).float(),
                   torch.ones(per_step))
        dm.end_step()
    return x


def test_warm_up_is_uniform_until_enough_samples():
    dm = PersistentDomains(_settings())
    z = torch.randn(16, 16)
    _feed(dm, 1)
    v, assign = dm.sample_weights(z)
    assert not dm.active and torch.equal(v, torch.ones(16)) and (assign == -1).all()
    _feed(dm, 1)  # 32 samples seen: fitted at the end of this step
    assert dm.active and dm.centroids.shape == (3, 16)


def test_statistics_are_those_of_the_window_by_hand():
    dm = PersistentDomains(_settings(variance_shrinkage=4.0))
    _feed(dm, 6)
    z, valid, items, loss = dm.z, dm.valid, dm.items, dm.loss
    assign = squared_distances(z, dm.centroids).argmin(1)
    # the rows' domains kept since they arrived (the last step's rows came after the last refit) are current
    assert dm.last_refit_step < dm.steps and torch.equal(dm.domain, assign)
    m = 3
    counts = torch.stack([(valid * (assign == j)).sum() for j in range(m)])
    freq = torch.stack([(items * valid * (assign == j)).sum() for j in range(m)]) / (items * valid).sum()
    means = torch.stack([z[(assign == j) & (valid > 0)].mean(0) for j in range(m)])
    ss = torch.stack([((z[(assign == j) & (valid > 0)] - means[j]) ** 2).sum() for j in range(m)])
    nu = counts - 1
    pooled = ss.sum() / nu.sum()
    sigma2 = (ss + 4.0 * pooled) / (nu + 4.0)
    losses = torch.stack([loss[(assign == j) & (valid > 0)].mean() for j in range(m)])
    torch.testing.assert_close(dm.stats["counts"], counts)
    torch.testing.assert_close(dm.stats["freq"], freq)
    torch.testing.assert_close(dm.stats["centroids"], means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm.stats["sigma2"], sigma2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dm.stats["losses"], losses)


def test_group_sums_by_index_and_by_product_agree_with_a_loop():
    """The domains' row sums: `index_add_` on the CPU, the one-hot product elsewhere; rows of group -1 and an
    empty group included."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 7, generator=g)
    group = torch.randint(-1, 4, (50,), generator=g)
    group[group == 2] = 1  # group 2 empty
    by_loop = torch.stack([x[group == j].sum(0) for j in range(4)])
    assert torch.equal(by_loop[2], torch.zeros(7))
    torch.testing.assert_close(group_sums_by_index(x, group, 4), by_loop, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(group_sums_by_product(x, group, 4), by_loop, rtol=1e-6, atol=1e-6)
    assert torch.equal(group_sums(x, group, 4), group_sums_by_index(x, group, 4))  # the CPU's


def test_window_keeps_the_last_rows_across_the_ring_end_and_left_out_rows_count_in_no_domain():
    """12 rows a step into a window of 64: the 6th step's rows wrap around the ring's end. The window then holds
    exactly the last 64 rows, and the statistics leave out the rows that were not kept (valid 0)."""
    dm = PersistentDomains(_settings(variance_shrinkage=0.0, domain_warmup_samples=24))
    x, _ = _blobs(seed=4, per=200, k=16, m=3, spread=0.2)
    g = torch.Generator().manual_seed(5)
    seen = []
    for step in range(9):
        z = x[torch.randint(0, len(x), (12,), generator=g)]
        valid = (torch.arange(12) % 5 != 0).float()  # rows 0, 5, 10 of each step left out
        loss = torch.rand(12, generator=g)
        dm.sample_weights(z)
        dm.observe(z, loss, torch.full((12,), 10.0), valid)
        dm.end_step()
        packed = torch.cat([z, loss[:, None], torch.full((12, 1), 10.0), valid[:, None]], dim=1)
        seen.append(packed[canonical_order(packed, dm.settings.projection_seed)])  # the order rows enter in
    last = torch.cat(seen)[-64:]
    assert dm.ptr == 9 * 12 % 64 and dm.filled == 64
    oldest_first = (torch.arange(64) + dm.ptr) % 64
    window = torch.cat([dm.z, dm.loss[:, None], dm.items[:, None], dm.valid[:, None]], dim=1)
    assert torch.equal(window[oldest_first], last)
    assign = squared_distances(dm.z, dm.centroids).argmin(1)
    kept = dm.valid > 0
    counts = torch.stack([(kept & (assign == j)).sum() for j in range(3)]).float()
    means = torch.stack([dm.z[kept & (assign == j)].mean(0) for j in range(3)])
    losses = torch.stack([dm.loss[kept & (assign == j)].mean() for j in range(3)])
    assert counts.sum() == 64 - (dm.valid == 0).sum() and (dm.valid == 0).sum() > 0
    torch.testing.assert_close(dm.stats["counts"], counts)
    torch.testing.assert_close(dm.stats["centroids"], means, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dm.stats["losses"], losses)


def test_variance_from_kept_distances_holds_when_rows_drifted_far_from_their_centroid():
    """σ² comes from the rows' distances to their centroid minus the mean's offset (an identity): check it against
    the direct Σ‖z − μ‖² when a domain's rows sit ~30 of their own spreads away from its centroid."""
    dm = PersistentDomains(_settings(variance_shrinkage=0.0))
    _feed(dm, 3)  # fitted: window, centroids and the rows' domains exist
    g = torch.Generator().manual_seed(5)
    k = dm.z.shape[1]
    dm.centroids = torch.zeros(3, k)
    dm.centroids[1, 0], dm.centroids[2, 0] = 1e3, -1e3
    drift = torch.zeros(k)
    drift[1] = 30.0
    dm.z = drift + 0.25 * torch.randn(dm.z.shape, generator=g)  # all nearest to centroid 0, spread ~1 per row
    dm.valid = torch.ones_like(dm.valid)
    dm._assign_rows(slice(None))
    dm._update()
    z = dm.z.double()
    direct = ((z - z.mean(0)) ** 2).sum() / (len(z) - 1)
    assert int(dm.stats["counts"][0]) == len(z)
    # measured 2.7e-4 relative: float32 rounding of ~1e-7 × (drift² / spread² = 900), see _update
    assert float(dm.stats["sigma2"][0]) == pytest.approx(float(direct), rel=1e-3)


def test_closed_form_uncertainty_equals_the_host_solver():
    """The on-device w ∝ 1/(σ² + ε) is objectives.solve_uncertainty on the same statistics."""
    from hf_dograph.domains import DomainStats
    from hf_dograph.objectives import solve_uncertainty

    s = _settings()
    dm = PersistentDomains(s)
    _feed(dm, 6)
    st = dm.stats
    stats = DomainStats(sizes=st["counts"].long(), centroids=st["centroids"].double(), sigma2=st["sigma2"].double(),
                        losses=st["losses"].double(), mean_sketch=st["centroids"].double().mean(0))
    torch.testing.assert_close(dm.weights.double(), solve_uncertainty(stats, s).weights, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mapping", ["sample", "domain"])
def test_sample_weights_have_mean_one_and_the_mapping_decides_domain_mass(mapping):
    dm = PersistentDomains(_settings(weight_mapping=mapping))
    _feed(dm, 6)
    f, w, v = dm.stats["freq"], dm.weights, dm.multipliers
    assert float((f * v).sum()) == pytest.approx(1.0, rel=1e-5)  # E[v] = 1 under the recent data
    if mapping == "sample":  # a sample's weight ∝ its domain's w
        torch.testing.assert_close(v / v.sum(), w / w.sum(), rtol=1e-5, atol=1e-7)
    else:  # a domain's share of the step is w
        torch.testing.assert_close(f * v, w, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(v, torch.ones_like(v))


def test_a_domain_without_recent_samples_gets_the_mean_weight_of_the_others():
    """Not 0: samples reaching it before the next refit would otherwise be silenced."""
    dm = PersistentDomains(_settings(num_domains=4))
    _feed(dm, 6)  # three blobs, four domains: one is empty after the refits at most
    dm.centroids[3] = 1e4  # make domain 3 empty for sure
    dm._assign_rows(slice(None))  # the window rows' domains follow the centroids, as after a refit
    dm._update()
    present = dm.stats["counts"] > 0
    assert not bool(present[3]) and bool(present.any())
    w = dm.weights
    assert torch.allclose(w[~present], w[present].mean().expand(int((~present).sum())), rtol=1e-5)
    assert float(w.sum()) == pytest.approx(1.0, rel=1e-6) and bool((w > 0).all())
    v, _ = dm.sample_weights(dm.centroids[3:4])  # a sample nearest to the empty domain: a neutral weight
    assert float(v) == pytest.approx(float(w[3] / (dm.stats["freq"] * w).sum()), rel=1e-5)


def test_smoothing_moves_weights_a_fraction_per_step_from_uniform():
    dm = PersistentDomains(_settings(weight_smoothing=0.25))
    _feed(dm, 2)  # fitted: the first update starts from uniform
    first = dm.weights.clone()
    target = _solve_now(dm)
    torch.testing.assert_close(first, 0.75 * torch.full_like(first, 1 / 3) + 0.25 * target, rtol=1e-5, atol=1e-7)
    assert float(first.sum()) == pytest.approx(1.0)


def _solve_now(dm):
    st = dm.stats
    present = st["counts"] > 0
    return dm._solve(present, st["counts"], st["centroids"], st["sigma2"], st["losses"], dm.z, dm.valid)


def test_refits_keep_domain_identity():
    """Refits are matched to the previous centroids: a domain keeps its number across refits."""
    dm = PersistentDomains(_settings(domain_refit_steps=1))
    _feed(dm, 3)
    before = dm.centroids.clone()
    _feed(dm, 1, seed=0)
    d = squared_distances(dm.centroids, before)
    assert torch.equal(d.argmin(1), torch.arange(3))


def test_state_round_trip_is_exact():
    dm = PersistentDomains(_settings())
    _feed(dm, 5)
    meta, tensors = dm.state_dict()
    other = PersistentDomains(_settings())
    other.load_state_dict(meta, tensors)
    z = torch.randn(8, 16)
    assert torch.equal(dm.sample_weights(z)[0], other.sample_weights(z)[0])
    _feed(dm, 3, seed=5)
    _feed(other, 3, seed=5)
    assert torch.equal(dm.multipliers, other.multipliers) and torch.equal(dm.centroids, other.centroids)


# ------------------------------------------------------------------------------------------------ trainer
def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=8, learning_rate=0.05, optim="sgd",
                lr_scheduler_type="constant", report_to=[], save_strategy="no", use_cpu=True, seed=0,
                disable_tqdm=True, logging_steps=1)
    base.update(kw)
    return DoGraphConfig(**base)


def _dataset(n_batches, batch=8, seed=0):
    rows = []
    for s in range(n_batches):
        rows += rows_from_batch(make_batch(batch=batch, seed=seed + s, domains=3))
    return Dataset.from_list(rows)


def _train(tmp_path, build=tiny_llama, data=None, **kw):
    model = build()
    args = _args(tmp_path, **kw)
    data = data if data is not None else _dataset(max(1, args.max_steps * args.gradient_accumulation_steps
                                                      * args.per_device_train_batch_size // 8))
    trainer = DoGraphTrainer(model=model, args=args, train_dataset=data, data_collator=stack_collator)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(data)))
    trainer.train()
    return model, trainer


def _flat(model):
    return torch.cat([p.detach().flatten().double() for p in model.parameters()])


def test_defaults_at_batch_8_act_within_40_steps(tmp_path):
    """run_clm.py's default batch of 8 with every DoGraph default (11 domains): after 40 SGD steps the
    parameters are not uniform's (today's per-batch mode had every sample alone in its cluster: exactly uniform)."""
    common = dict(max_steps=40, learning_rate=0.1)
    data = _dataset(40)
    dograph, trainer = _train(tmp_path / "d", build=tiny_gpt2, data=data, **common)
    uniform, _ = _train(tmp_path / "u", build=tiny_gpt2, data=data, mixing_strategy="uniform", **common)
    start = _flat(tiny_gpt2())
    # the updates differ by more than float noise (uniform vs DoGraph during the warm-up: ~1e-7)
    assert relative_difference(_flat(dograph) - start, _flat(uniform) - start) > 1e-3
    assert trainer.dograph_strategy.model.active
    history = trainer.flush_dograph_history()
    assert sum(1 for e in history if e.get("warmup")) == 256 // 8  # the default warm-up, then weighted steps


@pytest.mark.parametrize(("batch", "accumulation"), [(4, 2), (2, 4), (1, 8)])
def test_a_step_does_not_depend_on_how_its_samples_are_split(tmp_path, batch, accumulation):
    """1 × 8 = 4 × 2 = 2 × 4 = 8 × 1 micro-batches per optimizer step, to 1e-5 relative (2 ranks × 4: see
    test_distributed.py), with the domain model refitting along the way."""
    common = dict(max_steps=8, num_domains=3, domain_warmup_samples=16, domain_window=32, domain_refit_steps=2,
                  projection_dim=128, weight_smoothing=0.5)
    data = _dataset(8)
    one, ref_trainer = _train(tmp_path / "one", data=data, **common)
    split, trainer = _train(tmp_path / f"{batch}x{accumulation}", data=data, per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accumulation, **common)
    assert ref_trainer.dograph_strategy.model.refits >= 2  # the domains were fitted and refitted
    assert relative_difference(_flat(split), _flat(one)) < 1e-5
    torch.testing.assert_close(trainer.dograph_strategy.model.weights, ref_trainer.dograph_strategy.model.weights,
                               rtol=1e-4, atol=1e-6)
    # and DoGraph acted: not the uniform run
    uniform, _ = _train(tmp_path / "u", data=data, mixing_strategy="uniform", **common)
    assert relative_difference(_flat(one), _flat(uniform)) > 10 * relative_difference(_flat(split), _flat(one))


def test_effective_sample_size_stays_above_half_the_batch(tmp_path):
    """With the default statistics and smoothing (warm-up shortened to 16 samples so that 38 of 40 steps are
    weighted): the mean effective sample size of the weights over the steps is at least half the batch."""
    _, trainer = _train(tmp_path, build=tiny_gpt2, data=_dataset(40), max_steps=40, learning_rate=0.1,
                        domain_warmup_samples=16)
    history = trainer.flush_dograph_history()
    weighted = [e["ess"] for e in history if not e.get("warmup")]
    assert len(weighted) >= 38
    assert float(np.mean(weighted)) >= 0.5


def test_warm_up_logs_say_uniform(tmp_path):
    _, trainer = _train(tmp_path, max_steps=4, domain_warmup_samples=16, logging_steps=1)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["dograph/warmup"] for h in logs] == [1.0, 1.0, 0.0, 0.0]
    assert "dograph/domain_weight/0" not in logs[0] and "dograph/domain_weight/0" in logs[-1]


def test_packed_sequences_are_samples(tmp_path):
    """DataCollatorWithFlattening: each packed sequence is a sample with its own loss, sketch and weight. The
    Trainer's objective is the same as with padding, so DoGraph's step is too (same domains, same weights)."""
    rows = lm_rows(n=64, ragged=True)
    data = Dataset.from_list(rows)
    common = dict(max_steps=8, num_domains=3, domain_warmup_samples=16, domain_window=32, domain_refit_steps=2,
                  projection_dim=128, weight_smoothing=0.5, remove_unused_columns=False)
    results = {}
    for name, collator in (("padded", pad_collator), ("packed", flattening_collator())):
        model = tiny_llama()
        trainer = DoGraphTrainer(model=model, args=_args(tmp_path / name, **common), train_dataset=data,
                                 data_collator=collator)
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(data)))
        trainer.train()
        results[name] = (model, trainer)
    packed_trainer = results["packed"][1]
    assert packed_trainer.dograph_last.multipliers.shape == (8,)  # 8 samples in one packed row
    assert packed_trainer.dograph_strategy.model.active
    assert relative_difference(_flat(results["packed"][0]), _flat(results["padded"][0])) < 1e-5
    torch.testing.assert_close(results["packed"][1].dograph_strategy.model.weights,
                               results["padded"][1].dograph_strategy.model.weights, rtol=1e-4, atol=1e-6)
