"""Samples that are not rows: padding-free packing (`SampleLayout.segments`) in the factored engine.

A packed batch (one row holding several sequences, position_ids restarting at 0, labels -100 at each
sequence's first token, as `DataCollatorWithFlattening` makes it) must give
1. a weighted gradient Σ_s α_s g_s equal to plain autograd of Σ_s α_s ℓ_s (1e-5 relative), and
2. per-segment sketches equal (up to float error) to the sketches of the same sequences laid out one per
   row: the same projection sees the same per-sample gradients — the strongest check.
Plus: the layout's own checks, the refusal of layers that cannot be split by segment, and the reference
engine's refusal.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hf_dograph.losses import causal_lm_per_sample_loss
from hf_dograph.sketch import SampleLayout, UnsupportedLayerError, check_training_setup
from hf_dograph.sketch.layers import generic

from helpers_engines import (
    assert_grads_close,
    autograd_grads,
    packed_batch,
    packed_losses,
    random_sequences,
    rows_batch,
    run_engine,
)
from helpers_models import VOCAB, gpt2, llama


def _row_losses(batch):
    def losses(model):
        b, t = batch["input_ids"].shape
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=torch.arange(t).expand(b, t), use_cache=False)
        return causal_lm_per_sample_loss(out.logits, batch["labels"])[0]
    return losses


LAYOUTS = {
    # one row, four sequences
    "1 row x 4": ([[7, 5, 9, 6]], None),
    # two rows of two and three sequences, the shorter row ending in a padding run (segment id -1)
    "2 rows + padding": ([[6, 8], [5, 4, 7]], 16),
}


def _gemma():
    """Gemma: scaled word embeddings and GemmaRMSNorm (token-wise, on the exact path)."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    return GemmaForCausalLM(GemmaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1))


BUILD = {"gpt2": gpt2, "llama": llama, "gemma": _gemma}


@pytest.mark.parametrize("model_name,layout_name", [(m, lay) for m in ("gpt2", "llama") for lay in LAYOUTS]
                         + [("gemma", "1 row x 4")])
def test_packed_segments_are_samples(model_name, layout_name):
    rows_of_lengths, pad_to = LAYOUTS[layout_name]
    seqs = random_sequences([n for row in rows_of_lengths for n in row])
    it = iter(seqs)
    packed = packed_batch([[next(it) for _ in row] for row in rows_of_lengths], pad_to=pad_to)
    layout = SampleLayout.segments(packed["segment_ids"])
    s = layout.num_samples
    assert s == len(seqs)
    build = BUILD[model_name]
    alpha = torch.linspace(0.05, 0.3, s, dtype=torch.float64)
    alpha[1] = 0.0  # a left-out sample

    run = run_engine("factored", build(), packed_losses(packed), alpha, layout=layout)
    assert run.sketches.shape == (s, 64) and run.finite.all()
    # 1. the exact weighted gradient of the packed batch
    err = assert_grads_close(run.grads, autograd_grads(build(), packed_losses(packed), alpha))
    print(f"{model_name} {layout_name}: weighted gradient vs autograd, relative error {err:.2e}")

    # 2. the same sequences one per row: same sketches, same weighted gradient
    rows = run_engine("factored", build(), _row_losses(rows_batch(seqs)), alpha)
    z_err = float((run.sketches - rows.sketches).norm() / rows.sketches.norm())
    print(f"{model_name} {layout_name}: packed vs row sketches, relative error {z_err:.2e}")
    assert z_err < 1e-5, z_err
    assert_grads_close(run.grads, rows.grads)


def test_packed_sketches_differ_when_segments_are_mislabelled():
    """The comparison above can fail: labelling the same packed row with the wrong split (segments shifted by
    one token) changes the sketches."""
    seqs = random_sequences([7, 5, 9])
    packed = packed_batch([seqs])
    wrong = packed["segment_ids"].clone()
    wrong[0, 7] = 0  # first token of sequence 1 counted in sequence 0
    good = run_engine("factored", gpt2(), packed_losses(packed), torch.ones(3),
                      layout=SampleLayout.segments(packed["segment_ids"]))
    bad = run_engine("factored", gpt2(), packed_losses(packed), torch.ones(3), layout=SampleLayout.segments(wrong))
    assert float((good.sketches - bad.sketches).norm() / good.sketches.norm()) > 1e-3


