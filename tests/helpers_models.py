"""Tiny causal LMs built from configs (no Hub, dropout 0) and helpers around them, for any test to reuse.

    model = gpt2(n_embd=64)                # GPT-2 (Conv1D, tied wte/lm_head, wpe)
    model = llama()                        # LLaMA (nn.Linear, RMSNorm, untied head, padding_idx)
    model = gpt2_lora()                    # GPT-2 + PEFT LoRA: only lora_A/lora_B train
    batch = lm_batch(batch=8, seq=12, vocab=model.config.vocab_size)
    grads = weighted_autograd_gradient(model, batch, alpha)     # ∇ Σ_i α_i ℓ_i by plain autograd
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 61


def gpt2(*, vocab: int = VOCAB, n_embd: int = 32, n_layer: int = 2, n_head: int = 2, n_positions: int = 64,
         seed: int = 0, tie: bool = True) -> GPT2LMHeadModel:
    """A GPT-2 with dropout 0 (weights from `seed`)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                     tie_word_embeddings=tie)
    return GPT2LMHeadModel(cfg)


def llama(*, vocab: int = VOCAB, hidden: int = 32, intermediate: int = 64, n_layer: int = 2, n_head: int = 4,
          n_kv_head: int = 2, n_positions: int = 64, seed: int = 0, pad_token_id: int | None = 0) -> LlamaForCausalLM:
    """A LLaMA with dropout 0, untied head; `pad_token_id` becomes the embedding's padding_idx."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layer,
                      num_attention_heads=n_head, num_key_value_heads=n_kv_head, max_position_embeddings=n_positions,
                      attention_dropout=0.0, bos_token_id=0, eos_token_id=0, pad_token_id=pad_token_id,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def gpt2_lora(*, seed: int = 0, r: int = 4, target_modules=("c_attn", "c_fc"), **gpt2_kwargs):
    """GPT-2 + LoRA adapters (dropout 0); lora_B gets random values so that lora_A's gradient is not zero."""
    from peft import LoraConfig, get_peft_model

    model = gpt2(seed=seed, **gpt2_kwargs)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), lora_dropout=0.0, fan_in_fan_out=True)
    peft_model = get_peft_model(model, cfg)
    torch.manual_seed(seed + 1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


BUILDERS = {"gpt2": gpt2, "llama": llama, "gpt2-lora": gpt2_lora}


def lm_batch(*, batch: int = 8, seq: int = 12, vocab: int = VOCAB, seed: int = 0, pad_last: int = 3,
             groups: int = 3) -> dict:
    """input_ids / attention_mask / labels; every other row right-padded (labels -100 there); rows of group g
    draw tokens from the g-th slice of the vocabulary, so their gradients differ by group."""
    g = torch.Generator().manual_seed(seed)
    group = torch.arange(batch) % groups
    width = max(2, (vocab - 1) // groups)
    ids = torch.stack([torch.randint(1 + int(d) * width, 1 + (int(d) + 1) * width, (seq,), generator=g) for d in group])
    ids = ids.clamp(max=vocab - 1)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    if pad_last:
        for i in range(0, batch, 2):
            mask[i, seq - pad_last:] = 0
            labels[i, seq - pad_last:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def nan_first_sample_after_first_block(model: GPT2LMHeadModel) -> None:
    """Make sample 0's hidden states NaN after the GPT-2's first block (a forward hook), the others untouched."""

    def poison(module, inputs, output):
        output = (output[0].clone(),) + tuple(output[1:]) if isinstance(output, tuple) else output.clone()
        (output[0] if isinstance(output, tuple) else output)[0] = float("nan")
        return output

    model.transformer.h[0].register_forward_hook(poison)


def model_inputs(batch: dict) -> dict:
    """The model's inputs for a batch, with position_ids expanded to (B, T) as DoGraphTrainer passes them."""
    ids = batch["input_ids"]
    b, t = ids.shape
    return {"input_ids": ids, "attention_mask": batch["attention_mask"], "position_ids": torch.arange(t).expand(b, t)}


def per_sample_losses(model, batch: dict) -> torch.Tensor:
    """ℓ_i (B,) with the package's loss, as DoGraphTrainer computes it."""
    from hf_dograph.losses import causal_lm_per_sample_loss

    return causal_lm_per_sample_loss(model(**model_inputs(batch)).logits, batch["labels"])[0]


def trainable(model) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def weighted_autograd_gradient(model, batch: dict, alpha) -> dict[str, torch.Tensor]:
    """∇ Σ_i α_i ℓ_i by plain autograd on `model` (no engine), ℓ_i written out here; samples with α_i = 0
    are left out of the sum."""
    model.zero_grad(set_to_none=True)
    labels = batch["labels"]
    logits = model(**model_inputs(batch)).logits
    total = 0.0
    for i in range(labels.shape[0]):
        if float(alpha[i]) == 0.0:
            continue
        valid = labels[i, 1:] != -100
        ce = F.cross_entropy(logits[i, :-1][valid].float(), labels[i, 1:][valid], reduction="mean")
        total = total + float(alpha[i]) * ce
    total.backward()
    out = {n: p.grad.detach().clone() for n, p in trainable(model)}
    model.zero_grad(set_to_none=True)
    return out


def relative_error(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over all entries of two {name: tensor} dicts with the same keys."""
    num = torch.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum() for k in b))
    den = torch.sqrt(sum((b[k].double() ** 2).sum() for k in b))
    return float(num / den)
