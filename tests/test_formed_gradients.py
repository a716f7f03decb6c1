"""Linear layers that form per-sample weight gradients (`LinearHandler.forms_per_sample`).

A narrow layer over long samples forms G_s = Σ_{t∈s} δ_t a_tᵀ in one batched matmul and takes its sketch
(P_r G_s P_cᵀ) and its share of the weighted gradient (Σ_s c_s G_s) from it; a wide one sketches from the
tokens' projections and forms δᵀ(c ⊙ a) later. The choice is made per micro-batch on cost alone, so it must
change nothing but float rounding. Checked here with each path forced, against each other and autograd:

1. sketches equal (1e-5 relative) and weighted gradients equal to autograd's ∇ Σ α_s ℓ_s (1e-5), on GPT-2
   (Conv1D, tied head) and LLaMA (Linear), rows and packed segments, with a left-out sample and a scale;
2. a left-out sample holding NaN contributes exact zeros on the formed path;
3. bf16 autocast: no less accurate than autograd's own bf16 gradient;
4. the rule: forms exactly when rows·cols ≤ form_below · T·(rows + cols) (default 1/2; 0 never, inf always);
5. G is formed in the backward: δ and a are not kept, and the engine holds less than on the token path.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hf_dograph.sketch import SampleLayout
from hf_dograph.sketch.factored import FactoredEngine
from hf_dograph.sketch.layers.linear import LinearHandler

from helpers_engines import assert_grads_close, autograd_grads, packed_batch, packed_losses, random_sequences
from helpers_engines import run_engine
from helpers_models import gpt2, llama, lm_batch, per_sample_losses, relative_error, trainable
from helpers_models import nan_first_sample_after_first_block, weighted_autograd_gradient


ALWAYS, NEVER = float("inf"), 0.0  # form_below settings that force each path


@pytest.fixture
def formed_sums(monkeypatch):
    """Counts the weighted sums taken from formed per-sample gradients (to see which path really ran)."""
    formed = {"calls": 0}
    original = LinearHandler._accumulate_formed

    def counting(self, *a, **k):
        formed["calls"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(LinearHandler, "_accumulate_formed", counting)
    return formed


def _rows_losses(batch):
    return lambda model: per_sample_losses(model, batch)


def _packed():
    seqs = random_sequences([7, 5, 9, 6, 8], seed=3)
    packed = packed_batch([seqs[:3], seqs[3:]], pad_to=22)  # the second row ends in a padding run (no sample)
    return packed_losses(packed), SampleLayout.segments(packed["segment_ids"])


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
@pytest.mark.parametrize("layout_name", ["rows", "packed"])
def test_formed_and_token_paths_give_the_same_sketch_and_gradient(formed_sums, model_name, layout_name):
    # widths 64 and up: every weight has both axes projected (f = 32), the sketch's two orders both run
    build = {"gpt2": lambda: gpt2(n_embd=64), "llama": lambda: llama(hidden=64, intermediate=128)}[model_name]
    if layout_name == "rows":
        losses, layout = _rows_losses(lm_batch()), None
        s = 8
    else:
        losses, layout = _packed()
        s = layout.num_samples
    alpha = torch.linspace(0.05, 0.3, s, dtype=torch.float64)
    alpha[1] = 0.0  # a left-out sample
    runs = {}
    for formed in (True, False):
        formed_sums["calls"] = 0
        runs[formed] = run_engine("factored", build(), losses, alpha, layout=layout, scale=0.5,
                                  form_below=ALWAYS if formed else NEVER)
        assert (formed_sums["calls"] > 0) == formed  # the forced path is the one that ran
    expected = {n: 0.5 * g for n, g in autograd_grads(build(), losses, alpha).items()}
    for formed, run in runs.items():
        err = assert_grads_close(run.grads, expected)
        print(f"{model_name} {layout_name} formed={formed}: weighted gradient vs autograd {err:.1e}")
    z_err = float((runs[True].sketches - runs[False].sketches).norm() / runs[False].sketches.norm())
    print(f"{model_name} {layout_name}: formed vs token-path sketches, relative difference {z_err:.1e}")
    assert z_err < 1e-5, z_err
    assert runs[True].finite.all() and runs[False].finite.all()


def test_left_out_nan_sample_contributes_zeros_on_the_formed_path(formed_sums):
    model = gpt2()
    clean = copy.deepcopy(model)
    nan_first_sample_after_first_block(model)
    batch = lm_batch()
    eng = FactoredEngine(model, projection_dim=64, seed=0, form_below=ALWAYS)
    with eng.capturing():
        eng.backward(per_sample_losses(model, batch))
    assert eng.finite_samples().tolist() == [False] + [True] * 7
    alpha = torch.full((8,), 1 / 7, dtype=torch.float64)
    alpha[0] = 0
    eng.accumulate_weighted_gradient(alpha)
    assert formed_sums["calls"] > 0
    applied = {n: p.grad.detach().clone() for n, p in trainable(model)}
    assert all(torch.isfinite(g).all() for g in applied.values())
    assert_grads_close(applied, weighted_autograd_gradient(clean, batch, alpha))


def test_formed_path_under_bf16_autocast_is_as_accurate_as_plain_autocast(formed_sums):
    batch = lm_batch()
    alpha = torch.linspace(0.05, 0.2, 8, dtype=torch.float64)
    exact = weighted_autograd_gradient(gpt2(), batch, alpha)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_bf16 = weighted_autograd_gradient(gpt2(), batch, alpha)
        ours = run_engine("factored", gpt2(), _rows_losses(batch), alpha, form_below=ALWAYS).grads
    assert formed_sums["calls"] > 0
    assert all(g.dtype == torch.float32 for g in ours.values())
    err_plain, err_ours = relative_error(plain_bf16, exact), relative_error(ours, exact)
    print(f"bf16: formed path {err_ours:.2e}, autograd's own {err_plain:.2e}")
    assert err_ours < 2 * err_plain + 1e-3, (err_ours, err_plain)


@pytest.mark.parametrize("out_features,in_features,tokens,forms", [
    (64, 64, 128, True),      # GPT-2 2×64 at T = 128: 2 · 4096 ≤ 128 · 128
    (256, 64, 128, True),     # its MLP: 32768 ≤ 40960
    (64, 64, 16, False),      # the same layer on short samples: 8192 > 2048
    (64, 64, 64, True),       # the boundary: 8192 = 64 · 128
    (64, 64, 63, False),
    (768, 768, 512, False),   # GPT-2 small at T = 512: 1.18M > 786k
    (768, 768, 1024, True),   # ... at T = 1024
])
def test_forms_exactly_when_the_gradient_is_at_most_half_the_tokens_features(out_features, in_features, tokens,
                                                                            forms):
    def handler(**engine_kw):
        model = nn.Sequential(nn.Linear(in_features, out_features))
        return next(h for h in FactoredEngine(model, projection_dim=16, seed=0, **engine_kw).handlers
                    if isinstance(h, LinearHandler))

    assert handler().forms_per_sample(tokens) is forms  # the default, form_below = 1/2
    assert handler(form_below=ALWAYS).forms_per_sample(tokens)
    assert not handler(form_below=NEVER).forms_per_sample(tokens)


@pytest.mark.parametrize("bad", [-1, "half", True, float("nan")])
def test_form_below_must_be_a_number_at_least_zero(bad):
    with pytest.raises(ValueError, match="form_below"):
        FactoredEngine(nn.Sequential(nn.Linear(4, 4)), projection_dim=4, seed=0, form_below=bad)


def _kept_after_backward(engine_kw: dict, batch: dict) -> tuple[list[set], int]:
    """What the linear layers' records hold between the backward and the weighted gradient: their keys, and
    the bytes of all they hold."""
    model = gpt2()
    eng = FactoredEngine(model, projection_dim=64, seed=0, **engine_kw)
    with eng.capturing():
        eng.backward(per_sample_losses(model, batch))
    records = [r for h in eng.handlers if isinstance(h, LinearHandler) for r in h.done_records()]
    keys = [set(r.tensors) for r in records]
    held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for r in records
            for t in r.tensors.values() if t is not None}
    eng.clear()
    return keys, sum(held.values())


def test_formed_gradients_replace_delta_and_input_from_the_backward_on():
    """Long enough samples (T = 64 for the width-32 GPT-2): with the default form_below every linear layer
    forms G in the backward, keeps neither δ nor a, and the engine holds less than on the token path."""
    batch = lm_batch(seq=64)
    formed_keys, formed_bytes = _kept_after_backward({}, batch)
    token_keys, token_bytes = _kept_after_backward({"form_below": NEVER}, batch)
    assert formed_keys and all(k == {"per_sample", "bias"} for k in formed_keys), formed_keys
    assert all(k == {"delta", "input"} for k in token_keys), token_keys
    print(f"kept by the linear layers: formed {formed_bytes / 2**10:.0f} KiB, token path {token_bytes / 2**10:.0f} KiB")
    assert formed_bytes < 0.8 * token_bytes
