"""Both engines on more model families and set-ups: the weighted gradient equals autograd of Σ_i α_i ℓ_i
(1e-5 relative, and per parameter).

* constant buffers: Gemma / Gemma 2 (scaled word embeddings, `embed_scale` buffer), BERT sequence
  classification (`position_ids` / `token_type_ids` buffers), a custom layer with a constant buffer;
* layers whose buffers change: refused at construction (BatchNorm, tracked InstanceNorm) or on the first step;
* the reference engine's padding row of a tied embedding / lm_head;
* activation checkpointing, reentrant and not, GPT-2 and LLaMA.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from hf_dograph.losses import causal_lm_per_sample_loss, classification_per_sample_loss
from hf_dograph.sketch import UnsupportedLayerError, check_training_setup
from hf_dograph.sketch.factored import FactoredEngine
from hf_dograph.sketch.scaled_embedding import embedding_scale

from helpers_engines import assert_grads_close, autograd_grads, run_engine
from helpers_models import VOCAB, gpt2, llama, lm_batch, model_inputs

ENGINES = ["opacus", "factored"]
ALPHA = torch.linspace(0.05, 0.2, 8, dtype=torch.float64)
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=64)


def _gemma(cls=GemmaForCausalLM, cfg_cls=GemmaConfig, **extra):
    torch.manual_seed(0)
    return cls(cfg_cls(**SMALL, num_key_value_heads=2, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                       **extra))


def _gemma2():
    return _gemma(Gemma2ForCausalLM, Gemma2Config, sliding_window=16)


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**SMALL, num_labels=3, hidden_dropout_prob=0.0,
                                                    attention_probs_dropout_prob=0.0))


def _lm_batch():
    batch = lm_batch()
    batch["input_ids"][1, 4] = 0  # a padding token inside a sequence: padding_idx rows get no embedding gradient
    return batch


def _lm_losses(batch):
    def losses(model):
        return causal_lm_per_sample_loss(model(**model_inputs(batch)).logits, batch["labels"])[0]
    return losses


def _cls_losses(batch, labels):
    def losses(model):
        return classification_per_sample_loss(model(**model_inputs(batch)).logits, labels)[0]
    return losses


# ------------------------------------------------------------------------------------- constant buffers
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("family", ["gemma", "gemma2", "bert"])
def test_models_with_constant_buffers(engine, family):
    build = {"gemma": _gemma, "gemma2": _gemma2, "bert": _bert}[family]
    batch = _lm_batch()
    losses = _cls_losses(batch, torch.arange(8) % 3) if family == "bert" else _lm_losses(batch)
    run = run_engine(engine, build(), losses, ALPHA)
    err = assert_grads_close(run.grads, autograd_grads(build(), losses, ALPHA))
    print(f"{family} {engine}: weighted gradient vs autograd, relative error {err:.2e}")
    assert run.finite.all() and run.sketches.abs().sum() > 0


def test_scaled_embedding_is_factored_with_its_scale():
    model = _gemma()
    emb = model.model.embed_tokens
    assert embedding_scale(emb) == pytest.approx(math.sqrt(32), rel=1e-6)
    d = FactoredEngine(model, projection_dim=64, seed=0).describe()
    assert "model.embed_tokens.weight" in d["factored"] and d["fallback_modules"] == []
    # The sketch includes the scale: the same model with the scale set to 1 gives a different sketch.
    batch = _lm_batch()
    z = run_engine("factored", _gemma(), _lm_losses(batch), ALPHA).sketches
    unscaled = _gemma()
    unscaled.model.embed_tokens.embed_scale.fill_(1.0)
    assert embedding_scale(unscaled.model.embed_tokens) == 1.0
    z1 = run_engine("factored", unscaled, _lm_losses(batch), ALPHA).sketches
    assert float((z - z1).norm() / z.norm()) > 1e-3


class _TanhEmbedding(nn.Embedding):
    """An nn.Embedding subclass whose forward is not embedding × constant: not a scaled embedding."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.register_buffer("gain", torch.tensor(2.0), persistent=False)

    def forward(self, ids):
        return torch.tanh(super().forward(ids) * self.gain)


