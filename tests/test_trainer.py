"""DoGraphTrainer: the applied gradient is exactly Σ α_i g_i, inside and outside `Trainer.train()`."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_dograph import DoGraphConfig, DoGraphTrainer
from hf_dograph.sketch import ENGINES, UnsupportedLayerError

from tiny_models import MODEL_BUILDERS, make_batch, rows_from_batch, stack_collator, tiny_gpt2, tiny_llama

OBJECTIVES = ["uncertainty", "variance", "robust", "alignment"]
ENGINE_NAMES = [e for e in ("opacus", "factored") if e in ENGINES]


def dograph_args(tmp_path, **overrides) -> DoGraphConfig:
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=8, report_to=[], use_cpu=True, num_domains=3,
        projection_dim=64, save_strategy="no", disable_tqdm=True, learning_rate=1e-2, seed=0,
    )
    base.update(overrides)
    return DoGraphConfig(**base)


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def independent_weighted_grad(model, batch, alpha) -> dict[str, torch.Tensor]:
    """∇ Σ_i α_i ℓ_i by plain autograd, ℓ_i written out here (not the package's loss)."""
    model.zero_grad(set_to_none=True)
    ids, labels = batch["input_ids"], batch["labels"]
    b, t = ids.shape
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"],
                   position_ids=torch.arange(t).expand(b, t)).logits
    total = 0.0
    for i in range(b):
        valid = labels[i, 1:] != -100
        ce = F.cross_entropy(logits[i, :-1][valid], labels[i, 1:][valid], reduction="mean")
        total = total + float(alpha[i]) * ce
    total.backward()
    return {n: p.grad.detach().clone() for n, p in trainable(model)}


def rel_err(a: dict, b: dict) -> float:
    num = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in b))
    den = torch.sqrt(sum((b[k] ** 2).sum() for k in b))
    return float(num / den)


def warmed_up_trainer(tmp_path, model, **overrides):
    """A trainer whose persistent domain model is fitted after one step (warm-up of 8 samples)."""
    args = dograph_args(tmp_path, domain_warmup_samples=8, domain_window=64, **overrides)
    trainer = DoGraphTrainer(model=model, args=args, data_collator=stack_collator)
    trainer.training_step(trainer.model, make_batch(seed=11))
    trainer.model.zero_grad(set_to_none=True)
    return trainer


@pytest.mark.parametrize("engine", ENGINE_NAMES)
@pytest.mark.parametrize("model_name", list(MODEL_BUILDERS))
@pytest.mark.parametrize("objective", OBJECTIVES + ["uncertainty+graph", "uncertainty@batch", "robust@batch"])
def test_applied_gradient_is_weighted_autograd_gradient(tmp_path, engine, model_name, objective):
    """The gradient DoGraph applies is ∇ Σ_i α_i ℓ_i (α_i = v_i μ_i: weight × the sample's share of the
    Trainer's loss), to 1e-5, for both engines, every objective, persistent and per-batch domains."""
    name, _, mode = objective.partition("@")
    graph = name.endswith("+graph")
    model = MODEL_BUILDERS[model_name]()
    reference = copy.deepcopy(model)
    settings = dict(objective=name.split("+")[0], graph_lambda=0.5 if graph else 0.0, grad_engine=engine,
                    domain_mode="per_batch" if mode else "persistent")
    if mode:
        trainer = DoGraphTrainer(model=model, args=dograph_args(tmp_path, **settings), data_collator=stack_collator)
    else:
        trainer = warmed_up_trainer(tmp_path, model, **settings)
        reference.load_state_dict(model.state_dict())  # the warm-up step changed nothing (no optimizer step)
    batch = make_batch()
    trainer.training_step(trainer.model, dict(batch))

    rec = trainer.dograph_last
    alpha = rec.sample_weights
    assert (alpha >= 0).all()  # alignment may give a domain weight 0
    assert rec.assignments.shape == (8,) and rec.domain_weights.numel() == rec.sigma2.numel()
    applied = {n: p.grad.detach().clone() for n, p in trainable(trainer.model)}
    expected = independent_weighted_grad(reference, batch, alpha)
    assert set(applied) == set(expected)
    assert rel_err(applied, expected) < 1e-5
    for n in expected:  # and parameter by parameter, so a small layer cannot hide behind a big one
        scale = expected[n].abs().max().clamp(min=1e-8)
        assert (applied[n] - expected[n]).abs().max() / scale < 1e-4, n
    # The weights are not the Trainer's: DoGraph did something.
    assert not torch.allclose(rec.multipliers, torch.ones_like(rec.multipliers))


