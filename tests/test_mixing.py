"""The data-mixing benchmark and its baselines (issue 7).

1. Each baseline's weights match its formula on hand-made losses, written out independently here
   (tests/test_strategies.py checks the functions; these also check what the trainer applies).
2. With one domain and uniform weights, every strategy's step is the plain `transformers.Trainer` step
   (same gradient, 1e-6).
3. `benchmarks/mixing.py --quick` runs end to end (the CI version of the benchmark): table, JSON and
   plot, with every expected row and finite numbers. It checks the pipeline, not the ranking.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_dograph import DoGraphConfig, DoGraphTrainer
from hf_dograph.sketch import ENGINES, LossOnlyEngine
from hf_dograph.strategies import GroupDRO, loss_reweighting_weights

from conftest import load_benchmark
from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_llama


def _load_benchmark():
    return load_benchmark("mixing")


mixing = _load_benchmark()


# ---------------------------------------------------------------------------------------------------
# 1. Formulas, by hand (pure Python, no shared code with hf_dograph.strategies)
# ---------------------------------------------------------------------------------------------------


def ref_loss_reweighting(losses: list[float], temperature: float) -> list[float]:
    """Sow et al.'s dynamic loss-based reweighting as the package reads it: α = softmax(u/T),
    u = (ℓ − mean) / max(population std, 1e-4 (1 + |mean|)), u = 0 when all losses are equal."""
    n = len(losses)
    mean = sum(losses) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in losses) / n)
    scale = max(std, 1e-4 * (1 + abs(mean)))
    u = [0.0] * n if all(x == losses[0] for x in losses) else [(x - mean) / scale for x in losses]
    top = max(u)
    e = [math.exp((x - top) / temperature) for x in u]
    return [x / sum(e) for x in e]


class RefGroupDRO:
    """Online group DRO by hand: q_g ← q_g exp(η L_g) for the groups in the batch, renormalized over all;
    α_i = q_{g(i)} / n_{g(i)}, renormalized over the batch."""

    def __init__(self, step_size: float, num_groups: int):
        self.eta = step_size
        self.q = [1.0 / num_groups] * num_groups

    def update(self, losses: list[float], groups: list[int]) -> list[float]:
        present = sorted(set(groups))
        for g in present:
            members = [x for x, h in zip(losses, groups) if h == g]
            self.q[g] *= math.exp(self.eta * sum(members) / len(members))
        total = sum(self.q)
        self.q = [x / total for x in self.q]
        raw = [self.q[g] / groups.count(g) for g in groups]
        return [x / sum(raw) for x in raw]


HAND_LOSSES = [
    [2.0, 2.0, 2.0, 2.0],  # all equal: uniform
    [1.0, 2.0, 3.0],
    [0.1, 5.0],
    [3.5],  # one sample
    [4.0, 0.5, 0.5, 0.5, 9.0, 2.25],  # ties and an outlier
    [-1.0, 0.0, 1e-3, 7.0],  # any real numbers (the formula is shift-invariant)
]


@pytest.mark.parametrize("temperature", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("losses", HAND_LOSSES)
def test_loss_reweighting_matches_formula(losses, temperature):
    got = loss_reweighting_weights(torch.tensor(losses, dtype=torch.float64), temperature)
    expected = ref_loss_reweighting(losses, temperature)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    # Higher loss, more weight; equal losses, equal weight.
    for i in range(len(losses)):
        for j in range(len(losses)):
            if losses[i] > losses[j]:
                assert got[i] > got[j]
            elif losses[i] == losses[j]:
                assert got[i] == got[j]


def test_group_dro_matches_formula_over_several_steps():
    # Four human domains, batches that miss some of them: the state must carry across steps exactly.
    batches = [
        ([1.0, 3.0, 4.0, 0.5], [0, 0, 1, 3]),
        ([2.0, 2.0, 6.0], [2, 2, 2]),  # one group only: α uniform, q still moves
        ([0.2, 5.0, 1.0, 1.0, 3.0], [0, 1, 1, 2, 3]),
        ([1.5], [1]),
    ]
    eta = 0.3
    got, ref = GroupDRO(step_size=eta, num_groups=4), RefGroupDRO(eta, 4)
    for losses, groups in batches:
        alpha = got.update(torch.tensor(losses, dtype=torch.float64), torch.tensor(groups))
        expected = ref.update(losses, groups)
        torch.testing.assert_close(alpha, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(got.weights, torch.tensor(ref.q, dtype=torch.float64), rtol=0, atol=1e-12)


# --- the same formulas, as the trainer applies them ---------------------------------------------------


def _per_sample_losses_by_hand(model, batch) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence over its labels that are not -100."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    token = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="none"
    ).view(labels.shape)
    valid = (labels != -100).float()
    return (token * valid).sum(1) / valid.sum(1)


def _trainer(strategy: str, tmp_path, engine: str = "factored", **settings) -> DoGraphTrainer:
    args = DoGraphConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=8, report_to="none", use_cpu=True,
        mixing_strategy=strategy, grad_engine=engine, projection_dim=16, **settings,
    )
    model = tiny_llama(seed=0)
    return DoGraphTrainer(model=model, args=args, train_dataset=[{"x": 0}], data_collator=stack_collator)


@pytest.mark.parametrize("strategy", ["uniform", "loss_reweighting", "group_dro"])
def test_trainer_applies_each_baseline_formula(strategy, tmp_path):
    """Over two steps on padded, multi-domain batches: α is the formula of the recorded losses (and, for
    group DRO, the labels, with its state carried), and the gradient is that of Σ α_i ℓ_i."""
    temperature, eta = 0.7, 0.5
    trainer = _trainer(strategy, tmp_path, loss_reweighting_temperature=temperature, group_dro_step_size=eta)
    model = trainer.model
    ref_dro = RefGroupDRO(eta, 3)
    for step in range(2):
        batch = make_batch(batch=8, seq=12, seed=step, pad_last=3, domains=3)
        model.zero_grad(set_to_none=True)
        trainer.training_step(model, {k: v.clone() for k, v in batch.items()})
        record = trainer.dograph_last
        losses = record.losses.double().tolist()
        if strategy == "uniform":
            expected = [1.0 / 8] * 8
        elif strategy == "loss_reweighting":
            expected = ref_loss_reweighting(losses, temperature)
        else:
            expected = ref_dro.update(losses, batch["domain"].tolist())
        # The formula's α (Σ = 1) is the weight multiplier v / n: the trainer's losses are float32, and so are
        # its loss-based weights: float32 precision.
        torch.testing.assert_close(record.multipliers.double() / 8, torch.tensor(expected, dtype=torch.float64),
                                   rtol=0, atol=1e-7)
        # ... and multiplies each sample's share of the Trainer's loss (its label tokens / the batch's).
        items = (batch["labels"][:, 1:] != -100).sum(1).double()
        torch.testing.assert_close(record.sample_weights.double(), record.multipliers.double() * items / items.sum(),
                                   rtol=1e-6, atol=1e-9)
        got = {n: p.grad.clone() for n, p in model.named_parameters()}

        # The gradient of Σ α_i ℓ_i, by autograd on a plain forward.
        model.zero_grad(set_to_none=True)
        ell = _per_sample_losses_by_hand(model, batch)
        torch.testing.assert_close(ell.double(), record.losses.double(), rtol=0, atol=1e-6)
        (record.sample_weights.to(ell.dtype) * ell).sum().backward()
        for n, p in model.named_parameters():
            torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{strategy} {n}: {m}")


BASELINES = ["uniform", "loss_reweighting", "group_dro"]


@pytest.mark.parametrize("strategy", BASELINES)
def test_baselines_take_no_per_sample_gradients(strategy, tmp_path):
    """The baselines' α needs losses only: the step is one ordinary backward, with no engine hooks installed."""
    trainer = _trainer(strategy, tmp_path)
    model = trainer.model
    trainer.training_step(model, make_batch(batch=8, seq=12, seed=0, domains=3))
    assert isinstance(trainer.grad_engine, LossOnlyEngine) and trainer._fallback_engine is None
    assert all(getattr(p, "grad_sample", None) is None for p in model.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="computes no gradient sketches"):
        trainer.grad_engine.sketches()


