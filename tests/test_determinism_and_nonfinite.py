"""Same inputs, same result; a NaN is loud, never saved.

- Two identical DoGraph runs (same seed, data, settings; persistent domains with fits and refits) end with
  bit-identical parameters and domain models on CPU, also while another process loads every core (the engine has
  no load-dependent thread switch; sums are in a fixed order).
- A parameter turned NaN mid-run: every later step has no usable sample, is counted, updates nothing, and after
  `nonfinite_step_limit` steps training stops with a message naming the step and the parameter; a model with
  NaN parameters is never saved (a checkpoint due at that point is refused with the same kind of message).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from transformers import TrainerCallback

from hf_dograph import DoGraphConfig, DoGraphTrainer
from hf_dograph.trainer import NonFiniteTrainingError

from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2


def _run(out, steps=10, callbacks=(), **kw):
    rows = []
    for s in range(steps):
        rows += rows_from_batch(make_batch(seed=s))
    settings = dict(output_dir=str(out), per_device_train_batch_size=8, max_steps=steps, learning_rate=1e-2,
                    use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True, seed=0, logging_steps=1,
                    num_domains=3, projection_dim=128, domain_warmup_samples=16, domain_window=32,
                    domain_refit_steps=2)
    args = DoGraphConfig(**{**settings, **kw})
    trainer = DoGraphTrainer(model=tiny_gpt2(), args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator, callbacks=list(callbacks))
    trainer.dograph_write_plots = False
    trainer.train()
    return trainer


def _busy_cores():
    """One spinning process per core (they load the machine until killed)."""
    code = "while True: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]


def test_two_identical_runs_are_bit_identical_also_under_load(tmp_path):
    first = _run(tmp_path / "a")
    busy = _busy_cores()
    try:
        second = _run(tmp_path / "b")
    finally:
        for p in busy:
            p.kill()
    assert first.dograph_strategy.model.refits >= 2  # domains fitted and refitted: K-means is part of it
    for (n, p), q in zip(first.model.named_parameters(), second.model.parameters()):
        assert torch.equal(p, q), n
    a, b = first.dograph_strategy.model, second.dograph_strategy.model
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.multipliers, b.multipliers)


class _PoisonAt(TrainerCallback):
    """Turns one parameter NaN at the end of optimizer step `step` (a diverged update, say)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")


def test_a_nan_mid_run_stops_training_with_a_message(tmp_path):
    with pytest.raises(NonFiniteTrainingError) as err:
        _run(tmp_path, steps=12, callbacks=[_PoisonAt(3)], nonfinite_step_limit=4)
    message = str(err.value)
    assert "step 7" in message and "4 optimizer steps in a row" in message  # steps 4, 5, 6, 7
    assert "transformer.h.0.mlp.c_fc.weight" in message and "learning rate" in message


def test_steps_without_usable_samples_are_counted_logged_and_update_nothing(tmp_path):
    trainer = _run(tmp_path, steps=5, callbacks=[_PoisonAt(2)], nonfinite_step_limit=10)  # limit above the run
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["dograph/nonfinite_steps"] for h in logs] == [0, 0, 1, 1, 1]
    assert all(math.isnan(h["loss"]) for h in logs[2:])  # logged as non-finite, not as 0
    assert all(h["dograph/nonfinite_samples"] == 8 for h in logs[2:])


def test_a_nan_model_is_never_saved(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match="refuses to save a model whose parameters hold NaN"):
        _run(tmp_path, steps=6, callbacks=[_PoisonAt(2)], save_strategy="steps", save_steps=1)
    saved = sorted(p.name for p in tmp_path.glob("checkpoint-*"))
    assert saved == ["checkpoint-1"]  # the good one; checkpoint-2 (NaN) was refused
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "checkpoint-1" / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