def test_lora_only_adapters_are_sketched_and_updated(tmp_path):
    model = MODEL_BUILDERS["gpt2-lora"]()
    names = [n for n, _ in trainable(model)]
    assert names and all("lora_" in n for n in names)
    trainer = DoGraphTrainer(model=model, args=dograph_args(tmp_path), data_collator=stack_collator)
    trainer.training_step(trainer.model, make_batch())
    for n, p in trainer.model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


def test_gradient_accumulation_and_clipping_inside_train(tmp_path):
    """Through Trainer.train(): the pre-optimizer gradient is Σ over micro-batches of Σ α g (α including each
    sample's share of the step's tokens), then `max_grad_norm` clips it; the logged loss is the Trainer's."""
    model = tiny_gpt2()
    reference = copy.deepcopy(model)
    batches = [make_batch(seed=s) for s in (1, 2)]
    rows = rows_from_batch(batches[0]) + rows_from_batch(batches[1])
    captured, records = {}, []

    class Capture(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            captured.update({n: p.grad.detach().clone() for n, p in trainable(model)})

    for clip in (0.0, 1e-3):
        args = dograph_args(tmp_path, gradient_accumulation_steps=2, max_steps=1, max_grad_norm=clip,
                            logging_steps=1, learning_rate=0.0)
        m = copy.deepcopy(reference)
        trainer = DoGraphTrainer(model=m, args=args, train_dataset=Dataset.from_list(rows),
                                 data_collator=stack_collator, callbacks=[Capture()])
        trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(rows)))
        records.clear()
        original = trainer._record
        def keep(*a):
            original(*a)
            records.append(trainer.dograph_last)

        trainer._record = keep
        trainer.train()
        assert len(records) == 2
        expected = {}
        for batch, rec in zip(batches, records):
            # α_i already holds the sample's share of the step's loss (its tokens / the step's tokens).
            g = independent_weighted_grad(copy.deepcopy(reference), batch, rec.sample_weights)
            for n, v in g.items():
                expected[n] = expected.get(n, 0) + v
        if clip == 0.0:
            assert rel_err(captured, expected) < 1e-5
            logged = [h for h in trainer.state.log_history if "loss" in h][0]["loss"]
            # The Trainer's own loss: token losses of both micro-batches over the step's label tokens.
            trainer_loss = sum(float((r.shares * r.losses).sum()) for r in records)
            assert logged == pytest.approx(trainer_loss, rel=1e-5)
        else:
            norm = torch.sqrt(sum((v ** 2).sum() for v in captured.values()))
            assert float(norm) == pytest.approx(clip, rel=1e-3)
            cos = sum((captured[n] * expected[n]).sum() for n in expected) / (
                norm * torch.sqrt(sum((v ** 2).sum() for v in expected.values())))
            assert float(cos) == pytest.approx(1.0, abs=1e-5)