# ------------------------------------------------------------------------------------- the layout
def test_layout_from_position_ids_and_checks():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    layout = SampleLayout.from_position_ids(pos)
    assert layout.num_samples == 3 and layout.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2, 2]]
    assert layout.lengths().tolist() == [3, 2, 4]
    masked = SampleLayout.from_position_ids(pos, attention_mask=torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0]]))
    assert masked.segment_ids.tolist() == [[0, 0, 0, 1, 1, 2, 2, -1, -1]]
    x = torch.arange(9.0).reshape(1, 9, 1)
    assert layout.sum_tokens(x).flatten().tolist() == [3.0, 7.0, 26.0]
    assert layout.padded(x).squeeze(-1).tolist() == [[0, 1, 2, 0], [3, 4, 0, 0], [5, 6, 7, 8]]
    scaled = layout.scale_tokens(x, torch.tensor([1.0, 10.0, 0.0]), torch.tensor([False, False, True]))
    assert scaled.flatten().tolist() == [0, 1, 2, 30, 40, 0, 0, 0, 0]
    assert SampleLayout.rows(4).num_samples == 4 and SampleLayout.rows(4).is_rows

    with pytest.raises(ValueError, match="one contiguous run"):
        SampleLayout.segments(torch.tensor([[0, 0, 1, 0]]))  # id 0 split in two runs
    with pytest.raises(ValueError, match="ids with no token"):
        SampleLayout.segments(torch.tensor([[0, 0, 2, 2]]))  # id 1 missing
    with pytest.raises(ValueError, match="one contiguous run"):
        SampleLayout.segments(torch.tensor([[0, 0], [0, 1]]))  # a segment across rows
    with pytest.raises(ValueError, match="integer"):
        SampleLayout.segments(torch.zeros(1, 3))
    with pytest.raises(TypeError):
        SampleLayout(num_samples=1, batch_size=1)


def test_losses_must_match_the_layout():
    seqs = random_sequences([4, 5])
    packed = packed_batch([seqs])
    layout = SampleLayout.segments(packed["segment_ids"])
    model = gpt2()
    from hf_dograph.sketch.factored import FactoredEngine

    eng = FactoredEngine(model, projection_dim=16, seed=0)
    with eng.capturing():
        losses = packed_losses(packed)(model)
        with pytest.raises(ValueError, match="2 samples"):
            eng.backward(torch.cat([losses, losses[:1]]), layout)
        eng.backward(losses, layout)
    with pytest.raises(ValueError, match=r"expected \(2,\)"):
        eng.accumulate_weighted_gradient(torch.ones(3))


# ------------------------------------------------------------------------------------- what cannot be split
class _Mixer(nn.Module):
    """A layer whose output at a token depends on earlier tokens (a running mean): not token-wise."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.gain + x.cumsum(dim=1) / torch.arange(1, x.shape[1] + 1).reshape(1, -1, 1)


class _FakeRMSNorm(_Mixer):
    """Named like a token-wise norm, but mixes tokens: the first packed step's check must catch it."""


class _Gain(nn.Module):
    """Token-wise, but unknown to the engine until declared with register_tokenwise."""

    def __init__(self, dim):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, dim))

    def forward(self, x):
        return x * self.gain


class _TinyLM(nn.Module):
    def __init__(self, middle: nn.Module, vocab=VOCAB, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, dim)
        self.middle = middle
        self.norm = nn.RMSNorm(dim)  # token-wise: the generic path splits it per token
        self.head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=None):
        return _Out(self.head(self.norm(self.middle(self.embed(input_ids)))))


class _Out:
    def __init__(self, logits):
        self.logits = logits


def _tiny_packed():
    packed = packed_batch([random_sequences([5, 6, 4])])
    return packed, SampleLayout.segments(packed["segment_ids"])


def test_layer_that_is_not_tokenwise_is_refused_by_name():
    packed, layout = _tiny_packed()
    with pytest.raises(UnsupportedLayerError, match=r"middle \(_Mixer\).*not known to work token by token"):
        run_engine("factored", _TinyLM(_Mixer(16)), packed_losses(packed), torch.ones(3), layout=layout)
    with pytest.raises(UnsupportedLayerError, match=r"middle \(_FakeRMSNorm\).*depends on other tokens"):
        run_engine("factored", _TinyLM(_FakeRMSNorm(16)), packed_losses(packed), torch.ones(3), layout=layout)
    # rows are still fine for such layers (the generic path splits them per row)
    rows = rows_batch(random_sequences([5, 6, 4]))
    alpha = torch.tensor([0.2, 0.5, 0.3])
    got = run_engine("factored", _TinyLM(_Mixer(16)), _row_losses(rows), alpha).grads
    assert_grads_close(got, autograd_grads(_TinyLM(_Mixer(16)), _row_losses(rows), alpha))


def test_declared_tokenwise_layer_is_split_per_token_exactly():
    packed, layout = _tiny_packed()
    alpha = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    with pytest.raises(UnsupportedLayerError, match=r"middle \(_Gain\)"):
        run_engine("factored", _TinyLM(_Gain(16)), packed_losses(packed), alpha, layout=layout)
    generic.register_tokenwise(_Gain)
    try:
        got = run_engine("factored", _TinyLM(_Gain(16)), packed_losses(packed), alpha, layout=layout)
    finally:
        generic.TOKENWISE_TYPES.remove(_Gain)
    assert_grads_close(got.grads, autograd_grads(_TinyLM(_Gain(16)), packed_losses(packed), alpha))


def test_reference_engine_refuses_packed_batches_naming_the_fix():
    packed, layout = _tiny_packed()
    with pytest.raises(UnsupportedLayerError, match="grad_engine='factored'"):
        run_engine("opacus", gpt2(), packed_losses(packed), torch.ones(3), layout=layout)
    with pytest.raises(ValueError, match="grad_engine='factored'"):
        check_training_setup("opacus", gpt2(), packed_sequences=True)
    check_training_setup("factored", gpt2(), packed_sequences=True)
