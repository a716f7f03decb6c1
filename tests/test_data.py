"""The data layer: embedded corpus, offline tokenizers, sources, packing, validation split, collator,
per-domain evaluation and the Hub check. No network; the RedPajama sample is skipped where absent."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from hf_dograph.data import (
    DEFAULT_PROPORTIONS,
    PILE_17_SUBSETS,
    DataError,
    DataSpec,
    DomainCollator,
    HubAccessError,
    build_domain_dataset,
    check_hub_resource,
    embedded_documents,
    load_tokenizer,
)
from hf_dograph.data.packing import pack_arrays, split_validation
from hf_dograph.data.sources import get_field, iter_documents
from hf_dograph.data.tokenizers import encode_texts

REDPAJAMA_DOMAINS = ["arxiv", "book", "c4-rp", "cc", "github", "stackexchange", "wiki"]


@pytest.fixture(scope="module")
def byte_tok():
    return load_tokenizer("bytes")


@pytest.fixture(scope="module")
def gpt2_tok():
    return load_tokenizer("gpt2-bpe-offline")


# ----------------------------------------------------------------------------- embedded corpus
def test_embedded_corpus_is_deterministic_and_unbalanced():
    a = embedded_documents(50_000, seed=3)
    assert a == embedded_documents(50_000, seed=3)
    assert a != embedded_documents(50_000, seed=4)
    chars = Counter()
    for text, name in a:
        chars[name] += len(text)
    total = sum(chars.values())
    assert set(chars) == set(DEFAULT_PROPORTIONS) and len(chars) >= 5
    for name, share in DEFAULT_PROPORTIONS.items():
        assert abs(chars[name] / total - share) < 0.01, (name, chars[name] / total)
    assert max(DEFAULT_PROPORTIONS.values()) == 0.60 and min(DEFAULT_PROPORTIONS.values()) == 0.02


def test_embedded_domains_look_different():
    docs = {}
    for text, name in embedded_documents(20_000, seed=0):
        docs.setdefault(name, text)
    assert docs["code"].startswith("def ")
    assert docs["tables"].startswith("id,name,city,score")
    assert " = " in docs["arithmetic"] and docs["arithmetic"][0].isdigit()
    assert ": " in docs["dialogue"].splitlines()[0]
    assert docs["prose"].startswith("The ")
    # Arithmetic is correct, so the domain is learnable.
    for line in docs["arithmetic"].strip().splitlines():
        lhs, rhs = line.split(" = ")
        assert eval(lhs) == int(rhs)  # noqa: S307 - our own generated "x op y"


def test_embedded_custom_proportions_and_errors():
    docs = embedded_documents(10_000, proportions={"code": 1, "prose": 1}, seed=0)
    assert {n for _, n in docs} == {"code", "prose"}
    with pytest.raises(ValueError, match="poetry"):
        embedded_documents(1000, proportions={"poetry": 1.0})


# ----------------------------------------------------------------------------- tokenizers
def test_gpt2_bpe_offline_matches_gpt2_ids(gpt2_tok):
    assert len(gpt2_tok) == 50257
    assert gpt2_tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2's well-known ids
    assert gpt2_tok.eos_token_id == 50256 and gpt2_tok.pad_token_id == 50256


def test_byte_fast_path_equals_byt5(byte_tok):
    texts = ["héllo wörld", "def f(x):\n    return x", "Болгария 1 + 2 = 3"]
    fast = encode_texts(byte_tok, texts)
    slow = byte_tok(texts, add_special_tokens=False)["input_ids"]
    assert [f.tolist() for f in fast] == slow
    assert len(byte_tok) == 259 and byte_tok.decode(fast[0].tolist()) == texts[0]


# ----------------------------------------------------------------------------- packing helpers
def test_pack_arrays_keeps_every_token():
    arrays = [np.arange(n, dtype=np.int32) for n in (5, 7, 1, 13)]
    blocks = pack_arrays(arrays, 8)
    assert [len(b) for b in blocks] == [8, 8, 8, 2]
    assert np.array_equal(np.concatenate(blocks), np.concatenate(arrays))


def test_split_validation_per_domain_rules():
    tr, va = split_validation(100, 0.1, seed=0)
    assert len(va) == 10 and sorted(tr + va) == list(range(100))
    assert split_validation(3, 0.01, seed=0)[1] != []  # at least one held out...
    assert split_validation(1, 0.5, seed=0) == ([0], [])  # ...but never the only sequence
    assert len(split_validation(100, 0.5, seed=0, cap=4)[1]) == 4


# ----------------------------------------------------------------------------- RedPajama sample
def _decode_bytes(ids) -> bytes:
    # Byte b is id b + 3; the EOS (id 1) between documents becomes b"\x00", as in `joined` below.
    return bytes(int(i) - 3 if int(i) >= 3 else 0 for i in ids)


def test_redpajama_folder_labels_split_lengths_tokens(redpajama_dir, byte_tok):
    seq_len = 512
    spec = DataSpec(source="folder", path=str(redpajama_dir), seq_len=seq_len, validation_fraction=0.05)
    data = build_domain_dataset(spec, byte_tok)
    assert data.domain_names == REDPAJAMA_DOMAINS

    # No token lost: an independent count (UTF-8 bytes + one EOS per document) equals what was packed.
    expected = Counter()
    texts = {d: [] for d in REDPAJAMA_DOMAINS}
    for domain in REDPAJAMA_DOMAINS:
        for line in (redpajama_dir / domain / "part1.jsonl").read_text(encoding="utf-8").splitlines():
            if line.strip():
                text = json.loads(line)["text"]
                texts[domain].append(text)
                expected[domain] += len(text.encode("utf-8")) + 1
    import pyarrow.compute as pc

    def lengths_and_domains(split):
        table = split.data  # count through Arrow: millions of tokens
        return pc.list_value_length(table.column("input_ids")).to_numpy(), table.column("domain").to_numpy()

    (tr_len, tr_dom), (va_len, va_dom) = lengths_and_domains(data.train), lengths_and_domains(data.validation)
    for i, domain in enumerate(REDPAJAMA_DOMAINS):
        assert tr_len[tr_dom == i].sum() + va_len[va_dom == i].sum() == expected[domain], domain
        assert data.stats.tokens_in[domain] == data.stats.tokens_out[domain] == expected[domain]

    # No sequence longer than the limit; all full but each domain's last.
    lengths = np.concatenate([tr_len, va_len])
    assert lengths.max() == seq_len
    assert (lengths < seq_len).sum() <= len(REDPAJAMA_DOMAINS)

    # A validation split per domain, about the asked fraction of its sequences.
    val_domains = Counter(data.validation["domain"])
    train_domains = Counter(data.train["domain"])
    for i, domain in enumerate(REDPAJAMA_DOMAINS):
        n = val_domains[i] + train_domains[i]
        assert val_domains[i] >= 1 and train_domains[i] >= 1, domain
        assert val_domains[i] == max(1, round(0.05 * n)), domain

    # Labels kept: every sequence's bytes come from its own domain's text (EOS-joined), checked on a sample.
    joined = {d: b"\x00".join(t.encode("utf-8") for t in texts[d]) for d in REDPAJAMA_DOMAINS}
    rows = data.validation.select(range(0, len(data.validation), 7))
    for ids, domain in zip(rows["input_ids"], rows["domain"]):
        piece = _decode_bytes(ids)
        assert piece[:64] in joined[REDPAJAMA_DOMAINS[domain]], REDPAJAMA_DOMAINS[domain]


def test_redpajama_gpt2_truncate_and_max_documents(redpajama_dir, gpt2_tok):
    spec = DataSpec(
        source="folder", path=str(redpajama_dir), seq_len=64, packing="truncate", max_documents=60,
        validation_fraction=0.2, domains=["github", "stackexchange", "arxiv"],
    )
    data = build_domain_dataset(spec, gpt2_tok)
    assert data.domain_names == ["github", "stackexchange", "arxiv"]
    s = data.stats
    assert sum(s.documents.values()) == 60
    for name in data.domain_names:
        assert s.tokens_in[name] == s.tokens_out[name] + s.tokens_dropped.get(name, 0)
        assert s.train_sequences[name] + s.validation_sequences[name] == s.documents[name]
    assert max(len(x) for x in data.train["input_ids"]) <= 64


# ----------------------------------------------------------------------------- local files
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_local_jsonl_nested_label_and_parquet(tmp_path, byte_tok):
    rows = [{"text": f"doc {i} " * 20, "meta": {"src": "a" if i % 3 else "b"}} for i in range(30)]
    _write_jsonl(tmp_path / "x.jsonl", rows)
    spec = DataSpec(source="local", path=str(tmp_path / "*.jsonl"), label_field="meta.src", seq_len=32)
    data = build_domain_dataset(spec, byte_tok)
    assert data.domain_names == ["a", "b"]
    assert sum(data.stats.documents.values()) == 30

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["alpha " * 9, "beta " * 9] * 5, "lang": ["en", "fr"] * 5}), tmp_path / "y.parquet")
    spec = DataSpec(source="local", path=str(tmp_path / "y.parquet"), text_field="content", label_field="lang", seq_len=16)
    data = build_domain_dataset(spec, byte_tok)
    assert data.domain_names == ["en", "fr"] and data.stats.documents == {"en": 5, "fr": 5}


def test_missing_fields_are_named(tmp_path, byte_tok):
    _write_jsonl(tmp_path / "x.jsonl", [{"text": "hello", "meta": {"source": "a"}}])
    spec = DataSpec(source="local", path=str(tmp_path / "x.jsonl"), label_field="meta.redpajama_set_name")
    with pytest.raises(DataError, match=r"label_field='meta.redpajama_set_name' not found.*meta\.\{source\}"):
        build_domain_dataset(spec, byte_tok)
    spec = DataSpec(source="local", path=str(tmp_path / "x.jsonl"), text_field="body", label_field="meta.source")
    with pytest.raises(DataError, match="text_field='body'"):
        build_domain_dataset(spec, byte_tok)
    with pytest.raises(DataError, match="data.path"):
        build_domain_dataset(DataSpec(source="local", path=str(tmp_path / "nope.jsonl"), label_field="x"), byte_tok)
    with pytest.raises(DataError, match="data.label_field is missing"):
        DataSpec(source="hub", name="DKYoon/SlimPajama-6B").validate()
    with pytest.raises(DataError, match="data.domains is missing"):
        DataSpec(source="hub", name="x/y", label_field="l", streaming=True).validate()


def test_get_field_decodes_json_string_meta():
    assert get_field({"meta": '{"pile_set_name": "ArXiv"}'}, "meta.pile_set_name") == "ArXiv"
    with pytest.raises(KeyError):
        get_field({"meta": {}}, "meta.pile_set_name")


# ----------------------------------------------------------------------------- streaming
def test_streaming_holds_out_head_and_loses_no_token(byte_tok):
    spec = DataSpec(source="embedded", embedded_chars=20_000, seq_len=48, streaming=True,
                    validation_documents=30, shuffle_buffer=16)
    data = build_domain_dataset(spec, byte_tok)
    from datasets import IterableDataset

    assert isinstance(data.train, IterableDataset)
    train = list(data.train)
    assert all(len(r["input_ids"]) <= 48 for r in train)
    docs = list(iter_documents(spec))
    total = sum(len(t.encode("utf-8")) + 1 for t, _ in docs)
    val = sum(len(x) for x in data.validation["input_ids"])
    assert val == sum(len(t.encode("utf-8")) + 1 for t, _ in docs[:30])
    assert sum(len(r["input_ids"]) for r in train) + val == total
    assert Counter(r["domain"] for r in train).keys() == set(range(len(data.domain_names)))


def test_hub_source_code_path_on_a_local_dataset_folder(tmp_path, byte_tok):
    """source 'hub' goes through datasets.load_dataset; a local dataset folder takes the same path offline."""
    import zstandard

    repo = tmp_path / "pile-like"
    (repo / "train").mkdir(parents=True)
    names = ["ArXiv", "Github", "Books3"]  # Books3 is filtered out below, as the paper drops it
    rows = [{"text": f"{names[i % 3]} document {i} " * 8, "meta": {"pile_set_name": names[i % 3]}} for i in range(60)]
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    (repo / "train" / "00.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(payload))
    spec = DataSpec(source="hub", name=str(repo), label_field="meta.pile_set_name", domains=["ArXiv", "Github"],
                    streaming=True, validation_documents=10, seq_len=64, shuffle_buffer=8)
    data = build_domain_dataset(spec, byte_tok)
    train = list(data.train)
    kept = [r for r in rows if r["meta"]["pile_set_name"] != "Books3"]
    total = sum(len(r["text"].encode()) + 1 for r in kept)
    assert sum(len(r["input_ids"]) for r in train) + sum(len(x) for x in data.validation["input_ids"]) == total
    assert set(data.validation["domain"]) == {0, 1} and data.domain_names == ["ArXiv", "Github"]
    bad = DataSpec(source="hub", name=str(repo), label_field="meta.redpajama_set_name", domains=["ArXiv"], streaming=True)
    with pytest.raises(DataError, match="label_field='meta.redpajama_set_name' not found"):
        build_domain_dataset(bad, byte_tok)
    # The same file read as a local source (.jsonl.zst).
    local = DataSpec(source="local", path=str(repo / "train"), label_field="meta.pile_set_name", seq_len=64)
    assert build_domain_dataset(local, byte_tok).domain_names == ["ArXiv", "Books3", "Github"]


# ----------------------------------------------------------------------------- collator
def test_collator_pads_masks_and_carries_domain():
    coll = DomainCollator(pad_token_id=7)
    batch = coll([{"input_ids": [5, 7, 6], "domain": 2}, {"input_ids": [1], "domain": 0}])
    assert batch["input_ids"].tolist() == [[5, 7, 6], [1, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    # The real token 7 (GPT-2 pads with its EOS) stays a label; only padding is -100.
    assert batch["labels"].tolist() == [[5, 7, 6], [1, -100, -100]]
    assert batch["domain"].dtype == torch.long and batch["domain"].tolist() == [2, 0]
    plain = DomainCollator(pad_token_id=7, keep_domain=False)([{"input_ids": [1, 2], "domain": 1}])
    assert set(plain) == {"input_ids", "attention_mask", "labels"}
    renamed = DomainCollator(0, domain_key="source", feature_key="domain")([{"input_ids": [1], "domain": 3}])
    assert renamed["source"].tolist() == [3]
    assert DomainCollator(0, pad_to_multiple_of=8)([{"input_ids": [1], "domain": 0}])["input_ids"].shape == (1, 8)


# ----------------------------------------------------------------------------- per-domain evaluation
def test_evaluate_per_domain_matches_hand_computation(tiny_gpt2_config):
    from transformers import GPT2LMHeadModel

    from hf_dograph.evaluation import evaluate_per_domain

    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config(vocab_size=20))
    rows = [
        {"input_ids": [3, 4, 5, 6, 7], "domain": 0},
        {"input_ids": [8, 9], "domain": 1},
        {"input_ids": [10, 11, 12], "domain": 0},
        {"input_ids": [13], "domain": 2},  # one token: nothing to predict
    ]
    result = evaluate_per_domain(model, rows, DomainCollator(0), ["a", "b", "c"], batch_size=3)
    sums, counts = [0.0] * 3, [0] * 3
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
            for t in range(ids.shape[1] - 1):
                sums[row["domain"]] -= float(logp[t, ids[0, t + 1]])
                counts[row["domain"]] += 1
    assert result.tokens == counts == [6, 1, 0]
    assert result.loss[0] == pytest.approx(sums[0] / 6, rel=1e-5)
    assert result.loss[1] == pytest.approx(sums[1] / 1, rel=1e-5)
    assert math.isnan(result.loss[2])
    assert result.mean_loss == pytest.approx((result.loss[0] + result.loss[1]) / 2)
    assert result.overall_loss == pytest.approx((sums[0] + sums[1]) / 7, rel=1e-5)
    assert result.worst_domain == ("a" if result.loss[0] > result.loss[1] else "b")
    assert result.perplexity[0] == pytest.approx(math.exp(result.loss[0]))
    table = result.to_table()
    assert "mean over domains" in table and "worst domain" in table
    assert json.loads(json.dumps(result.to_dict()))["domains"]["a"]["tokens"] == 6


# ----------------------------------------------------------------------------- Hub check
def test_hub_check_offline_names_resource_and_finds_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(HubAccessError, match=r"DKYoon/SlimPajama-6B.*data\.name.*HF_HUB_OFFLINE.*hf download"):
        check_hub_resource("DKYoon/SlimPajama-6B", "dataset", what="data.name")
    snap = tmp_path / "hub" / "models--org--m" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    assert check_hub_resource("org/m", "model") == "cache"
    with pytest.raises(HubAccessError, match="streaming"):
        check_hub_resource("org/d", "dataset", streaming=True)
    assert check_hub_resource(str(tmp_path), "model") == "local"


def test_pile_subsets_are_the_papers_17():
    assert len(PILE_17_SUBSETS) == 17 and len(set(PILE_17_SUBSETS)) == 17
    dropped = {"Books3", "BookCorpus2", "OpenSubtitles", "YoutubeSubtitles"}
    assert not dropped & set(PILE_17_SUBSETS)