@pytest.mark.parametrize("strategy", BASELINES)
def test_baseline_non_finite_sample_is_left_out_exactly(strategy, tmp_path):
    """A NaN sample is redone per sample: left out (α = 0, counted), the gradient that of the others exactly."""
    trainer = _trainer(strategy, tmp_path)
    model = trainer.model

    def poison_first_sample(module, inputs, output):
        output = output.clone()
        output[0] = float("nan")
        return output

    batch = make_batch(batch=8, seq=12, seed=1, pad_last=3, domains=3)
    hook = model.lm_head.register_forward_hook(poison_first_sample)
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, {k: v.clone() for k, v in batch.items()})
    hook.remove()
    record = trainer.dograph_last
    assert record.assignments[0] == -1 and float(record.sample_weights[0]) == 0.0
    assert (record.sample_weights[1:] > 0).all() and float(trainer._metrics["nonfinite_samples"][-1]) == 1
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(bool(torch.isfinite(g).all()) for g in got.values())

    # Samples are independent in the forward, so the others' gradient is that of the batch without sample 0.
    rest = {k: v[1:] for k, v in batch.items()}
    model.zero_grad(set_to_none=True)
    ell = _per_sample_losses_by_hand(model, rest)
    (record.sample_weights[1:].to(ell.dtype) * ell).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{strategy} {n}: {m}")


