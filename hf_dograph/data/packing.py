"""Tokenize, pack (or truncate) per domain, and hold out a validation split per domain.

Packing concatenates the documents of one domain (EOS after each) and cuts the stream into
blocks of `seq_len` tokens. Packing per domain, rather than across the whole corpus, keeps
exactly one human label per sequence, which per-domain logging and evaluation need. The
last, shorter block of each domain is kept (the collator pads it): no token is lost, and
`PackingStats` counts tokens in and out so that this can be checked.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .tokenizers import encode_texts

TOKENIZE_BATCH = 256  # documents per tokenizer call: the fast tokenizers batch in Rust


@dataclass
class PackingStats:
    """Token and sequence counts per domain name (documents' tokens incl. the EOS added)."""

    documents: dict[str, int] = field(default_factory=dict)
    tokens_in: dict[str, int] = field(default_factory=dict)
    tokens_out: dict[str, int] = field(default_factory=dict)
    tokens_dropped: dict[str, int] = field(default_factory=dict)  # 'truncate' only
    train_sequences: dict[str, int] = field(default_factory=dict)
    validation_sequences: dict[str, int] = field(default_factory=dict)
    train_tokens: dict[str, int] = field(default_factory=dict)
    validation_tokens: dict[str, int] = field(default_factory=dict)

    def add(self, table: str, name: str, n: int) -> None:
        counts = getattr(self, table)
        counts[name] = counts.get(name, 0) + int(n)

    def to_dict(self) -> dict:
        return {k: dict(v) for k, v in self.__dict__.items()}


def tokenize_documents(
    tokenizer, docs: Iterable[tuple[str, int]], add_eos: bool = True
) -> Iterator[tuple[np.ndarray, int]]:
    """`(token ids, domain id)` per document, in order, with EOS appended when `add_eos`."""
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError("the tokenizer has no EOS token: set data.add_eos=false")
    batch: list[tuple[str, int]] = []

    def flush():
        ids = encode_texts(tokenizer, [text for text, _ in batch])
        for arr, (_, dom) in zip(ids, batch):
            yield (np.append(arr, np.int32(eos)) if add_eos else arr), dom

    for item in docs:
        batch.append(item)
        if len(batch) >= TOKENIZE_BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def pack_arrays(arrays: list[np.ndarray], seq_len: int) -> list[np.ndarray]:
    """Concatenate `arrays` and cut into blocks of `seq_len`; the last block may be shorter."""
    if not arrays:
        return []
    stream = np.concatenate(arrays)
    full = len(stream) // seq_len
    blocks = list(stream[: full * seq_len].reshape(full, seq_len)) if full else []
    if len(stream) > full * seq_len:
        blocks.append(stream[full * seq_len :])
    return blocks


class StreamPacker:
    """Packs a stream of `(ids, domain)` documents per domain, emitting full blocks as they fill.

    `flush()` emits each domain's leftover (shorter) block at the end of the stream.
    """

    def __init__(self, seq_len: int):
        self.seq_len = int(seq_len)
        self._buffers: dict[int, list[np.ndarray]] = {}
        self._sizes: dict[int, int] = {}

    def add(self, ids: np.ndarray, domain: int) -> Iterator[np.ndarray]:
        buf = self._buffers.setdefault(domain, [])
        buf.append(ids)
        self._sizes[domain] = self._sizes.get(domain, 0) + len(ids)
        if self._sizes[domain] >= self.seq_len:
            stream = np.concatenate(buf)
            full = len(stream) // self.seq_len
            yield from stream[: full * self.seq_len].reshape(full, self.seq_len)
            rest = stream[full * self.seq_len :]
            self._buffers[domain] = [rest] if len(rest) else []
            self._sizes[domain] = len(rest)

    def flush(self) -> Iterator[tuple[np.ndarray, int]]:
        for domain, buf in self._buffers.items():
            if self._sizes.get(domain, 0):
                yield np.concatenate(buf), domain
        self._buffers.clear()
        self._sizes.clear()


def split_validation(
    n: int, fraction: float, seed: int, cap: int | None = None
) -> tuple[list[int], list[int]]:
    """Indices `(train, validation)` of `n` sequences of one domain.

    At least one validation sequence when the domain has two or more (a domain must be
    measurable) and never all of them (it must also be trained on); `cap` bounds the count.
    """
    if n <= 1 or fraction <= 0:
        return list(range(n)), []
    k = max(1, int(round(fraction * n)))
    if cap is not None:
        k = min(k, int(cap))
    k = min(k, n - 1)
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[k:]), sorted(order[:k])