def test_uniform_strategy_equals_plain_trainer(tmp_path):
    """Only the weighting differs: with uniform weights the run is the plain Trainer's run (GA 2, 3 steps)."""
    rows = []
    for s in range(6):
        rows += rows_from_batch(make_batch(seed=s, pad_last=0))
    histories, params = [], []
    for cls in (Trainer, DoGraphTrainer):
        model = tiny_llama()
        common = dict(output_dir=str(tmp_path / cls.__name__), per_device_train_batch_size=8, report_to=[],
                      use_cpu=True, max_steps=3, gradient_accumulation_steps=2, logging_steps=1, seed=0,
                      learning_rate=0.1, optim="sgd", save_strategy="no", disable_tqdm=True)
        # SGD: parameters then differ by lr × the gradient difference (Adam's g/√v would amplify rounding
        # on near-zero gradients).
        if cls is Trainer:
            args = TrainingArguments(**common)
            data = Dataset.from_list([{k: v for k, v in r.items() if k != "domain"} for r in rows])
        else:
            args = DoGraphConfig(**common, mixing_strategy="uniform")
            data = Dataset.from_list(rows)
        trainer = cls(model=model, args=args, train_dataset=data, data_collator=stack_collator)
        trainer.train()
        histories.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert histories[0] == pytest.approx(histories[1], rel=1e-5)
    assert torch.allclose(params[0], params[1], rtol=1e-5, atol=1e-6)


def test_domain_column_never_reaches_forward_and_nmi_is_logged(tmp_path):
    model = tiny_gpt2()
    seen = []
    model.register_forward_pre_hook(lambda mod, a, kw: seen.append(set(kw)), with_kwargs=True)
    rows = []
    for s in range(4):
        rows += [dict(r, source_text="kept out by remove_unused_columns") for r in rows_from_batch(make_batch(seed=s))]
    data = Dataset.from_list(rows)
    args = dograph_args(tmp_path, max_steps=4, logging_steps=2, eval_strategy="steps", eval_steps=2,
                        domain_warmup_samples=8)
    assert args.remove_unused_columns  # the default, left alone
    trainer = DoGraphTrainer(model=model, args=args, train_dataset=data, eval_dataset=data,
                             data_collator=stack_collator)
    trainer.train()
    assert seen and all("domain" not in kw and "source_text" not in kw for kw in seen)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for key in ("dograph/weight_entropy", "dograph/effective_domains", "dograph/cluster_size_min",
                "dograph/cluster_size_max", "dograph/nmi", "dograph/nonfinite_samples", "dograph/ess",
                "dograph/warmup", "dograph/domain_weight/0", "dograph/domain_frequency/0"):
        assert key in logs[-1], key
    assert 0.0 <= logs[-1]["dograph/nmi"] <= 1.0
    assert any("eval_loss" in h for h in trainer.state.log_history)