class _ConstantScale(nn.Module):
    """A trainable layer with a constant buffer (no Opacus sampler for it)."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, dim))
        self.register_buffer("scale", torch.tensor(0.7))

    def forward(self, x):
        return x * self.weight * self.scale


class _TinyLM(nn.Module):
    def __init__(self, embed: nn.Module | None = None, middle: nn.Module | None = None, dim=16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = embed if embed is not None else nn.Embedding(VOCAB, dim)
        self.middle = middle if middle is not None else _ConstantScale(dim)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return _Out(self.head(self.middle(self.embed(input_ids))))


class _Out:
    def __init__(self, logits):
        self.logits = logits


@pytest.mark.parametrize("engine", ENGINES)
def test_custom_layers_with_constant_buffers(engine):
    def build():
        torch.manual_seed(0)
        return _TinyLM(embed=_TanhEmbedding(VOCAB, 16))

    assert embedding_scale(build().embed) is None
    batch = _lm_batch()
    run = run_engine(engine, build(), _lm_losses(batch), ALPHA)
    assert_grads_close(run.grads, autograd_grads(build(), _lm_losses(batch), ALPHA))
    if engine == "factored":  # the non-linear embedding went to the exact path, and the log says so
        assert "embed (_TanhEmbedding)" in FactoredEngine(build(), projection_dim=8, seed=0).log_lines()[0]


# ------------------------------------------------------------------------------------- buffers that change
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("norm", ["batchnorm", "frozen batchnorm", "instancenorm"])
def test_layers_with_running_statistics_are_refused_at_construction(engine, norm):
    layer = {"batchnorm": nn.BatchNorm1d(16), "frozen batchnorm": nn.BatchNorm1d(16),
             "instancenorm": nn.InstanceNorm1d(16, affine=True, track_running_stats=True)}[norm]
    if norm == "frozen batchnorm":
        layer.requires_grad_(False)
    model = _TinyLM(middle=layer)
    cls = type(layer).__name__
    with pytest.raises(UnsupportedLayerError, match=rf"middle \({cls}\).*(LayerNorm|GroupNorm)"):
        run_engine(engine, model, _lm_losses(_lm_batch()), ALPHA)
    with pytest.raises(UnsupportedLayerError, match=rf"middle \({cls}\)"):
        check_training_setup(engine, model)
    # untracked instance norm: per-sample statistics, no state: accepted
    if norm == "instancenorm":
        FactoredEngine(_TinyLM(middle=nn.InstanceNorm1d(16, affine=True)), projection_dim=8, seed=0)


class _Counting(_ConstantScale):
    """A trainable layer that updates a buffer in its forward."""

    def forward(self, x):
        if self.training:
            self.scale.add_(0.01)
        return super().forward(x)


@pytest.mark.parametrize("engine", ENGINES)
def test_buffer_changed_by_a_step_is_named_on_the_first_step(engine):
    with pytest.raises(UnsupportedLayerError, match=r"middle \(_Counting\)\.scale"):
        run_engine(engine, _TinyLM(middle=_Counting(16)), _lm_losses(_lm_batch()), ALPHA)


# ------------------------------------------------------------------------------------- tied embeddings, padding
def _tied_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(**SMALL, num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=1,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("engine", ENGINES)
def test_tied_embedding_with_padding_idx_keeps_the_heads_gradient_on_the_padding_row(engine):
    model = _tied_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.model.embed_tokens.padding_idx == 0
    batch = _lm_batch()
    run = run_engine(engine, _tied_llama(), _lm_losses(batch), ALPHA)
    ref = autograd_grads(_tied_llama(), _lm_losses(batch), ALPHA)
    name = "model.embed_tokens.weight"
    assert float(ref[name][0].abs().max()) > 1e-4  # the head's gradient on the padding row is real
    err = assert_grads_close(run.grads, ref)
    print(f"tied llama {engine}: relative error {err:.2e}, padding row max error "
          f"{float((run.grads[name][0] - ref[name][0]).abs().max()):.2e}")


# ------------------------------------------------------------------------------------- activation checkpointing
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_activation_checkpointing(engine, reentrant, model_name):
    build = gpt2 if model_name == "gpt2" else llama

    def checkpointed():
        m = build()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        m.train()
        return m

    kwargs = {"use_reentrant": reentrant}
    check_training_setup(engine, checkpointed(), gradient_checkpointing=True, gradient_checkpointing_kwargs=kwargs)
    batch = _lm_batch()
    run = run_engine(engine, checkpointed(), _lm_losses(batch), ALPHA)
    assert_grads_close(run.grads, autograd_grads(build(), _lm_losses(batch), ALPHA))
    # and the sketch is the one of the same model without checkpointing
    plain = run_engine(engine, build(), _lm_losses(batch), ALPHA)
    assert torch.allclose(run.sketches, plain.sketches, rtol=1e-4, atol=1e-6 * float(plain.sketches.abs().max()))


def test_check_training_setup_names_bad_settings():
    with pytest.raises(ValueError, match="grad_engine='nope'"):
        check_training_setup("nope", gpt2())
    with pytest.raises(ValueError, match="use_reentrant"):
        check_training_setup("factored", gpt2(), gradient_checkpointing=True,
                             gradient_checkpointing_kwargs={"use_reentrant": "yes"})
    check_training_setup("loss-only", gpt2(), gradient_checkpointing=True)
