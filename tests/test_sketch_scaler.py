"""fp16 with a GradScaler: engines take scaled losses, and non-finite gradients reach `.grad` when the trainer
keeps their samples (α ≠ 0), so that the scaler sees the overflow and skips the step as the plain Trainer does.

* scaled losses: sketches and weighted gradient scale with the loss scale S (1e-6 relative);
* a sample whose gradient overflows in the backward (finite loss): α ≠ 0 → inf/NaN in `.grad` (both engines),
  α = 0 → left out exactly;
* `LossOnlyEngine(keep_nonfinite=True)` accumulates non-finite gradients (and losses) as they are; the
  default still drops the micro-batch;
* end to end with `torch.amp.GradScaler`: unscaled gradient = autograd's; an overflowing step is skipped.
"""

from __future__ import annotations

import copy

import pytest
import torch

from hf_dograph.sketch import ENGINES, LossOnlyEngine

from helpers_engines import autograd_grads
from helpers_models import gpt2, lm_batch, per_sample_losses, relative_error, trainable

ALPHA = torch.linspace(0.05, 0.2, 8, dtype=torch.float64)
S = 2.0 ** 12


class _InfGradOfSample0(torch.autograd.Function):
    """Identity forward; the backward gives sample 0 an infinite gradient (an fp16-style overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.clone()
        g[0] = float("inf")
        return g


def _overflowing_gpt2():
    model = gpt2()

    def hook(module, inputs, output):
        if isinstance(output, tuple):
            return (_InfGradOfSample0.apply(output[0]),) + tuple(output[1:])
        return _InfGradOfSample0.apply(output)

    model.transformer.h[0].register_forward_hook(hook)
    return model


def _capture(engine_name, model, batch, loss_scale=1.0):
    eng = ENGINES[engine_name](model, projection_dim=64, seed=0)
    eng.attach()
    with eng.capturing():
        eng.backward(per_sample_losses(model, batch) * loss_scale)
    return eng


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in trainable(model)}


@pytest.mark.parametrize("engine", ["factored", "opacus"])
def test_scaled_losses_scale_sketches_and_gradient(engine):
    batch = lm_batch()
    plain = _capture(engine, gpt2(), batch)
    z, ok = plain.sketches().clone(), plain.finite_samples().clone()
    plain.accumulate_weighted_gradient(ALPHA)
    g = _grads(plain.model)
    scaled = _capture(engine, gpt2(), batch, loss_scale=S)
    zs = scaled.sketches()
    assert torch.equal(scaled.finite_samples(), ok)
    assert float((zs / S - z).norm() / z.norm()) < 1e-6
    scaled.accumulate_weighted_gradient(ALPHA, scale=1.0 / S)  # the trainer's unscale could also happen later
    assert relative_error(_grads(scaled.model), g) < 1e-6


@pytest.mark.parametrize("engine", ["factored", "opacus"])
def test_overflowing_sample_reaches_grad_when_kept_and_is_left_out_otherwise(engine):
    batch = lm_batch()
    eng = _capture(engine, _overflowing_gpt2(), batch, loss_scale=S)
    assert eng.finite_samples().tolist() == [False] + [True] * 7
    z = eng.sketches()
    assert torch.isfinite(z).all() and (z[0] == 0).all()
    eng.accumulate_weighted_gradient(ALPHA)  # α_0 ≠ 0: what a trainer with an active scaler passes
    assert not all(torch.isfinite(p.grad).all() for _, p in trainable(eng.model))
    # α_0 = 0: the overflow is left out exactly
    eng.model.zero_grad(set_to_none=True)
    alpha = ALPHA.clone()
    alpha[0] = 0
    eng.accumulate_weighted_gradient(alpha)
    got = {n: g / S for n, g in _grads(eng.model).items()}
    assert relative_error(got, autograd_grads(gpt2(), lambda m: per_sample_losses(m, batch), alpha)) < 1e-5


def test_loss_only_engine_keeps_nonfinite_gradients_when_asked():
    batch = lm_batch()
    # default: the overflowing micro-batch is dropped, .grad keeps what was accumulated before
    model = _overflowing_gpt2()
    eng = LossOnlyEngine(model)
    eng.backward(per_sample_losses(model, batch))
    eng.accumulate_weighted_gradient(ALPHA)
    assert eng.samples_dropped_after_weighting() == 8
    assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for _, p in trainable(model))

    # keep_nonfinite=True: accumulated as it is (inf/NaN in .grad), nothing counted as dropped
    model = _overflowing_gpt2()
    eng = LossOnlyEngine(model, keep_nonfinite=True)
    eng.backward(per_sample_losses(model, batch))
    eng.accumulate_weighted_gradient(ALPHA)
    assert eng.samples_dropped_after_weighting() == 0
    assert not all(torch.isfinite(p.grad).all() for _, p in trainable(model))

    # a non-finite loss is back-propagated too instead of being an error
    model = gpt2()
    eng = LossOnlyEngine(model)
    eng.keep_nonfinite = True  # also an attribute
    losses = per_sample_losses(model, batch)
    eng.backward(torch.cat([losses[:1] * float("nan"), losses[1:]]))
    eng.accumulate_weighted_gradient(ALPHA)
    assert not all(torch.isfinite(p.grad).all() for _, p in trainable(model))
    with pytest.raises(ValueError, match="keep_nonfinite"):
        LossOnlyEngine(gpt2(), keep_nonfinite="yes")

    # finite gradients: the switch changes nothing
    for keep in (False, True):
        model = gpt2()
        eng = LossOnlyEngine(model, keep_nonfinite=keep)
        eng.backward(per_sample_losses(model, batch))
        eng.accumulate_weighted_gradient(ALPHA)
        expected = autograd_grads(gpt2(), lambda m: per_sample_losses(m, batch), ALPHA)
        assert relative_error(_grads(model), expected) < 1e-6


@pytest.mark.parametrize("engine", ["factored", "opacus", "loss-only"])
def test_with_a_grad_scaler(engine):
    """scaler.scale(losses) → engine → scaler.step: the applied update is the unscaled weighted gradient's; an
    overflowing micro-batch makes the scaler skip the step and lower its scale."""
    batch = lm_batch()
    for overflow in (False, True):
        model = _overflowing_gpt2() if overflow else gpt2()
        before = copy.deepcopy(model.state_dict())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=S)
        eng = (LossOnlyEngine(model, keep_nonfinite=True) if engine == "loss-only"
               else ENGINES[engine](model, projection_dim=64, seed=0))
        eng.attach()
        with eng.capturing():
            eng.backward(scaler.scale(per_sample_losses(model, batch)))
        eng.accumulate_weighted_gradient(ALPHA)
        scaler.unscale_(opt)
        if not overflow:
            expected = autograd_grads(gpt2(), lambda m: per_sample_losses(m, batch), ALPHA)
            assert relative_error(_grads(model), expected) < 1e-5
        scaler.step(opt)
        scaler.update()
        moved = any(not torch.equal(p, before[n]) for n, p in model.state_dict().items())
        assert moved != overflow
        assert (scaler.get_scale() < S) == overflow
        eng.detach()
