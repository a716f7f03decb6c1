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
# (engine, gradient accumulation, N): the factored engine with two micro-batches per optimizer step
CASES = [(e, 1, N) if e == "opacus" else (e, 2, 1) for e in ENGINE_NAMES]


class StopAt(TrainerCallback):
    """Stops training after step `step` (the checkpoint of that step is written first by save_steps)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def make_trainer(out, engine: str, accumulation: int = 1, n: int = N, callbacks=()) -> DoGraphTrainer:
    rows = [r for s in range(2 * n * accumulation) for r in rows_from_batch(make_batch(seed=10 + s))]
    args = DoGraphConfig(
        output_dir=str(out), max_steps=2 * n, save_strategy="steps", save_steps=n, logging_steps=1,
        per_device_train_batch_size=8, gradient_accumulation_steps=accumulation, learning_rate=1e-2, warmup_steps=1,
        lr_scheduler_type="linear", use_cpu=True, seed=0, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, num_domains=3, projection_dim=64, grad_engine=engine,
        # online domains: centroids fitted at step 0 are still in use at step n, so they must be restored
        domain_refit_steps=n + 1,
    )
    trainer = DoGraphTrainer(model=tiny_gpt2(seed=0), args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator, callbacks=list(callbacks))
    trainer.dograph_write_plots = False  # not what this test is about; saves time
    return trainer


def comparable_state(trainer) -> dict:
    state = dograph_state(trainer)
    state.pop("pending_metrics")  # logging_steps=1: flushed at every step anyway
    return json.loads(json.dumps(state))  # the form a checkpoint holds (tuples → lists, ...)


@pytest.mark.parametrize(("engine", "accumulation", "n"), CASES)
def test_stop_and_resume_equals_uninterrupted(tmp_path, engine, accumulation, n):
    full = make_trainer(tmp_path / "full", engine, accumulation, n)
    full.train()
    assert full.state.global_step == 2 * n

    stopped = make_trainer(tmp_path / "split", engine, accumulation, n, callbacks=[StopAt(n)])
    stopped.train()
    assert stopped.state.global_step == n
    checkpoint = tmp_path / "split" / f"checkpoint-{n}"
    saved = load_dograph_state(checkpoint)
    assert saved["global_step"] == n and saved["projection_seed"] == 0
    assert saved["settings"]["grad_engine"] == engine and saved["settings"]["domain_refit_steps"] == n + 1
    assert saved["domain_finder"]["centroids"] is not None  # online centroids are part of the checkpoint
    assert len(saved["history"]) == n * accumulation and all("nmi" in e for e in saved["history"])
    assert saved["micro_step"] == [n - 1, accumulation - 1]  # the last micro-batch before the checkpoint

    resumed = make_trainer(tmp_path / "split", engine, accumulation, n)  # as a fresh process would build it
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 * n

    expected = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.allclose(p, expected[name], rtol=0, atol=1e-6), name
    assert comparable_state(resumed) == comparable_state(full)
    # the resumed trainer holds the whole run's history: the checkpoint's, then its own
    assert len(resumed.dograph_history) == 2 * n * accumulation


def test_state_file_written_with_save_model(tmp_path):
    trainer = make_trainer(tmp_path, ENGINE_NAMES[0])
    trainer.save_model(str(tmp_path / "final"))
    state = load_dograph_state(tmp_path / "final" / DOGRAPH_STATE_NAME)
    assert state["global_step"] == 0 and state["history"] == [] and state["micro_step"] == [None, 0]
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_restore_puts_every_part_back(tmp_path, caplog):
    """Online centroids, group-DRO weights, history, micro-step and pending metrics go back in place; a
    settings change is allowed but warned about."""
    from hf_dograph.checkpointing import restore_dograph_state

    source = make_trainer(tmp_path / "a", ENGINE_NAMES[0])
    source.domain_finder.centroids = torch.arange(6, dtype=torch.float64).reshape(3, 2).numpy()
    source.domain_finder.last_fit_step = 4
    source.dograph_history = [{"step": 0, "domain_weights": [1.0], "cluster_sizes": [8]}]
    source._micro_step = (3, 1)
    source._metrics["nmi"].extend([0.25, 0.5])
    state = json.loads(json.dumps(dograph_state(source)))
    state["group_dro"] = {"step_size": 0.01, "log_weights": [-0.5, -1.0]}

    args = DoGraphConfig(output_dir=str(tmp_path / "b"), use_cpu=True, report_to=[], num_domains=4,
                         mixing_strategy="group_dro")
    target = DoGraphTrainer(model=tiny_gpt2(), args=args, data_collator=stack_collator)
    with caplog.at_level("WARNING"):
        restore_dograph_state(target, state)
    assert "num_domains: 3 -> 4" in caplog.text
    assert target.domain_finder.centroids.tolist() == [[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]]
    assert target.domain_finder.last_fit_step == 4
    assert target.group_dro.log_weights.tolist() == [-0.5, -1.0]
    assert target.dograph_history == source.dograph_history
    assert target._micro_step == (3, 1)
    assert target._metrics["nmi"] == [0.25, 0.5]