def test_baseline_non_finite_gradient_from_finite_losses_drops_only_that_micro_batch(tmp_path):
    """An overflow in the backward: the micro-batch is left out and counted, earlier micro-batches are kept."""
    trainer = _trainer("uniform", tmp_path, gradient_accumulation_steps=2)
    model = trainer.model
    model.zero_grad(set_to_none=True)
    trainer.training_step(model, make_batch(batch=8, seq=12, seed=2))
    first = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert float(trainer._metrics["nonfinite_samples"][-1]) == 0
    blow_up = model.lm_head.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
    loss = trainer.training_step(model, make_batch(batch=8, seq=12, seed=3))
    blow_up.remove()
    assert math.isfinite(float(loss))
    assert float(trainer._metrics["nonfinite_samples"][-1]) == 8
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, first[n], rtol=0, atol=0, msg=lambda m: f"{n}: {m}")


# ---------------------------------------------------------------------------------------------------
# 2. One domain, uniform weights: every strategy is the plain Trainer step
# ---------------------------------------------------------------------------------------------------

B, T = 6, 12

# "Uniform weights" by construction, per strategy:
#   uniform: always 1/B;  group_dro: all samples carry the same human label (one group: 1/B);
#   dograph: num_domains = 1 (one cluster: w = (1), α = 1/B; the graph of one node has no edge);
#   loss_reweighting: distinct sequences and a huge temperature (softmax(u / 1e12) = 1/B to ~1e-12),
#   and separately identical sequences at the default temperature (equal losses: exactly 1/B).
REDUCTION_CASES = {
    "uniform": {"mixing_strategy": "uniform"},
    "loss_reweighting(T=1e12)": {"mixing_strategy": "loss_reweighting", "loss_reweighting_temperature": 1e12},
    "group_dro": {"mixing_strategy": "group_dro", "group_dro_step_size": 0.5},
    **{
        f"dograph-{o}{'+graph' if lam else ''}": {
            "mixing_strategy": "dograph", "objective": o, "graph_lambda": lam, "num_domains": 1,
        }
        for o in ("uncertainty", "variance", "robust", "alignment")
        for lam in (0.0, 0.5)
    },
}


class GradCapture(TrainerCallback):
    """The gradient the optimizer is about to apply (after accumulation; clipping is off)."""

    def __init__(self):
        self.grads = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_step_gradient(trainer_cls, args, rows) -> dict:
    capture = GradCapture()
    # LLaMA, not GPT-2: transformers' Trainer counts GPT2LMHeadModel's label tokens before the causal shift,
    # which scales plain GPT-2's loss by (T-1)/T. No padding and equal lengths: the plain token mean is then
    # the mean of the sequence means DoGraph weights.
    trainer = trainer_cls(model=tiny_llama(seed=0), args=args, train_dataset=rows, data_collator=stack_collator,
                          callbacks=[capture])
    trainer.train()
    assert capture.grads, "no gradient captured"
    return capture.grads


def _common_args(tmp_path) -> dict:
    return dict(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=B, learning_rate=1e-3, max_grad_norm=0.0,
        report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no",
    )


