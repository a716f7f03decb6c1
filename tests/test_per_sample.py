"""Opacus reference engine: per-sample gradients equal a one-sample-at-a-time loop, every parameter."""

from __future__ import annotations

import pytest
import torch

from hf_dograph.losses import causal_lm_per_sample_loss
from hf_dograph.sketch.opacus_engine import OpacusEngine

from tiny_models import MODEL_BUILDERS, make_batch


def forward_losses(model, batch):
    ids = batch["input_ids"]
    b, t = ids.shape
    out = model(input_ids=ids, attention_mask=batch["attention_mask"], position_ids=torch.arange(t).expand(b, t))
    return causal_lm_per_sample_loss(out.logits, batch["labels"])[0]


@pytest.mark.parametrize("model_name", list(MODEL_BUILDERS))
def test_per_sample_gradients_match_one_sample_loop(model_name):
    model = MODEL_BUILDERS[model_name]()
    batch = make_batch(batch=6)
    engine = OpacusEngine(model, projection_dim=16, seed=0)
    with engine.capturing():
        losses = forward_losses(model, batch)
        engine.backward(losses)
    per_sample = engine.per_sample_gradients()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(per_sample) == set(names)
    if model_name == "gpt2":  # the position embedding and the tied wte/lm_head are covered
        assert {"transformer.wpe.weight", "transformer.wte.weight"} <= set(names)
    assert all(p.grad is None for p in model.parameters())  # the engine leaves .grad alone

    for i in range(6):
        model.zero_grad(set_to_none=True)
        one = {k: v[i : i + 1] for k, v in batch.items()}
        forward_losses(model, one).sum().backward()
        for n, p in model.named_parameters():
            if not p.requires_grad:
                continue
            scale = p.grad.abs().max().clamp(min=1e-6)
            err = (per_sample[n][i] - p.grad).abs().max() / scale
            assert err < 1e-5, (n, i, float(err))
    engine.detach()


def test_sketches_are_projections_of_the_per_sample_gradients():
    model = MODEL_BUILDERS["gpt2"]()
    engine = OpacusEngine(model, projection_dim=2048, seed=3)
    with engine.capturing():
        engine.backward(forward_losses(model, make_batch()))
    g = torch.cat([v.flatten(1) for v in engine.per_sample_gradients().values()], dim=1).double()
    z = engine.sketches().double()
    gram_true, gram_sketch = g @ g.T, z @ z.T
    # JL: inner products are preserved up to ε·‖g_i‖‖g_j‖, ε ≈ 3·sqrt(2/k) ≈ 0.094 at k = 2048.
    norms = g.norm(dim=1)
    assert ((gram_sketch - gram_true).abs() / torch.outer(norms, norms)).max() < 0.1


def test_padding_row_of_an_embedding_gets_no_per_sample_gradient():
    """As autograd: nn.Embedding(padding_idx=...) never gives its padding row a gradient."""
    from tiny_models import tiny_llama

    model = tiny_llama()  # pad_token_id = 0 → embed_tokens.padding_idx = 0
    assert model.model.embed_tokens.padding_idx == 0
    batch = make_batch(batch=4)
    batch["input_ids"][:, -2:] = 0  # padding tokens in the input
    engine = OpacusEngine(model, projection_dim=16, seed=0)
    with engine.capturing():
        engine.backward(forward_losses(model, batch))
    gs = engine.per_sample_gradients()["model.embed_tokens.weight"]
    model.zero_grad(set_to_none=True)
    forward_losses(model, batch).sum().backward()
    assert (gs[:, 0] == 0).all()
    assert torch.allclose(gs.sum(0), model.model.embed_tokens.weight.grad, rtol=1e-5, atol=1e-6)
    engine.detach()
