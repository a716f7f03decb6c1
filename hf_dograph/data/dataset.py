"""`build_domain_dataset`: a `DataSpec` and a tokenizer in, train/validation sequences with domain labels out."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .packing import PackingStats, StreamPacker, pack_arrays, split_validation, tokenize_documents
from .sources import iter_documents, load_documents, source_domain_names, _buffer_shuffle
from .spec import DataError, DataSpec

logger = logging.getLogger(__name__)


@dataclass
class DomainDataset:
    """Training and validation sequences, each with its human domain id (0..D-1).

    `train` is a `datasets.Dataset` (or a `datasets.IterableDataset` when streaming) and
    `validation` a `datasets.Dataset`, both with columns `input_ids` and `domain`.
    `domain_names[i]` is the name of domain id i. `stats` counts tokens and sequences (for
    streaming data, the training side is counted only as far as it was read).
    """

    train: object
    validation: object
    domain_names: list[str]
    seq_len: int
    stats: PackingStats = field(default_factory=PackingStats)

    @property
    def num_domains(self) -> int:
        return len(self.domain_names)

    def save_domain_names(self, output_dir: str | Path) -> Path:
        """Write `domain_names.json` (id → name) into `output_dir`."""
        from ..jsonfiles import write_json

        return write_json(Path(output_dir) / "domain_names.json", self.domain_names, ensure_ascii=False)

    def summary(self) -> str:
        """One line per domain: training / validation sequences and tokens."""
        s = self.stats
        lines = [f"{'domain':<24} {'train seqs':>10} {'val seqs':>8} {'train tokens':>12} {'val tokens':>10}"]
        for name in self.domain_names:
            lines.append(
                f"{name[:24]:<24} {s.train_sequences.get(name, 0):>10} {s.validation_sequences.get(name, 0):>8} "
                f"{s.train_tokens.get(name, 0):>12} {s.validation_tokens.get(name, 0):>10}"
            )
        return "\n".join(lines)


def _to_dataset(blocks: list[np.ndarray], domains: list[int]):
    """A `datasets.Dataset` (columns input_ids: list<int32>, domain: int64) built straight from the
    arrays through Arrow: ~10x faster than going through Python lists."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    offsets = np.zeros(len(blocks) + 1, dtype=np.int32)
    if blocks:
        offsets[1:] = np.cumsum([len(b) for b in blocks])
    values = np.concatenate(blocks).astype(np.int32) if blocks else np.zeros(0, dtype=np.int32)
    ids = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    table = pa.table({"input_ids": ids, "domain": pa.array(np.asarray(domains, dtype=np.int64))})
    return Dataset(InMemoryTable(table))


def _labelled_ids(docs, names: list[str]) -> Iterator[tuple[str, int]]:
    index = {n: i for i, n in enumerate(names)}
    for text, label in docs:
        if label in index:
            yield text, index[label]


def _sequences(spec: DataSpec, tokenizer, docs, names, stats: PackingStats) -> dict[int, list[np.ndarray]]:
    """All sequences of each domain id (map-style)."""
    per_domain: dict[int, list[np.ndarray]] = {i: [] for i in range(len(names))}
    for ids, dom in tokenize_documents(tokenizer, _labelled_ids(docs, names), spec.add_eos):
        per_domain[dom].append(ids)
        stats.add("documents", names[dom], 1)
        stats.add("tokens_in", names[dom], len(ids))
    seq_len = int(spec.seq_len)
    for dom, arrays in per_domain.items():
        if spec.packing == "pack":
            per_domain[dom] = pack_arrays(arrays, seq_len)
        else:
            per_domain[dom] = [a[:seq_len] for a in arrays if len(a)]
            stats.add("tokens_dropped", names[dom], sum(max(0, len(a) - seq_len) for a in arrays))
        stats.add("tokens_out", names[dom], sum(len(b) for b in per_domain[dom]))
    return per_domain


