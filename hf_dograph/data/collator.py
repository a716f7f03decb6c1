"""`DomainCollator`: pads token sequences into a causal-LM batch that carries its human domain label."""

from __future__ import annotations

from collections.abc import Sequence

import torch


class DomainCollator:
    """Stack `{"input_ids": [...], "domain": int}` features into a causal-LM batch.

    The batch has `input_ids` (right-padded with `pad_token_id`), `attention_mask`, `labels`
    (the input ids, -100 on padding: the model shifts them itself) and, when `keep_domain`,
    the human domain label as a LongTensor under `domain_key` (read from each feature's
    `feature_key`, by default the same name). `DoGraphTrainer` removes that
    key before the model's forward; use `keep_domain=False` with a plain `Trainer`, whose
    model would reject it.

    Labels come from the attention mask, not from comparing ids with the pad id: GPT-2 pads
    with its EOS, and the EOS between packed documents must still be learned.
    """

    def __init__(
        self,
        pad_token_id: int,
        keep_domain: bool = True,
        domain_key: str = "domain",
        pad_to_multiple_of: int | None = None,
        feature_key: str | None = None,
    ):
        if pad_token_id is None:
            raise ValueError("DomainCollator needs a pad_token_id (set tokenizer.pad_token)")
        self.pad_token_id = int(pad_token_id)
        self.keep_domain = keep_domain
        self.domain_key = domain_key
        self.feature_key = feature_key or domain_key  # where features hold the label (datasets: "domain")
        self.pad_to_multiple_of = pad_to_multiple_of

    @classmethod
    def for_tokenizer(cls, tokenizer, **kwargs) -> DomainCollator:
        return cls(tokenizer.pad_token_id, **kwargs)

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs = [torch.as_tensor(f["input_ids"], dtype=torch.long).reshape(-1) for f in features]
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            m = int(self.pad_to_multiple_of)
            length = -(-length // m) * m
        input_ids = torch.full((len(seqs), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
        for i, s in enumerate(seqs):
            input_ids[i, : len(s)] = s
            attention_mask[i, : len(s)] = 1
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.keep_domain:
            key = self.feature_key
            if any(key not in f for f in features):
                raise KeyError(f"a feature has no {key!r} label (DomainCollator keep_domain=True)")
            batch[self.domain_key] = torch.tensor([int(f[key]) for f in features], dtype=torch.long)
        return batch