def _rows(identical: bool) -> list[dict]:
    batch = make_batch(batch=B, seq=T, seed=3, pad_last=0, domains=1)  # one human domain, no padding
    assert bool(batch["attention_mask"].all()) and bool((batch["domain"] == 0).all())
    if identical:
        batch = {k: v[:1].expand_as(v).clone() for k, v in batch.items()}
    return rows_from_batch(batch)


@pytest.fixture(scope="module")
def plain_gradients(tmp_path_factory):
    """The plain Trainer's first-step gradient, for distinct and for identical sequences."""
    out = {}
    for identical in (False, True):
        args = TrainingArguments(**_common_args(tmp_path_factory.mktemp("plain")))
        out[identical] = _one_step_gradient(Trainer, args, _rows(identical))
    return out


def _assert_same_gradient(got: dict, expected: dict, label: str) -> None:
    assert got.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=0, atol=1e-6, msg=lambda m: f"{label} {n}: {m}")
    assert any(float(g.abs().max()) > 1e-4 for g in expected.values())  # a real gradient, not zeros


@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize("case", list(REDUCTION_CASES))
def test_one_domain_uniform_weights_is_the_plain_trainer_step(case, engine, plain_gradients, tmp_path):
    args = DoGraphConfig(**_common_args(tmp_path), grad_engine=engine, projection_dim=16, **REDUCTION_CASES[case])
    got = _one_step_gradient(DoGraphTrainer, args, _rows(identical=False))
    _assert_same_gradient(got, plain_gradients[False], f"{case}/{engine}")


def test_loss_reweighting_equal_losses_is_the_plain_trainer_step(plain_gradients, tmp_path):
    # Identical sequences: equal losses, so α = 1/B exactly at the default temperature.
    args = DoGraphConfig(**_common_args(tmp_path), mixing_strategy="loss_reweighting", projection_dim=16)
    got = _one_step_gradient(DoGraphTrainer, args, _rows(identical=True))
    _assert_same_gradient(got, plain_gradients[True], "loss_reweighting(identical)")


# ---------------------------------------------------------------------------------------------------
# 3. The benchmark pipeline (CI version)
# ---------------------------------------------------------------------------------------------------


def test_every_strategy_name_maps_to_valid_settings():
    cfg = mixing.BenchConfig()
    assert len(mixing.ALL_STRATEGIES) == 11  # 3 baselines + 4 objectives × (persistent, per-batch) domains
    for name in mixing.ALL_STRATEGIES:
        settings = mixing.strategy_settings(name, cfg)
        DoGraphConfig(output_dir="unused", report_to="none", use_cpu=True, **settings)  # validates
        if name.startswith("dograph-"):
            assert settings["graph_lambda"] == 0.0
            assert settings["domain_mode"] == ("per_batch" if name.endswith("@batch") else "persistent")
    graph = mixing.strategy_settings("dograph-robust@batch+graph", cfg)
    assert graph["graph_lambda"] == cfg.graph_lambda > 0 and graph["domain_mode"] == "per_batch"
    tuned = mixing.strategy_settings("loss_reweighting:loss_reweighting_temperature=2", cfg)
    assert tuned == {"mixing_strategy": "loss_reweighting", "loss_reweighting_temperature": 2}
    for bad in ("dograph-nonsense", "dograph-robust@online", "uniform:temperature"):
        with pytest.raises(ValueError):
            mixing.strategy_settings(bad, cfg)


def test_sweep_selects_on_the_selection_seed_and_the_reference_follows_uniform():
    cfg = mixing.BenchConfig(strategies=["uniform", "dograph-robust"], seeds=[0, 1, 2], lrs=[1e-3, 4e-3],
                             selection_seed=7)
    sched = mixing.Scheduler(cfg, ["embedded"])
    assert {(j.strategy, j.lr, j.seed, j.phase) for j in sched.initial} == {
        (s, lr, 7, "sweep") for s in cfg.strategies for lr in cfg.lrs}
    ppl = {("uniform", 1e-3): 20.0, ("uniform", 4e-3): 18.0, ("dograph-robust", 1e-3): 19.0,
           ("dograph-robust", 4e-3): float("nan")}  # a diverged run never wins
    finals = []
    for job in sched.initial:
        finals += sched.done({"dataset": job.dataset, "strategy": job.strategy, "lr": job.lr, "seed": job.seed,
                              "phase": job.phase, "mean_perplexity": ppl[(job.strategy, job.lr)]})
    got = {(j.strategy, j.lr, j.seed) for j in finals}
    assert got == {(s, lr, seed) for s, lr in (("uniform", 4e-3), ("dograph-robust", 1e-3)) for seed in cfg.seeds} | {
        (mixing.REFERENCE, 4e-3, cfg.seeds[0])}  # the wall-time reference: one run
    assert all(j.phase == "final" and j.seed != cfg.selection_seed for j in finals)
    assert sched.total == len(sched.initial) + len(finals)


