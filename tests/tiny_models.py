"""Tiny models and batches built from configs (no Hub), dropout 0, shared by the tests."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 61


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, n_embd: int = 32, n_layer: int = 2) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab, n_positions=64, n_embd=n_embd, n_layer=n_layer, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def tiny_llama(seed: int = 0, vocab: int = VOCAB) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.0, bos_token_id=0,
        eos_token_id=0, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def tiny_gpt2_lora(seed: int = 0):
    from peft import LoraConfig, get_peft_model

    model = tiny_gpt2(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], lora_dropout=0.0, fan_in_fan_out=True)
    peft_model = get_peft_model(model, cfg)
    # LoRA's B starts at zero: give it values so that A's gradient is not trivially zero.
    torch.manual_seed(seed + 1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


MODEL_BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gpt2-lora": tiny_gpt2_lora}


def make_batch(batch: int = 8, seq: int = 12, vocab: int = VOCAB, seed: int = 0, pad_last: int = 3, domains: int = 3):
    """input_ids/attention_mask/labels (-100 on the right padding of some rows) and a human `domain` label."""
    g = torch.Generator().manual_seed(seed)
    domain = torch.arange(batch) % domains
    # Each domain draws tokens from its own range, so gradients differ by domain.
    width = max(2, (vocab - 1) // domains)
    ids = torch.stack([torch.randint(1 + int(d) * width, 1 + (int(d) + 1) * width, (seq,), generator=g) for d in domain])
    ids = ids.clamp(max=vocab - 1)
    mask = torch.ones_like(ids)
    labels = ids.clone()
    for i in range(0, batch, 2):  # every other row right-padded
        mask[i, seq - pad_last:] = 0
        labels[i, seq - pad_last:] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "domain": domain}


def rows_from_batch(batch: dict) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i].tolist() for k, v in batch.items()} for i in range(n)]


def stack_collator(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
