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

Patching Python methods cannot see reads made inside C++ (`x[i]` with a 0-dim index tensor, `F.one_hot`'s
range check) nor ops whose output size depends on the data (boolean-mask selection, `nonzero`): a dispatch-level
audit (`_SyncOps`) records those issued by hf_dograph's code, and there are none in a step. Copies from the host
to the device wait too: the factored engine and the domain model run on the `meta` device to show that their
steps make none after the first.

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
from torch.utils._python_dispatch import TorchDispatchMode

from hf_dograph import DoGraphConfig, DoGraphTrainer

from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2

METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
# Ops that make a GPU wait whoever calls them, also from inside C++ (where patching Python methods cannot see
# them): a scalar read (`x[i]` with a 0-dim index tensor, `F.one_hot`'s range check), and ops whose output size
# depends on the data (boolean-mask selection, `nonzero`, `unique`, ...).
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
            "unique_dim", "unique_consecutive", "bincount", "repeat_interleave", "equal"}


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


class _SyncOps(TorchDispatchMode):
    """Records the sync-making ops (SYNC_OPS, and indexing with a boolean mask) issued by hf_dograph's code: the
    innermost Python frame outside torch decides who issued an op."""

    def __init__(self, package: str = "hf_dograph"):
        super().__init__()
        self.package = package
        self.sites: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        flagged = name in SYNC_OPS
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
            masks = [t for t in (args[1] or []) if isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)]
            value = args[2] if len(args) > 2 else None
            # x[mask] = scalar becomes masked_fill_ (no read); x[mask] and x[mask] = tensor select on the host
            scalar = isinstance(value, torch.Tensor) and value.dim() == 0 and value.device.type == "cpu"
            flagged = bool(masks) and not (name != "index" and scalar)
        if flagged:
            frame = sys._getframe(1)
            while frame is not None and (frame.f_globals.get("__name__", "").startswith("torch")
                                         or frame.f_code is _SyncOps.__torch_dispatch__.__code__):
                frame = frame.f_back
            module = frame.f_globals.get("__name__", "") if frame is not None else ""
            if module.startswith(self.package):
                self.sites.append(f"{module}:{frame.f_lineno} {name}")
        return func(*args, **(kwargs or {}))


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


def test_no_hidden_sync_in_a_step_refits_included(tmp_path, monkeypatch):
    """What patching Python methods cannot see: reads made inside C++ (`x[row]` with a 0-dim index tensor reads
    `row`; `F.one_hot` checks its range on the CPU) and ops whose output size depends on the data (`w[w > 0]`,
    `nonzero`). hf_dograph's own code issues none in a DoGraph step, refits included, on the device's code path.
    Conservative: an op that reads only on the CPU counts too. (Before: `F.one_hot` in every Lloyd iteration and
    in the domain statistics, `x[row]` in the re-seeding, `w[w > 0]` in the weight entropy, `z[~finite] = 0`.)"""
    import hf_dograph.kmeans as km

    monkeypatch.setattr(km, "_stops_early", lambda x, stop_early: False)  # the device's code path
    trainer = _trainer(tmp_path)
    dm = trainer.dograph_strategy.model
    _micro_batch(trainer, 0, last=False)  # the first micro-batch checks the loss split and the exact sums, once
    with _SyncOps() as audit:  # then: the first fit (end of this step), weighted steps, refits
        _micro_batch(trainer, 1, last=True)
        for step in range(1, 8):
            _micro_batch(trainer, 2 * step, last=False)
            _micro_batch(trainer, 2 * step + 1, last=True)
    assert dm.active and dm.refits >= 3
    assert audit.sites == [], audit.sites


def test_the_sync_audit_sees_hidden_reads():
    """The audit is a test that can fail: a 0-dim index, a boolean mask and F.one_hot, issued from hf_dograph's
    code, are seen; the same from this test's own code are not."""
    from hf_dograph import kmeans

    x, row = torch.randn(5, 3), torch.tensor(2)
    with _SyncOps() as audit:
        x[row]
        x[x[:, 0] > 0]
        torch.nn.functional.one_hot(torch.tensor([0, 1]), 2)
    assert audit.sites == []
    with _SyncOps(package="test_host_transfers") as audit:
        x[row]
        x[x[:, 0] > 0]
        x[x[:, 0] > 0] = 0.0  # a scalar through a mask: masked_fill, no read
    assert [s.split()[-1] for s in audit.sites] == ["_local_scalar_dense", "index"], audit.sites
    with _SyncOps() as audit:
        kmeans.nearest(x, x[:2])  # no read
    assert audit.sites == []


