"""Per-domain evaluation equals a hand computation on a tiny model: the shipped `evaluate` module (loaded by
local path, offline), `hf_dograph.evaluation.evaluate_per_domain`, and `card.eval_command`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset

from hf_dograph.card import (
    PAPER_TASKS,
    eval_command,
    lm_eval_scores,
    per_domain_perplexity_path,
    scores_from_lm_eval,
)
from hf_dograph.data import DomainCollator
from hf_dograph.evaluation import evaluate_per_domain

from tiny_models import make_batch, tiny_gpt2

NAMES = ["web", "code", "math"]


def hand_token_losses(model, batch) -> list[list[float]]:
    """Per sequence, −log p(token t+1 | ≤ t) for every predicted (non-padding) token, one at a time."""
    out = []
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.double()
    for i in range(batch["input_ids"].shape[0]):
        losses = []
        for t in range(batch["input_ids"].shape[1] - 1):
            target = int(batch["labels"][i, t + 1])
            if target == -100:
                continue
            log_probs = logits[i, t] - torch.logsumexp(logits[i, t], dim=0)
            losses.append(-float(log_probs[target]))
        out.append(losses)
    return out


def hand_per_domain(token_losses, domains) -> dict:
    per = {}
    for name_id, name in enumerate(NAMES):
        tokens = [x for losses, d in zip(token_losses, domains) if d == name_id for x in losses]
        loss = sum(tokens) / len(tokens)
        per[name] = {"loss": loss, "perplexity": math.exp(loss), "tokens": len(tokens)}
    return per


@pytest.fixture(scope="module")
def tiny_setup():
    model = tiny_gpt2(seed=3).eval()
    batch = make_batch(batch=9, seq=10, seed=7, pad_last=4)  # 3 domains, right padding on some rows
    return model, batch, hand_token_losses(model, batch), batch["domain"].tolist()


def test_evaluate_module_loads_offline_and_equals_hand_computation(tiny_setup):
    import evaluate

    model, batch, token_losses, domains = tiny_setup
    metric = evaluate.load(str(per_domain_perplexity_path()))  # a local path: nothing is fetched
    expected = hand_per_domain(token_losses, domains)

    got = metric.compute(token_losses=token_losses, domains=[NAMES[d] for d in domains])
    for name in NAMES:
        assert got["domains"][name]["tokens"] == expected[name]["tokens"]
        assert got["domains"][name]["loss"] == pytest.approx(expected[name]["loss"], rel=1e-12)
        assert got["domains"][name]["perplexity"] == pytest.approx(expected[name]["perplexity"], rel=1e-12)
    losses = [expected[n]["loss"] for n in NAMES]
    assert got["mean_loss"] == pytest.approx(sum(losses) / 3, rel=1e-12)
    assert got["mean_perplexity"] == pytest.approx(sum(math.exp(x) for x in losses) / 3, rel=1e-12)
    assert got["worst_domain"] == NAMES[losses.index(max(losses))]
    all_tokens = [x for seq in token_losses for x in seq]
    assert got["overall_loss"] == pytest.approx(sum(all_tokens) / len(all_tokens), rel=1e-12)

    # integer labels named by domain_names, and log-probabilities instead of losses: the same numbers
    again = metric.compute(token_losses=[[-x for x in seq] for seq in token_losses], domains=domains,
                           log_probs=True, domain_names=NAMES)
    assert list(again["domains"]) == NAMES  # reported in domain_names' order
    for name in NAMES:
        assert again["domains"][name] == pytest.approx(got["domains"][name], rel=1e-12)


def test_evaluate_per_domain_equals_hand_computation(tiny_setup):
    model, batch, token_losses, domains = tiny_setup
    expected = hand_per_domain(token_losses, domains)
    rows = [{"input_ids": batch["input_ids"][i][batch["attention_mask"][i] == 1].tolist(), "domain": d}
            for i, d in enumerate(domains)]
    result = evaluate_per_domain(model, Dataset.from_list(rows), DomainCollator(pad_token_id=0), NAMES, batch_size=4)
    for i, name in enumerate(NAMES):
        assert result.tokens[i] == expected[name]["tokens"]
        assert result.loss[i] == pytest.approx(expected[name]["loss"], rel=1e-6)  # float32 logits there


def test_eval_command_table_and_json(tmp_path):
    from hf_dograph.data import build_domain_dataset, load_tokenizer

    tok = load_tokenizer("bytes")
    model = tiny_gpt2(vocab=len(tok))
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    data = {"source": "embedded", "embedded_chars": 4000, "seq_len": 32, "validation_fraction": 0.2, "seed": 0}

    table, summary = eval_command(str(tmp_path / "model"), data, batch_size=4, json_path=tmp_path / "eval.json")

    from hf_dograph.data import DataSpec

    built = build_domain_dataset(DataSpec(**data), tok)
    reference = evaluate_per_domain(model.eval(), built.validation, DomainCollator.for_tokenizer(tok),
                                    built.domain_names, batch_size=4).to_dict()
    assert set(summary["domains"]) == set(built.domain_names)
    for name, d in reference["domains"].items():
        assert summary["domains"][name]["tokens"] == d["tokens"]
        if d["tokens"]:
            assert summary["domains"][name]["loss"] == pytest.approx(d["loss"], rel=1e-6)
    assert summary["worst_domain"] == reference["worst_domain"]
    assert json.loads((tmp_path / "eval.json").read_text())["mean_loss"] == pytest.approx(summary["mean_loss"])
    for name in built.domain_names:
        assert name in table
    assert "mean over domains" in table and "worst domain" in table


def test_lm_eval_scores_needs_the_extra(tmp_path):
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r'pip install "hf_dograph\[lm-eval\]"'):
            lm_eval_scores(str(tmp_path))
    else:
        pytest.skip("lm-eval is installed; its missing-extra message cannot be tested")


def test_scores_from_lm_eval_results():
    results = {"results": {
        "hellaswag": {"alias": "hellaswag", "acc,none": 0.30, "acc_stderr,none": 0.01, "acc_norm,none": 0.35},
        "lambada_openai": {"perplexity,none": 40.0, "acc,none": 0.25, "acc_stderr,none": 0.02},
        "copa": {"acc,none": 0.6},
    }}
    scores = scores_from_lm_eval(results, ["hellaswag", "lambada_openai", "copa", "piqa"])
    assert scores == {
        "hellaswag": {"metric": "acc_norm", "value": 0.35},  # acc_norm where available, as the paper
        "lambada_openai": {"metric": "acc", "value": 0.25},
        "copa": {"metric": "acc", "value": 0.6},
    }
    assert len(PAPER_TASKS) == 9
