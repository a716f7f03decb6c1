"""Device→host reads inside a DoGraph training step, counted by patching the calls that make them.

There is no GPU here to watch synchronizations directly; every read of a tensor's value on the host goes
through one of `.item()`, `.tolist()`, `.cpu()`, `.numpy()` or Python's `bool()` / `float()` / `int()` of a
tensor, so counting those calls made by hf_dograph's own code (not by the model or transformers) inside
`training_step` bounds DoGraph's synchronizations. The bound (README, "Gradient engines"): one read per micro-batch —
a two-flag vector: whether a left-out sample holds inf/NaN, and whether any sample was usable — the same
count as the plain Trainer's own per-micro-batch NaN check of the loss; nothing more at the end of the
optimizer step, refits included (persistent domains, default objective, one process). The K-means of a refit
runs here as on a GPU: on the CPU, where no device exists to wait for, it reads its assignments to stop
early (`kmeans.lloyd`), which a GPU run does not do.

The baseline strategies (`uniform`, `loss_reweighting`, `group_dro`: one ordinary weighted backward, no
sketches) check the finiteness of that backward's gradients with one read for all parameters, so their count
does not grow with the model: `uniform` reads three times per micro-batch (whether every sample is usable,
the same two-flag vector, the backward's flags); the per-micro-batch ones compute their weights on the host
and read a few times more.
"""

from __future__ import annotations

import contextlib
import sys

import pytest
import torch
from datasets import Dataset

from hf_dograph import DoGraphConfig, DoGraphTrainer

from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


@contextlib.contextmanager
def count_host_reads(package: str = "hf_dograph"):
    """Count calls of METHODS on tensors made directly from `package`'s code; yields the list of call sites."""
    sites: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in METHODS}

    def make(name, original):
        def counted(self, *a, **k):
            frame = sys._getframe(1)
            module = frame.f_globals.get("__name__", "")
            if module.startswith(package):
                sites.append(f"{module}:{frame.f_lineno} {name}")
            return original(self, *a, **k)

        return counted

    for name, original in originals.items():
        setattr(torch.Tensor, name, make(name, original))
    try:
        yield sites
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def _trainer(tmp_path, accumulation=2, model=None, **settings):
    args = DoGraphConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, **settings,
                         gradient_accumulation_steps=accumulation, use_cpu=True, report_to=[], save_strategy="no",
                         disable_tqdm=True, num_domains=3, projection_dim=64, domain_warmup_samples=8,
                         domain_refit_steps=2)
    data = Dataset.from_list(rows_from_batch(make_batch()) * 2)
    trainer = DoGraphTrainer(model=model or tiny_gpt2(), args=args, train_dataset=data, data_collator=stack_collator)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    return trainer


def _micro_batch(trainer, seed, last):
    trainer.accelerator.gradient_state._set_sync_gradients(last)
    trainer.current_gradient_accumulation_steps = 2
    trainer.training_step(trainer.model, make_batch(seed=seed))
    if last:
        trainer.state.global_step += 1
        trainer.model.zero_grad(set_to_none=True)


def test_one_host_read_per_micro_batch_and_none_more_per_optimizer_step(tmp_path, monkeypatch):
    import hf_dograph.kmeans as km

    monkeypatch.setattr(km, "_stops_early", lambda x, stop_early: False)  # the device's code path
    trainer = _trainer(tmp_path)
    for s in range(4):  # warm-up, the first fit, a weighted step, a refit
        _micro_batch(trainer, 2 * s, last=False)
        _micro_batch(trainer, 2 * s + 1, last=True)
    dm = trainer.dograph_strategy.model
    assert dm.active and dm.refits >= 2
    refits_before = dm.refits
    for step in range(4):  # steady state, refit steps among them (refit every 2 optimizer steps)
        refits = dm.refits
        with count_host_reads() as first:
            _micro_batch(trainer, 100 + 2 * step, last=False)
        with count_host_reads() as last:
            _micro_batch(trainer, 101 + 2 * step, last=True)
        assert len(first) == 1, first
        assert len(last) == 1, (last, "refit" if dm.refits > refits else "no refit")
    assert dm.refits > refits_before  # the measured steps included refits


def _reads_per_micro_batch(tmp_path, n_layer, **settings) -> list[int]:
    trainer = _trainer(tmp_path, model=tiny_gpt2(n_layer=n_layer), **settings)
    for s in range(2):
        _micro_batch(trainer, 2 * s, last=False)
        _micro_batch(trainer, 2 * s + 1, last=True)
    counts = []
    for step in range(2):
        for last in (False, True):
            with count_host_reads() as sites:
                _micro_batch(trainer, 100 + 2 * step + last, last=last)
            counts.append(len(sites))
    return counts


@pytest.mark.parametrize("strategy", ["uniform", "loss_reweighting", "group_dro"])
def test_baselines_read_a_fixed_number_of_times_whatever_the_number_of_parameters(tmp_path, strategy):
    """Their backward's finiteness check is one read for all parameters. It was one per parameter: `uniform`
    read 31 times per micro-batch with this 2-layer GPT-2 and 55 with the 4-layer one; now 3. The
    per-micro-batch baselines compute their weights on the host: a few reads more, the same for both models."""
    small = _reads_per_micro_batch(tmp_path / "small", 2, mixing_strategy=strategy)
    large = _reads_per_micro_batch(tmp_path / "large", 4, mixing_strategy=strategy)
    assert small == large and len(set(small)) == 1, (small, large)
    if strategy == "uniform":
        assert small[0] == 3, small
    assert small[0] <= 10, small


def test_the_counter_sees_a_read():
    """The patch counts calls from hf_dograph's code (and only those): a test that can fail."""
    from hf_dograph import step_record

    acc = step_record.StepAccumulator()
    with count_host_reads() as sites:
        torch.ones(2).sum().item()  # this test's own read: not the package's
        acc.add_finite(torch.tensor(True))  # bool() inside hf_dograph
    assert len(sites) == 1 and "step_record" in sites[0]
