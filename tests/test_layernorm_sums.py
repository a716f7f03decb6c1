"""LayerNorm's per-sample gradients are summed in the backward (`LayerNormHandler._delta_arrived`).

g_s(w) = Σ_{t∈s} δ_t ⊙ x̂_t and g_s(b) = Σ_{t∈s} δ_t are taken as soon as the layer's δ arrives, so the
engine keeps two (S, hidden) sums per call instead of δ and x. Checked: the records hold the sums only, they
equal autograd's per-sample gradients (one backward per sample; rows and packed segments), and a LayerNorm
whose tensors are not token-aligned with packed samples still gets the error that names it.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_dograph.sketch import SampleLayout, UnsupportedLayerError
from hf_dograph.sketch.factored import FactoredEngine
from hf_dograph.sketch.layers.norm import LayerNormHandler

from helpers_engines import packed_batch, packed_losses, random_sequences
from helpers_models import VOCAB, gpt2, lm_batch, per_sample_losses


def _rows():
    batch = lm_batch()
    return (lambda model: per_sample_losses(model, batch)), SampleLayout.rows(batch["input_ids"].shape[0])


def _packed():
    seqs = random_sequences([6, 4, 8, 7, 9], seed=5)
    packed = packed_batch([seqs[:3], seqs[3:]], pad_to=20)
    return packed_losses(packed), SampleLayout.segments(packed["segment_ids"])


@pytest.mark.parametrize("make", [_rows, _packed], ids=["rows", "packed"])
def test_layernorm_keeps_per_sample_sums_equal_to_autograd(make):
    losses_fn, layout = make()
    model = gpt2()
    eng = FactoredEngine(model, projection_dim=64, seed=0)
    with eng.capturing():
        eng.backward(losses_fn(model), layout)
    norms = [h for h in eng.handlers if isinstance(h, LayerNormHandler)]
    assert len(norms) == 5
    for h in norms:
        [rec] = h.done_records()
        assert set(rec.tensors) == {"sums"}, set(rec.tensors)  # neither δ nor x is kept

    reference = gpt2()
    for s in range(layout.num_samples):
        reference.zero_grad(set_to_none=True)
        losses_fn(reference)[s].backward()
        modules = dict(reference.named_modules())
        for h in norms:
            sums = h.done_records()[0].tensors["sums"]
            for name in ("weight", "bias"):
                want = getattr(modules[h.name], name).grad
                got = sums[name][s]
                err = float((got - want).norm() / (want.norm() + 1e-12))
                assert err < 1e-5, (h.name, name, s, err)
    eng.clear()


class _PooledNorm(nn.Module):
    """Embeds tokens, averages each row, normalizes the (B, hidden) average: not token by token."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 1)

    def forward(self, ids):
        return self.head(self.norm(self.emb(ids).mean(dim=1))).squeeze(-1)


def test_layernorm_not_token_aligned_with_packed_samples_is_named_after_the_backward():
    torch.manual_seed(0)
    model = _PooledNorm()
    ids = torch.randint(0, VOCAB, (2, 6))
    layout = SampleLayout.segments(torch.tensor([[0, 0, 0, 1, 1, 1], [2, 2, 2, 2, 2, -1]]))
    eng = FactoredEngine(model, projection_dim=16, seed=0)
    with eng.capturing(), pytest.raises(UnsupportedLayerError, match=r"norm \(LayerNorm\).*not token-aligned"):
        out = model(ids)
        eng.backward(torch.stack([out[0], out[0] * 2, out[1]]), layout)
