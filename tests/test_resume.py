"""Exact resume: a run stopped at step N and resumed from checkpoint-N reaches step 2N with the same
parameters and the same DoGraph state as a run that was never interrupted (CPU, same seed)."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_dograph import DoGraphConfig, DoGraphTrainer
from hf_dograph.checkpointing import DOGRAPH_STATE_NAME, dograph_state, load_dograph_state
from hf_dograph.sketch import ENGINES

from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2

N = 2  # stop (and checkpoint) at step N, train to 2N (N = 1 with accumulation, to keep the test short)
ENGINE_NAMES = [e for e in ("opacus", "factored") if e in ENGINES]
# (engine, gradient accumulation, N, domain mode): persistent domains with one and two micro-batches per
# optimizer step, and the per-batch mode (whose K-means seed depends on the step) on the reference engine.
CASES = [("factored", 1, N, "persistent"), ("factored", 2, 1, "persistent"), ("opacus", 1, N, "per_batch")]


class StopAt(TrainerCallback):
    """Stops training after step `step` (the checkpoint of that step is written first by save_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(out, engine: str, accumulation: int = 1, n: int = N, callbacks=(), mode: str = "persistent",
                 **overrides) -> DoGraphTrainer:
    rows = [r for s in range(2 * n * accumulation) for r in rows_from_batch(make_batch(seed=10 + s))]
    settings = dict(
        output_dir=str(out), max_steps=2 * n, save_strategy="steps", save_steps=n, logging_steps=1,
        per_device_train_batch_size=8, gradient_accumulation_steps=accumulation, learning_rate=1e-2, warmup_steps=1,
        lr_scheduler_type="linear", use_cpu=True, seed=0, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, num_domains=3, projection_dim=64, grad_engine=engine, domain_mode=mode,
    )
    if mode == "persistent":
        # persistent domains fitted after the first step and refitted after the resume: the window, centroids,
        # statistics and smoothed weights in use at step n must all come back
        settings.update(domain_warmup_samples=8, domain_window=24, domain_refit_steps=2)
    args = DoGraphConfig(**{**settings, **overrides})
    trainer = DoGraphTrainer(model=tiny_gpt2(seed=0), args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator, callbacks=list(callbacks))
    trainer.dograph_write_plots = False  # not what this test is about; saves time
    return trainer


def comparable_state(trainer) -> dict:
    state = dograph_state(trainer)
    state.pop("pending_metrics")  # logging_steps=1: flushed at every step anyway
    return json.loads(json.dumps(state))  # the form a checkpoint holds (tuples → lists, ...)


@pytest.mark.parametrize(("engine", "accumulation", "n", "mode"), CASES)
def test_stop_and_resume_equals_uninterrupted(tmp_path, engine, accumulation, n, mode):
    full = make_trainer(tmp_path / "full", engine, accumulation, n, mode=mode)
    full.train()
    assert full.state.global_step == 2 * n

    stopped = make_trainer(tmp_path / "split", engine, accumulation, n, callbacks=[StopAt(n)], mode=mode)
    stopped.train()
    assert stopped.state.global_step == n
    checkpoint = tmp_path / "split" / f"checkpoint-{n}"
    saved = load_dograph_state(checkpoint)
    assert saved["global_step"] == n and saved["projection_seed"] == 0
    assert saved["settings"]["grad_engine"] == engine
    if mode == "persistent":
        strategy = saved["strategy"]
        assert strategy["name"] == "PersistentDoGraph"
        assert strategy["meta"]["samples_seen"] == 8 * n * accumulation
        assert {"z", "centroids", "weights", "multipliers"} <= set(strategy["tensors"])  # the fitted model
        assert len(saved["history"]) == n  # one entry per optimizer step
    else:
        assert saved["strategy"]["meta"]["step_key"] == [n - 1, accumulation - 1]
        assert len(saved["history"]) == n * accumulation  # one entry per micro-batch

    resumed = make_trainer(tmp_path / "split", engine, accumulation, n, mode=mode)  # as a fresh process would
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 * n

    expected = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.allclose(p, expected[name], rtol=0, atol=1e-6), name
    assert comparable_state(resumed) == comparable_state(full)
    # the resumed trainer holds the whole run's history: the checkpoint's, then its own
    assert len(resumed.dograph_history) == len(full.dograph_history)


def test_state_file_written_with_save_model(tmp_path):
    trainer = make_trainer(tmp_path, ENGINE_NAMES[0])
    trainer.save_model(str(tmp_path / "final"))
    state = load_dograph_state(tmp_path / "final" / DOGRAPH_STATE_NAME)
    assert state["global_step"] == 0 and state["history"] == [] and state["strategy"]["name"] == "PersistentDoGraph"
    assert (tmp_path / "final" / "model.safetensors").is_file()


def _fitted_state(tmp_path) -> dict:
    """The state of a short run whose persistent domain model is fitted (3 domains, k = 64, window 24)."""
    trainer = make_trainer(tmp_path / "a", "factored")
    trainer.train()
    trainer._metrics["nmi"].extend([torch.tensor(0.25), torch.tensor(0.5)])
    trainer._nonfinite_run = 2
    return trainer, json.loads(json.dumps(dograph_state(trainer)))


def test_restore_puts_every_part_back(tmp_path):
    """Window, centroids, statistics, weights, counters, history, pending metrics and the non-finite count go
    back in place, exactly."""
    from hf_dograph.checkpointing import restore_dograph_state

    source, state = _fitted_state(tmp_path)
    target = make_trainer(tmp_path / "b", "factored")
    restore_dograph_state(target, state)
    src, dst = source.dograph_strategy.model, target.dograph_strategy.model
    for name in ("z", "loss", "items", "valid", "centroids", "weights", "multipliers"):
        assert torch.equal(getattr(src, name), getattr(dst, name)), name
    assert {k: float(v.sum()) for k, v in src.stats.items()} == {k: float(v.sum()) for k, v in dst.stats.items()}
    for name in ("ptr", "filled", "samples_seen", "steps", "refits", "last_refit_step"):
        assert getattr(src, name) == getattr(dst, name), name
    assert target.dograph_history == source.dograph_history
    assert [float(v) for v in target._metrics["nmi"]] == [0.25, 0.5]
    assert target._nonfinite_run == 2


def test_resume_with_other_sketches_restarts_the_domain_model(tmp_path, caplog):
    """projection_dim or projection_seed changed: the stored sketches are meaningless, the domain model
    starts a new warm-up (it does not crash on stale centroids, nor silently keep them)."""
    from hf_dograph.checkpointing import restore_dograph_state

    _, state = _fitted_state(tmp_path)
    for change in ({"projection_dim": 32}, {"projection_seed": 7}):
        target = make_trainer(tmp_path / f"b{len(change)}", "factored", **change)
        with caplog.at_level("WARNING"):
            restore_dograph_state(target, state)
        assert "cannot be reused" in caplog.text and next(iter(change)) in caplog.text
        assert target.dograph_strategy.model.centroids is None and not target.dograph_strategy.model.active
        caplog.clear()


def test_resume_with_other_num_domains_refits_from_the_window(tmp_path, caplog):
    """num_domains changed: the window is kept, the old centroids are dropped and the next step refits with the
    new m; a changed window size keeps the newest rows."""
    from hf_dograph.checkpointing import restore_dograph_state

    _, state = _fitted_state(tmp_path)
    target = make_trainer(tmp_path / "b", "factored", num_domains=4, domain_window=16)
    with caplog.at_level("WARNING"):
        restore_dograph_state(target, state)
    assert "num_domains: 3 -> 4" in caplog.text
    dm = target.dograph_strategy.model
    assert dm.centroids is None and dm.z.shape == (16, 64) and dm.filled == 16
    target.train()  # the first step refits with 4 domains from the kept window
    assert dm.centroids.shape == (4, 64) and dm.active