def test_plain_training_arguments_get_dograph_defaults(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=2, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True)
    data = Dataset.from_list(rows_from_batch(make_batch()) * 2)
    trainer = DoGraphTrainer(model=tiny_gpt2(), args=args, train_dataset=data, data_collator=stack_collator)
    assert trainer.dograph_settings.num_domains == 11 and trainer.dograph_settings.objective == "uncertainty"
    trainer.train()
    assert trainer.dograph_last is not None


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_bf16_autocast_on_cpu_trains(tmp_path, engine):
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    data = Dataset.from_list(rows_from_batch(make_batch()) * 3)
    args = dograph_args(tmp_path, bf16=True, max_steps=3, logging_steps=1, grad_engine=engine)
    trainer = DoGraphTrainer(model=model, args=args, train_dataset=data, data_collator=stack_collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_same_seed_same_domains_and_weights(tmp_path):
    records = []
    for _ in range(2):
        trainer = warmed_up_trainer(tmp_path, tiny_gpt2())
        trainer.training_step(trainer.model, make_batch())
        records.append(trainer.dograph_last)
    assert torch.equal(records[0].assignments, records[1].assignments)
    assert torch.equal(records[0].domain_weights, records[1].domain_weights)
    assert torch.equal(records[0].sample_weights, records[1].sample_weights)


def test_thirty_steps_lower_the_training_loss(tmp_path):
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    rows = []
    for s in range(30):
        rows += rows_from_batch(make_batch(seed=s))
    args = dograph_args(tmp_path, max_steps=30, logging_steps=5, learning_rate=3e-3)
    trainer = DoGraphTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ---------------------------------------------------------------------------------------------- bad input
def test_batch_without_labels_is_a_clear_error(tmp_path):
    trainer = DoGraphTrainer(model=tiny_gpt2(), args=dograph_args(tmp_path), data_collator=stack_collator)
    batch = make_batch()
    del batch["labels"]
    with pytest.raises(ValueError, match="no 'labels'.*DataCollatorForLanguageModeling"):
        trainer.training_step(trainer.model, batch)


@pytest.mark.parametrize(
    "overrides, message",
    [({"num_domains": 0}, "num_domains=0 must be >= 1"), ({"objective": "entropy"}, "objective='entropy' is unknown"),
     ({"grad_engine": "magic"}, "grad_engine='magic' is unknown"), ({"graph_lambda": -1.0}, "graph_lambda"),
     ({"graph_lambda": float("inf")}, "graph_lambda=inf must be a finite number"),
     ({"variance_penalty": float("inf")}, "variance_penalty=inf must be a finite number"),
     ({"uncertainty_eps": float("inf")}, "uncertainty_eps=inf must be a finite number"),
     ({"uncertainty_eps": float("nan")}, "uncertainty_eps=nan must be a finite number"),
     ({"weight_smoothing": 0.0}, "weight_smoothing=0.0 must be in"),
     ({"domain_mode": "online"}, "domain_mode='online' is unknown"),
     ({"domain_mode": "per_batch", "domain_refit_steps": 5}, "needs domain_mode='persistent'")],
)
def test_bad_settings_name_the_field(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        dograph_args(tmp_path, **overrides)


def test_unsupported_layer_is_named(tmp_path):
    class BatchNormLM(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(16, 8)
            self.norm = torch.nn.BatchNorm1d(8)
            self.head = torch.nn.Linear(8, 16)

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            h = self.embed(input_ids)
            h = self.norm(h.transpose(1, 2)).transpose(1, 2)
            return {"logits": self.head(h)}

    with pytest.raises(UnsupportedLayerError, match=r"norm \(BatchNorm1d\)"):  # at construction, not step 1
        DoGraphTrainer(model=BatchNormLM(), args=dograph_args(tmp_path, grad_engine="opacus"),
                       data_collator=stack_collator, per_sample_loss_func=lambda out, labels, **kw: out["logits"].sum((1, 2)))


def test_batch_smaller_than_num_domains_uses_fewer_clusters_and_warns_once(tmp_path, caplog):
    trainer = DoGraphTrainer(model=tiny_gpt2(), args=dograph_args(tmp_path, num_domains=11, domain_mode="per_batch"),
                             data_collator=stack_collator)
    with caplog.at_level(logging.WARNING, logger="hf_dograph.domains"):
        for s in range(2):
            trainer.training_step(trainer.model, make_batch(batch=4, seed=s))
    assert trainer.dograph_last.domain_weights.numel() == 4
    assert sum("fewer than num_domains=11" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_non_finite_sample_is_left_out_and_counted(tmp_path, engine):
    model = tiny_gpt2()

    def poison_first_sample(module, inputs, output):
        output = output.clone()
        output[0] = float("nan")
        return output

    model.lm_head.register_forward_hook(poison_first_sample)
    rows = rows_from_batch(make_batch()) * 2
    args = dograph_args(tmp_path, max_steps=2, logging_steps=2, grad_engine=engine)
    trainer = DoGraphTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(range(len(rows)))
    trainer.train()
    rec = trainer.dograph_last
    assert rec.assignments[0] == -1 and rec.sample_weights[0] == 0 and (rec.sample_weights[1:] > 0).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    log = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert log["dograph/nonfinite_samples"] == 2  # one per step, two steps in the window
    assert torch.isfinite(torch.tensor(log["loss"]))