def _build_map_style(spec: DataSpec, tokenizer) -> DomainDataset:
    docs, names = load_documents(spec)
    stats = PackingStats()
    per_domain = _sequences(spec, tokenizer, docs, names, stats)
    train_blocks, train_doms, val_blocks, val_doms = [], [], [], []
    for dom, blocks in per_domain.items():
        name = names[dom]
        tr, va = split_validation(
            len(blocks), float(spec.validation_fraction), seed=spec.seed * 1000 + dom,
            cap=spec.max_validation_sequences_per_domain,
        )
        for idx, (out_b, out_d, kind) in ((tr, (train_blocks, train_doms, "train")), (va, (val_blocks, val_doms, "validation"))):
            for i in idx:
                out_b.append(blocks[i])
                out_d.append(dom)
            stats.add(f"{kind}_sequences", name, len(idx))
            stats.add(f"{kind}_tokens", name, sum(len(blocks[i]) for i in idx))
    empty = [n for n in names if not stats.tokens_out.get(n)]
    if empty:
        logger.warning("domains with no data: %s", empty)
    if not train_blocks:
        raise DataError("no training sequences: the data source is empty after filtering")
    return DomainDataset(
        train=_to_dataset(train_blocks, train_doms),
        validation=_to_dataset(val_blocks, val_doms),
        domain_names=names,
        seq_len=int(spec.seq_len),
        stats=stats,
    )


class _StreamState:
    """Picklable description of the training stream (for `IterableDataset.from_generator`)."""

    def __init__(self, spec: DataSpec, tokenizer, names: list[str]):
        self.spec, self.tokenizer, self.names = spec, tokenizer, names


def _stream_train(state: _StreamState) -> Iterator[dict]:
    """Training blocks of a streamed source: skip the validation documents, shuffle, pack per domain."""
    spec = state.spec
    docs = iter_documents(spec)
    for _ in range(int(spec.validation_documents)):  # held out for validation
        if next(docs, None) is None:
            break
    docs = _buffer_shuffle(docs, int(spec.shuffle_buffer), spec.seed)
    packer = StreamPacker(spec.seq_len)
    seq_len = int(spec.seq_len)
    for ids, dom in tokenize_documents(state.tokenizer, _labelled_ids(docs, state.names), spec.add_eos):
        if spec.packing == "truncate":
            yield {"input_ids": ids[:seq_len].tolist(), "domain": dom}
            continue
        for block in packer.add(ids, dom):
            yield {"input_ids": block.tolist(), "domain": dom}
    for block, dom in packer.flush():
        yield {"input_ids": block.tolist(), "domain": dom}


def _build_streaming(spec: DataSpec, tokenizer) -> DomainDataset:
    from datasets import Features, IterableDataset, Sequence, Value

    names = source_domain_names(spec)
    stats = PackingStats()
    # Validation: the first `validation_documents` documents, packed per domain, in memory.
    head = []
    docs = iter_documents(spec)
    for _ in range(int(spec.validation_documents)):
        item = next(docs, None)
        if item is None:
            break
        head.append(item)
    val_blocks, val_doms = [], []
    per_domain = _sequences(spec, tokenizer, head, names, stats)
    cap = spec.max_validation_sequences_per_domain
    for dom, blocks in per_domain.items():
        blocks = blocks if cap is None else blocks[: int(cap)]
        val_blocks += blocks
        val_doms += [dom] * len(blocks)
        stats.add("validation_sequences", names[dom], len(blocks))
        stats.add("validation_tokens", names[dom], sum(len(b) for b in blocks))
    features = Features({"input_ids": Sequence(Value("int32")), "domain": Value("int64")})
    train = IterableDataset.from_generator(
        _stream_train, gen_kwargs={"state": _StreamState(spec, tokenizer, names)}, features=features
    )
    return DomainDataset(
        train=train, validation=_to_dataset(val_blocks, val_doms), domain_names=names,
        seq_len=int(spec.seq_len), stats=stats,
    )


def build_domain_dataset(spec: DataSpec, tokenizer) -> DomainDataset:
    """Read, tokenize, pack and split the data described by `spec` (validated first).

    Map-style (default): every document is read and packed in memory, and each domain's
    sequences are split into train and validation (`validation_fraction`). Streaming: the
    training side is a lazy `IterableDataset`; the validation side is the stream's first
    `validation_documents` documents.
    """
    spec.validate()
    if spec.streaming:
        return _build_streaming(spec, tokenizer)
    return _build_map_style(spec, tokenizer)
