"""Per-domain evaluation equals a hand computation on a tiny model: the shipped `evaluate` module (loaded by
local path, offline), `hf_dograph.evaluation.evaluate_per_domain`, and `card.eval_command`."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from datasets import Dataset

from hf_dograph.data import DomainCollator
from hf_dograph.evaluation import (
    PAPER_TASKS,
    eval_command,
    evaluate_per_domain,
    lm_eval_scores,
    per_domain_perplexity_path,
    scores_from_lm_eval,
)

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


def test_lm_eval_scores_needs_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if the extra were not installed: import fails
    with pytest.raises(ImportError, match=r'pip install "hf_dograph\[lm-eval\]"'):
        lm_eval_scores(str(tmp_path))


# A local multiple-choice task (no Hub): lm-eval reads it through `include_path`.
LOCAL_TASK = {"name": "dograph_test_sums", "docs": [
    {"question": "2 + 3 =", "choices": ["5", "six", "23"], "label": 0},
    {"question": "4 + 4 =", "choices": ["44", "16", "eight"], "label": 2},
    {"question": "1 + 6 =", "choices": ["7", "16", "seven"], "label": 0},
    {"question": "9 + 0 =", "choices": ["90", "0", "nine"], "label": 2},
    {"question": "5 + 2 =", "choices": ["52", "7", "3"], "label": 1},
]}


def _choice_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """log p(continuation | context), token by token, the way lm-eval scores a choice (byte tokens)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return sum(float(logp[len(ctx) + j - 1, tok]) for j, tok in enumerate(cont))


def test_lm_eval_scores_run_real_lm_eval_on_a_local_task_and_reach_the_card(tmp_path):
    """The [lm-eval] path with the real harness (installed by the dev extra): a checkpoint, a local task,
    scores equal to a hand computation of acc_norm, written where the card picks them up."""
    import lm_eval  # noqa: F401  (the dev extra installs it; this test must not be skipped)
    from transformers import ByT5Tokenizer

    from hf_dograph.card import write_model_card
    from hf_dograph.evaluation import LM_EVAL_FILE

    ckpt = tmp_path / "ckpt"
    model = tiny_gpt2(seed=5, vocab=259).eval()  # ByT5's byte vocabulary: 256 bytes + 3 specials
    tokenizer = ByT5Tokenizer(extra_ids=0)
    model.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "sums.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in LOCAL_TASK["docs"]), encoding="utf-8")
    (tasks / "sums.yaml").write_text(
        f"task: {LOCAL_TASK['name']}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{label}}\"\n"
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n", encoding="utf-8")

    scores = lm_eval_scores(str(ckpt), tasks=[LOCAL_TASK["name"]], include_path=tasks, device="cpu", batch_size=2)

    # By hand: each choice's log-likelihood after the context and lm-eval's " " delimiter; acc_norm divides
    # it by the choice's length in characters.
    hits = []
    for doc in LOCAL_TASK["docs"]:
        ll = [_choice_loglikelihood(model, tokenizer, doc["question"], " " + c) for c in doc["choices"]]
        normed = [x / len(c) for x, c in zip(ll, doc["choices"])]
        hits.append(max(range(len(normed)), key=normed.__getitem__) == doc["label"])
    assert 0 < sum(hits) < len(hits)  # a score that tells right from wrong, not all or nothing
    assert scores == {LOCAL_TASK["name"]: {"metric": "acc_norm", "value": pytest.approx(sum(hits) / len(hits))}}
    assert json.loads((ckpt / LM_EVAL_FILE).read_text())[LOCAL_TASK["name"]]["metric"] == "acc_norm"

    card = write_model_card(ckpt, plots=False).read_text()
    assert LOCAL_TASK["name"] in card and "lm-evaluation-harness" in card


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
