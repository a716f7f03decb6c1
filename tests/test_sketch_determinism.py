"""Bit-reproducibility on CPU: the same batch gives bit-identical sketches and weighted gradients, idle or with
both cores busy (another process spinning), and nothing in the engines follows the machine's load."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from hf_dograph.sketch.factored import FactoredEngine

from helpers_engines import run_engine
from helpers_models import gpt2, lm_batch, per_sample_losses

_SPIN = "import os\nos.nice(5)\nwhile True:\n    pass\n"


def _losses(batch):
    def losses(model):
        return per_sample_losses(model, batch)
    return losses


def _runs(engine, build, batch, alpha, count):
    k = 128 if engine == "factored" else 32  # the reference engine generates a k × d Gaussian every step
    return [run_engine(engine, build(), _losses(batch), alpha, projection_dim=k) for _ in range(count)]


def _assert_identical(a, b):
    assert torch.equal(a.sketches, b.sketches)
    assert a.grads.keys() == b.grads.keys()
    for n in a.grads:
        assert torch.equal(a.grads[n], b.grads[n]), n


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(max(2, old))  # races between threads are what is being tested
    yield
    torch.set_num_threads(old)


def _gpt2():
    return gpt2(n_embd=128, n_layer=1, n_positions=256)


@pytest.mark.parametrize("engine", ["factored", "opacus"])
def test_same_batch_same_bits_idle_and_under_load(engine, two_threads):
    # Many repeated token ids (vocabulary 61, 16 × 256 tokens, 128 wide: the size where torch's CPU
    # index_put_(accumulate=True) goes multithreaded with atomic adds): concurrent accumulation into the same
    # embedding rows is where sums would be reordered. (Checked: with index_put_ this test fails.)
    # (The reference engine's per-sample gradients are B × d numbers: a smaller batch keeps it quick.)
    b, t = (16, 256) if engine == "factored" else (8, 128)
    batch = lm_batch(batch=b, seq=t)
    alpha = torch.linspace(0.01, 0.1, b, dtype=torch.float64)
    models = [_gpt2]
    idle = {m.__name__: _runs(engine, m, batch, alpha, 2) for m in models}
    spinners = [subprocess.Popen([sys.executable, "-c", _SPIN]) for _ in range(os.cpu_count() or 2)]
    try:
        time.sleep(0.5)
        busy = {m.__name__: _runs(engine, m, batch, alpha, 2) for m in models}
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    for name in idle:
        for run in idle[name][1:] + busy[name]:
            _assert_identical(idle[name][0], run)


def test_nothing_reads_the_load_average(monkeypatch):
    """The engines never look at the machine's load (the former "auto" thread switch read os.getloadavg every
    step, so results depended on what else ran)."""
    def forbidden():
        raise AssertionError("os.getloadavg was called")

    monkeypatch.setattr(os, "getloadavg", forbidden)
    batch = lm_batch()
    alpha = torch.linspace(0.05, 0.2, 8, dtype=torch.float64)
    for engine in ("factored", "opacus"):
        run_engine(engine, gpt2(), _losses(batch), alpha)


def test_thread_setting_is_fixed_or_refused():
    model = gpt2()
    with pytest.raises(ValueError, match="cpu_sketch_threads='auto'.*load"):
        FactoredEngine(model, projection_dim=8, seed=0, cpu_sketch_threads="auto")
    with pytest.raises(ValueError, match="cpu_sketch_threads=0"):
        FactoredEngine(model, projection_dim=8, seed=0, cpu_sketch_threads=0)
    # a fixed single-threaded sketch is reproducible too, and as exact
    batch = lm_batch()
    alpha = torch.linspace(0.05, 0.2, 8, dtype=torch.float64)
    one = [run_engine("factored", gpt2(), _losses(batch), alpha, cpu_sketch_threads=1) for _ in range(2)]
    _assert_identical(one[0], one[1])
    default = run_engine("factored", gpt2(), _losses(batch), alpha)
    for n in default.grads:
        assert torch.allclose(one[0].grads[n], default.grads[n], rtol=1e-5, atol=1e-7), n
