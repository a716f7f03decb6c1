"""Tiny models and batches for the trainer-level tests: `helpers_models`' builders, plus the human `domain`
label and row helpers for `datasets.Dataset`."""

from __future__ import annotations

import torch

from helpers_models import VOCAB, gpt2, gpt2_lora, llama, lm_batch


def tiny_gpt2(seed: int = 0, vocab: int = VOCAB, n_embd: int = 32, n_layer: int = 2):
    return gpt2(seed=seed, vocab=vocab, n_embd=n_embd, n_layer=n_layer)


def tiny_llama(seed: int = 0, vocab: int = VOCAB):
    return llama(seed=seed, vocab=vocab)


def tiny_gpt2_lora(seed: int = 0):
    return gpt2_lora(seed=seed)


MODEL_BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gpt2-lora": tiny_gpt2_lora}


def make_batch(batch: int = 8, seq: int = 12, vocab: int = VOCAB, seed: int = 0, pad_last: int = 3, domains: int = 3):
    """`helpers_models.lm_batch` plus a human `domain` label: row i's token group, i mod `domains`."""
    out = lm_batch(batch=batch, seq=seq, vocab=vocab, seed=seed, pad_last=pad_last, groups=domains)
    out["domain"] = torch.arange(batch) % domains
    return out


def rows_from_batch(batch: dict) -> list[dict]:
    n = batch["input_ids"].shape[0]
    return [{k: v[i].tolist() for k, v in batch.items()} for i in range(n)]


def stack_collator(rows: list[dict]) -> dict:
    return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}
