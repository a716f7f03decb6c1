"""Host work of a DoGraph step that grows with the model: no conversion that changes nothing, per layer.

`t.float()`, `t.to(dtype)`, `t.reshape(shape)` on a tensor that already has that dtype or shape return it (or a
view of it) but still cost a dispatch on the host (~1.5 µs each on a CPU); the engine used to make ~1,300 of them
per step on GPT-2 small's 12 blocks, ~17 per recorded layer (BENCHMARKS.md, "Host work per step"). On a GPU such
host time is what the device waits for when a step is host-bound. `hf_dograph.tensors` converts only
where something changes; this test keeps it so: the no-op conversions issued by hf_dograph's code in a step must
not grow with the number of layers.
"""

from __future__ import annotations

import sys

import torch
from datasets import Dataset
from torch.overrides import TorchFunctionMode

from hf_dograph import DoGraphConfig, DoGraphTrainer
from hf_dograph.tensors import as_device, as_dtype, as_float, as_rows

from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2

CONVERSIONS = {"to", "float", "double", "half", "bfloat16", "type", "reshape", "view", "view_as", "reshape_as",
               "contiguous", "flatten"}


class NoOpConversions(TorchFunctionMode):
    """Records `file:line name` of each conversion called directly from hf_dograph's code whose result is its input
    unchanged: the same tensor, or a view of it with the same shape, strides and dtype."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__name__", "")
        if name in CONVERSIONS and args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor):
            src = args[0]
            unchanged = out is src or (out.data_ptr() == src.data_ptr() and out.shape == src.shape
                                       and out.stride() == src.stride() and out.dtype == src.dtype
                                       and out.device == src.device)
            frame = sys._getframe(1)
            module = frame.f_globals.get("__name__", "")
            if unchanged and module.startswith("hf_dograph"):
                self.sites.append(f"{module}:{frame.f_lineno} {name}")
        return out


def _noop_conversions_per_step(tmp_path, n_layer: int) -> list[int]:
    args = DoGraphConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, use_cpu=True, report_to=[],
                         save_strategy="no", disable_tqdm=True, num_domains=3, projection_dim=64,
                         domain_warmup_samples=8, domain_refit_steps=2)
    trainer = DoGraphTrainer(model=tiny_gpt2(n_layer=n_layer), args=args, data_collator=stack_collator,
                             train_dataset=Dataset.from_list(rows_from_batch(make_batch())))
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    counts = []
    for step in range(4):  # warm-up, first fit, weighted steps, a refit
        mode = NoOpConversions()
        with mode:
            trainer.training_step(trainer.model, make_batch(seed=step))
        trainer.state.global_step += 1
        trainer.model.zero_grad(set_to_none=True)
        counts.append(len(mode.sites))
    assert trainer.dograph_strategy.model.active  # the measured steps include weighted ones
    return counts


def test_no_op_conversions_do_not_grow_with_the_layers(tmp_path):
    """GPT-2 with 1 and 3 blocks (2 × 6 more recorded layers): the same count, step by step, after the engine's
    first micro-batch (which checks its exact path against autograd once, per parameter). What is left is a
    fixed handful per step (16–19: the trainer's and the domain model's per-step tensors). Before
    `tensors.py` every recorded layer added ~17 (measured on GPT-2 small's graph)."""
    one = _noop_conversions_per_step(tmp_path / "one", 1)[1:]
    three = _noop_conversions_per_step(tmp_path / "three", 3)[1:]
    assert one == three, (one, three)
    assert max(one) <= 25, one


def test_the_counter_sees_a_no_op_conversion_in_the_package():
    """A test that can fail: a `.float()` of a float32 tensor made by hf_dograph's code is counted, one made here
    is not, nor is a conversion that changes the dtype."""
    from hf_dograph.domain_model import PersistentDomains

    class Settings:  # what `observe` reads: nothing
        num_domains, domain_window = 2, 4

    domains = PersistentDomains(Settings())
    mode = NoOpConversions()
    with mode:
        torch.ones(2).float()  # this test's own call
        domains.observe(torch.ones(2, 3), torch.ones(2), torch.ones(2), torch.ones(2))  # float() of float32 there
        as_float(torch.ones(2, dtype=torch.float64))  # a real conversion
    assert mode.sites and all("hf_dograph.domain_model" in s for s in mode.sites), mode.sites


def test_the_conversions_return_their_input_when_nothing_changes():
    x = torch.ones(4, 3)
    assert as_float(x) is x and as_dtype(x, torch.float32) is x and as_rows(x, 4) is x
    assert as_device(x, x.device) is x
    assert as_float(x.double()).dtype == torch.float32
    assert as_dtype(x, torch.bfloat16).dtype == torch.bfloat16
    assert as_rows(x, 2).shape == (2, 6) and as_rows(x.reshape(12), 4).shape == (4, 3)