class _HostToDevice(TorchDispatchMode):
    """Records every op with a host tensor input (not a 0-dim scalar) and a `meta` output: on a real device,
    a copy that waits for it."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        host_in = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" and a.dim() > 0 for a in args)
        if host_in and any(isinstance(o, torch.Tensor) and o.device.type == "meta" for o in outs):
            self.copies.append(str(func))
        return out


def test_the_domain_model_copies_nothing_to_its_device_per_step():
    """A blocking host→device copy (`cpu_tensor.to(device)`, `torch.tensor(..., device=...)`) waits for the
    device too. The domain model runs here on the `meta` device (shapes only), where every copy from the host
    is an op with a CPU input and a meta output: after its first step there (which makes the canonical order's
    direction once) its steps and refits make none. (Before: that direction and the window's row indices were
    made on the host every step, and the re-seeding's cluster index at every empty cluster.)"""
    from hf_dograph.config import DoGraphSettings
    from hf_dograph.domain_model import PersistentDomains

    settings = DoGraphSettings(num_domains=3, projection_dim=16, domain_window=64, domain_warmup_samples=32,
                               domain_refit_steps=2)
    dm = PersistentDomains(settings)
    g = torch.Generator().manual_seed(0)

    def batch(device):
        rows = (torch.randn(8, 16, generator=g), torch.rand(8, generator=g), torch.full((8,), 5.0), torch.ones(8))
        return [t.to(device) for t in rows]

    for _ in range(6):
        dm.observe(*batch("cpu"))
        dm.end_step()
    meta, tensors = dm.state_dict()
    dm.load_state_dict(meta, tensors, device="meta")
    batches = [batch("meta") for _ in range(5)]
    dm.observe(*batches[0])
    dm.end_step()

    refits = dm.refits
    with _HostToDevice() as audit:
        for b in batches[1:]:
            dm.sample_weights(b[0])
            dm.observe(*b)
            dm.end_step()
    assert dm.refits > refits  # refits ran on the meta device too
    assert audit.copies == [], audit.copies


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_factored_engine_copies_nothing_to_its_device_after_its_first_step(arch, monkeypatch):
    """The factored engine on a model on the `meta` device: forward, backward, sketch and weighted gradient. Its
    first micro-batch makes the projections and the CountSketch's hash on the device, once; after that no op
    takes a host tensor to the device. (The first-step checks that read values are skipped: meta has none.)"""
    import torch.nn.functional as F

    import hf_dograph.sketch.layers.base as layers_base
    from hf_dograph.sketch.factored import FactoredEngine
    from tiny_models import tiny_llama

    real = layers_base.gaussian_matrix
    # meta has no random generator: draw on the host and copy (once per device, like any first step)
    monkeypatch.setattr(layers_base, "gaussian_matrix", lambda *a, device="cpu", **k: real(*a, **k).to(device))
    model = (tiny_gpt2 if arch == "gpt2" else tiny_llama)()
    model.to_empty(device="meta")
    engine = FactoredEngine(model, projection_dim=64, seed=0)
    engine._validated = engine._buffers.done = True  # the first-step checks compare values

    ids = torch.empty(4, 12, dtype=torch.long, device="meta")
    positions = torch.arange(12, device="meta").expand(4, -1)

    def micro_batch():
        with engine.capturing():
            logits = model(input_ids=ids, position_ids=positions).logits
            losses = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(4, -1).mean(1)
            engine.backward(losses)
        assert engine.sketches().device.type == "meta"
        engine.accumulate_weighted_gradient(torch.full((4,), 0.25, device="meta"), nonfinite_left_out=False)
        engine.clear()

    with _HostToDevice() as first:
        micro_batch()
    assert first.copies  # the projections and the hash: the check sees copies
    with _HostToDevice() as later:
        micro_batch()
        micro_batch()
    assert later.copies == [], later.copies


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
