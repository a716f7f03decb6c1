"""The factored engine under torch.compile: no graph breaks in the compiled forward, and the same sketches and
exact weighted gradient as in eager mode.

Graph breaks are dynamo's (independent of the backend), so the fast `aot_eager` backend is used here;
`benchmarks/compile_breaks.py` runs inductor and times the steps.
"""

from __future__ import annotations

import pytest
import torch

from hf_dograph.sketch.factored import FactoredEngine

from helpers_engines import assert_grads_close, autograd_grads, run_engine
from helpers_models import gpt2, llama, lm_batch, model_inputs, per_sample_losses
from hf_dograph.losses import causal_lm_per_sample_loss

ALPHA = torch.linspace(0.05, 0.2, 8, dtype=torch.float64)


def _compiled_step(model, batch, alpha, backend="aot_eager"):
    """Two captured steps through torch.compile(model) (the second reuses the compiled code); returns the second
    step's sketches and gradients, and the graph breaks dynamo counted."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend=backend)
    eng = FactoredEngine(model, projection_dim=64, seed=0)
    out = None
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with eng.capturing():
            logits = compiled(**model_inputs(batch)).logits
            eng.backward(causal_lm_per_sample_loss(logits, batch["labels"])[0])
        z = eng.sketches().clone()
        eng.accumulate_weighted_gradient(alpha)
        out = z, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        eng.clear()
    breaks = sum(counters["graph_break"].values())
    torch._dynamo.reset()
    return out[0], out[1], breaks


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_compiled_model_has_no_graph_breaks_and_the_same_results(model_name):
    build = gpt2 if model_name == "gpt2" else llama
    batch = lm_batch()
    if model_name == "llama":
        batch["input_ids"][1, 4] = 0  # padding_idx inside a sequence

    def losses(m):
        return per_sample_losses(m, batch)

    z, grads, breaks = _compiled_step(build(), batch, ALPHA)
    assert breaks == 0
    eager = run_engine("factored", build(), losses, ALPHA)
    assert torch.allclose(z, eager.sketches, rtol=1e-4, atol=1e-6 * float(eager.sketches.abs().max()))
    assert_grads_close(grads, autograd_grads(build(), losses, ALPHA))


def test_eager_forward_after_compiled_capture_is_the_models_own():
    """Outside capture (evaluation) the compiled model runs the layers' own forwards: same logits as uncompiled."""
    model = gpt2()
    batch = lm_batch()
    _compiled_step(model, batch, ALPHA)
    with torch.no_grad():
        ref = model(**model_inputs(batch)).logits
        got = torch.compile(model, backend="aot_eager")(**model_inputs(batch)).logits
    torch._dynamo.reset()
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6)
    assert all("forward" not in m.__dict__ for m in model.modules())