def test_redpajama_is_skipped_where_absent(tmp_path):
    cfg = mixing.BenchConfig(redpajama_dir=str(tmp_path / "nowhere"))
    run, skipped = mixing.available_datasets(cfg)
    assert run == ["embedded"] and "redpajama" in skipped


def test_redpajama_is_capped_per_domain(redpajama_dir, tmp_path):
    out = mixing.capped_redpajama(redpajama_dir, tmp_path / "capped", bytes_per_domain=5_000)
    domains = sorted(p.name for p in redpajama_dir.iterdir() if p.is_dir())
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == domains
    for d in domains:
        text = "".join(json.loads(line)["text"] for line in open(out / d / "part1.jsonl", encoding="utf-8"))
        assert 0 < len(text.encode("utf-8")) <= 5_000


def test_quick_benchmark_pipeline(tmp_path, capsys):
    """`benchmarks/mixing.py --quick`, in-process: every expected row, finite numbers, the files."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    start = time.perf_counter()
    try:
        assert mixing.main(["--quick", "--output-dir", str(tmp_path)]) == 0
    finally:
        transformers.logging.set_verbosity(verbosity)  # main() quiets transformers: leave other tests as they were
    elapsed = time.perf_counter() - start
    printed = capsys.readouterr().out

    cfg = mixing.quick_config()
    expected_rows = list(mixing.QUICK_STRATEGIES) + [mixing.REFERENCE]
    doc = json.loads((tmp_path / "results.json").read_text())
    summary = doc["summary"]["embedded"]
    assert list(summary["strategies"]) == expected_rows
    domains = summary["domains"]
    assert domains == ["prose", "code", "dialogue", "tables", "arithmetic"]
    for name, row in summary["strategies"].items():
        for key in ("mean_perplexity", "worst_perplexity", "overall_perplexity", "wall_s"):
            assert all(math.isfinite(x) for x in row[key]), (name, key, row[key])
        assert set(row["per_domain"]) == set(domains)
        assert all(math.isfinite(m) and m > 1 for m, _ in row["per_domain"].values())
        assert row["worst_domain"] in domains
        if name != "uniform":
            assert math.isfinite(row["delta_mean_vs_uniform"][0])
        # How concentrated the weights were: 1/Σα² in [1, B]; uniform weights use the whole batch.
        if name == mixing.REFERENCE:
            assert row["effective_batch"] is None
        else:
            assert 1.0 - 1e-9 <= row["effective_batch"][0] <= cfg.batch_size + 1e-9
        if name == "uniform":
            # the Trainer's own weights: each sample's share of the tokens (a domain's last packed block is
            # shorter), so within a few % of the batch
            assert row["effective_batch"][0] == pytest.approx(cfg.batch_size, rel=0.05)
        # one-sample clusters exist only per batch; smoothness is measured for persistent domains
        assert (row["singleton_weight"] is not None) == ("@batch" in name)
        assert (row["weight_change"] is not None) == (name.startswith("dograph-") and "@batch" not in name)
    # The same token budget and seeds for every strategy; one run per (strategy, seed).
    runs = doc["runs"]
    assert len(runs) == len(expected_rows) * len(cfg.seeds)  # one seed: the reference has its one run too
    assert {r["tokens"] for r in runs} == {cfg.steps * cfg.batch_size * cfg.seq_len}
    assert {r["seed"] for r in runs} == set(cfg.seeds)
    assert {r["strategy"] for r in runs} == set(expected_rows)
    # The outputs: table (printed and written), plot.
    table = (tmp_path / "table.md").read_text()
    for name in expected_rows:
        assert f"| {name}" in table and f"| {name}" in printed
    png = tmp_path / "mixing_embedded.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert elapsed < 120, f"the quick benchmark took {elapsed:.0f} s"
