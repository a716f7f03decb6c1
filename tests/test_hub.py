"""Hub round trip against a loopback fake Hub (tests/hub_server.py): push with `trainer.push_to_hub()`
and `hub.push_output_dir`, pull with `from_pretrained`, resume from a pushed checkpoint, and the card.

huggingface_hub and transformers read HF_ENDPOINT / HF_HUB_OFFLINE when they are imported, and this
test session is offline (conftest.py). So the client side runs in a child process (this file run as a
script) whose environment points at the loopback server; the server and the checks run here.
A test against the real Hub runs only when HF_TOKEN is set.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = "tester/tiny-dograph"
CLI_REPO = "tester/pushed-by-cli"
DOMAINS = ["web", "code", "math"]


# ============================================================================ the child (client side)
def child(out: Path, repo: str, cli_repo: str | None) -> dict:
    """Train, push, pull back, resume from the pushed checkpoint; returns what the parent checks."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dograph import DoGraphConfig, DoGraphTrainer
    from hf_dograph.data import DomainCollator, load_tokenizer
    from hf_dograph.evaluation import evaluate_per_domain
    from hf_dograph.hub import resolve_checkpoint, resolve_model
    from tiny_models import make_batch, rows_from_batch, tiny_gpt2

    tokenizer = load_tokenizer("bytes")  # 259 tokens, built locally
    vocab = len(tokenizer)

    def rows(seed):
        return [{"input_ids": r["input_ids"], "domain": r["domain"]}
                for r in rows_from_batch(make_batch(seed=seed, vocab=vocab, pad_last=0))]

    train, val = Dataset.from_list(rows(1) + rows(2)), Dataset.from_list(rows(3))
    collator = DomainCollator.for_tokenizer(tokenizer, keep_domain=True)

    def args(output_dir, max_steps, push):
        return DoGraphConfig(
            output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=2,
            per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-2, use_cpu=True, seed=0,
            report_to=[], disable_tqdm=True, num_domains=3, projection_dim=32, domain_warmup_samples=8,
            push_to_hub=push, hub_model_id=repo,
            hub_token=os.environ.get("HF_TOKEN") or "hf_loopback_not_a_real_token", hub_strategy="checkpoint",
            hub_private_repo=True,
        )

    out.mkdir(parents=True, exist_ok=True)
    (out / "domain_names.json").write_text(json.dumps(DOMAINS))  # as `hf-dograph train` writes it
    trainer = DoGraphTrainer(model=tiny_gpt2(vocab=vocab), args=args(out, 2, True), train_dataset=train,
                             eval_dataset=val, data_collator=collator, processing_class=tokenizer)
    trainer.train()
    trainer.push_to_hub(commit_message="End of training", finetuned_from="tester/tiny-base",
                        dataset="tester/tiny-domains")

    # pull: a fresh cache (HF_HOME is private to this process) and from_pretrained of the repo id
    pulled = AutoModelForCausalLM.from_pretrained(repo).eval()
    pulled_tok = AutoTokenizer.from_pretrained(repo)
    batch = make_batch(seed=5, vocab=vocab)
    model = trainer.model.eval()
    with torch.no_grad():
        mine = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        theirs = pulled(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    text = "DoGraph mixes domains."
    pulled_per_domain = evaluate_per_domain(pulled, val, collator, DOMAINS, batch_size=8).to_dict()

    # resume from the pushed checkpoint (no subfolder given: last-checkpoint/ is found), one more step
    checkpoint = resolve_checkpoint(repo)
    resumed = DoGraphTrainer(model=tiny_gpt2(vocab=vocab), args=args(out.parent / "resumed", 3, False),
                             train_dataset=train, data_collator=collator, processing_class=tokenizer)
    resumed.dograph_write_plots = False
    resumed.train(resume_from_checkpoint=repo)

    result = {
        "logits_max_abs_diff": float((mine - theirs).abs().max()),
        "logits_shape": list(mine.shape),
        "tokenizer_same": pulled_tok(text)["input_ids"] == tokenizer(text)["input_ids"],
        "pulled_per_domain": pulled_per_domain,
        "checkpoint": Path(checkpoint).name,
        "resumed_steps": resumed.state.global_step,
        "resumed_history_head": resumed.dograph_history[:2],
        "trained_history": trainer.dograph_history,
    }
    if cli_repo:  # the command line, as a user types it: hf-dograph push OUT --repo-id ... --private
        from hf_dograph.cli import main as cli_main

        code = cli_main(["push", str(out), "--repo-id", cli_repo, "--private", "--token", "hf_loopback_not_a_real_token"])
        assert code in (0, None), code
        local = Path(resolve_model(cli_repo))
        result["cli_files"] = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    return result


# ============================================================================ the parent (test side)
def run_child(hub_env: dict, out: Path, repo: str, cli_repo: str | None, timeout: int = 240) -> dict:
    env = dict(hub_env, PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
    proc = subprocess.run([sys.executable, str(Path(__file__)), str(out), repo, cli_repo or ""], env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_card(content: str, pulled_per_domain: dict, base_model: str | None, dataset: str | None) -> None:
    from huggingface_hub import ModelCard

    card = ModelCard(content)  # parses the YAML metadata; raises if it is invalid
    data = card.data
    assert data.library_name == "transformers"
    assert {"dograph", "data-mixing"} <= set(data.tags)
    assert data.base_model == base_model
    assert data.datasets == ([dataset] if dataset else None)
    results = {r.metric_name: r for r in data.eval_results}
    for name in DOMAINS:
        r = results[f"perplexity ({name})"]
        assert r.task_type == "text-generation" and r.metric_type == "perplexity"
        # the card's numbers are the pulled model's: evaluated on the same validation set
        assert math.isclose(r.metric_value, pulled_per_domain["domains"][name]["perplexity"], abs_tol=1e-3)
    assert "perplexity (mean over domains)" in results
    assert any(k.startswith("perplexity (worst domain") for k in results)
    body = card.text
    for needle in ("arxiv.org/abs/2604.07963", "## DoGraph settings", "`uncertainty`",
                   "dograph_plots/domain_weights.png",
                   "## Results per domain", "from_pretrained", "@article", "normalized mutual information",
                   # the weight plot's caption describes the persistent-domain figure the run drew
                   "weight of each persistent model-perceived domain", "relative to uniform mixing"):
        assert needle in body, needle


def test_push_and_pull_through_loopback_hub(tmp_path):
    from hub_server import FakeHub

    with FakeHub() as hub:
        env = hub.client_env(os.environ, home=str(tmp_path / "hf_home"))
        got = run_child(env, tmp_path / "run", REPO, CLI_REPO)
        files = hub.files(REPO)
        cli_files = hub.files(CLI_REPO)
        assert hub.unhandled == [], hub.unhandled  # the client used only the routes the fake implements
    # everything the model needs, the card and DoGraph's state, at the root...
    for name in ("model.safetensors", "config.json", "tokenizer_config.json", "README.md", "dograph_state.json",
                 "dograph_plots/domain_weights.png", "dograph_plots/domain_graph.png",
                 "dograph_plots/domain_heatmap.png"):
        assert name in files, name
    # ...and the checkpoint pushed by hub_strategy="checkpoint", with DoGraph's state in it
    for name in ("trainer_state.json", "optimizer.pt", "dograph_state.json", "model.safetensors"):
        assert f"last-checkpoint/{name}" in files, name
    assert not any(f.startswith("checkpoint-") for f in files)
    assert files["dograph_plots/domain_weights.png"][:8] == b"\x89PNG\r\n\x1a\n"
    state = json.loads(files["dograph_state.json"])
    assert state["global_step"] == 2 and len(state["history"]) == 2
    assert state["settings"]["num_domains"] == 3 and state["settings"]["projection_dim"] == 32

    assert got["logits_max_abs_diff"] == 0.0 and got["logits_shape"][-1] == 259
    assert got["tokenizer_same"]
    check_card(files["README.md"].decode(), got["pulled_per_domain"], "tester/tiny-base", "tester/tiny-domains")

    # resume from the Hub: last-checkpoint was found, DoGraph's history continued from it
    assert got["checkpoint"] == "last-checkpoint" and got["resumed_steps"] == 3
    assert got["resumed_history_head"] == got["trained_history"]

    # `hf-dograph push` path: the same folder, its card regenerated (no base model given this time)
    assert "README.md" in cli_files and "dograph_state.json" in cli_files
    assert not any(f.startswith("checkpoint-") for f in got["cli_files"])
    from huggingface_hub import ModelCard

    cli_card = ModelCard(cli_files["README.md"].decode())
    assert cli_card.data.library_name == "transformers" and "dograph" in cli_card.data.tags
    assert "model.safetensors" in got["cli_files"]


# ============================================================================ offline: card and references
def test_packaged_template_is_the_repository_template():
    """model_cards/ is the source of truth; the wheel ships hf_dograph/templates/, which must be identical."""
    from hf_dograph import card

    source = HERE.parent / "model_cards" / card.TEMPLATE_NAME
    packaged = HERE.parent / "hf_dograph" / "templates" / card.TEMPLATE_NAME
    assert source.read_bytes() == packaged.read_bytes(), "copy model_cards/ to hf_dograph/templates/"
    assert card.template_path() == source.resolve()


def write_run_folder(out: Path, adapter: bool = False) -> None:
    """What `hf-dograph train` leaves behind, written by hand (no model needed for the card)."""
    from hf_dograph.checkpointing import STATE_FORMAT, STATE_VERSION
    from hf_dograph.config import DoGraphSettings

    out.mkdir(parents=True)
    history = [{"step": s, "domain_weights": [0.5, 0.3, 0.2], "cluster_sizes": [3, 3, 2], "nmi": 0.5 + 0.1 * s,
                "human_mass": {"0": 0.5, "1": 0.3, "2": 0.2}, "human_share": {"0": 0.25, "1": 0.5, "2": 0.25}}
               for s in range(3)]
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "global_step": 3, "micro_step": [2, 0],
             "settings": DoGraphSettings(num_domains=11, objective="robust", graph_lambda=0.5).to_dict(),
             "projection_seed": 0, "domain_finder": {}, "group_dro": None, "history": history,
             "last_step": {"domain_weights": [0.5, 0.3, 0.2], "cluster_sizes": [3, 3, 2],
                           "contingency": [[2, 1, 0], [0, 3, 0], [0, 0, 2]]}}
    (out / "dograph_state.json").write_text(json.dumps(state))
    (out / "domain_names.json").write_text(json.dumps(DOMAINS))
    (out / "recipe.yaml").write_text(
        "name: gpt2-small-slimpajama\nmodel:\n  name_or_path: openai-community/gpt2\n"
        "data:\n  source: hub\n  name: DKYoon/SlimPajama-6B\ntraining:\n  learning_rate: 0.0005\n")
    per_domain = {"domains": {n: {"loss": 1.0 + i, "perplexity": math.exp(1.0 + i), "tokens": 10}
                              for i, n in enumerate(DOMAINS)},
                  "mean_loss": 2.0, "mean_perplexity": sum(math.exp(1.0 + i) for i in range(3)) / 3,
                  "worst_domain": "math"}
    (out / "per_domain_eval.json").write_text(json.dumps({"per_domain": per_domain, "data": {}}))
    (out / "lm_eval_results.json").write_text(json.dumps({"hellaswag": {"metric": "acc_norm", "value": 0.31},
                                                          "piqa": {"metric": "acc_norm", "value": 0.6}}))
    if adapter:
        (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                             "base_model_name_or_path": "openai-community/gpt2"}))
    else:
        (out / "config.json").write_text(json.dumps({"model_type": "gpt2"}))


def test_card_from_run_folder(tmp_path):
    from huggingface_hub import ModelCard

    from hf_dograph.card import write_model_card

    write_run_folder(tmp_path / "run")
    path = write_model_card(tmp_path / "run", repo_id="me/gpt2-dograph")
    card = ModelCard.load(path)
    assert card.data.library_name == "transformers"
    assert card.data.datasets == ["DKYoon/SlimPajama-6B"]  # from the recipe's Hub dataset
    assert card.data.base_model == "openai-community/gpt2"  # the recipe fine-tunes it
    results = {r.metric_name or r.metric_type: r for r in card.data.eval_results}
    assert results["perplexity (math)"].metric_value == pytest.approx(math.exp(3.0), abs=1e-4)
    assert results["perplexity (worst domain: math)"].dataset_type == "DKYoon/SlimPajama-6B"
    assert results["acc_norm"].dataset_type in ("hellaswag", "piqa")  # lm-eval scores are in the model-index too
    body = card.text
    assert "name: gpt2-small-slimpajama" in body  # the recipe, verbatim
    assert "| objective | `robust` |" in body and "| graph term λ | 0.5 |" in body
    assert "| hellaswag | acc_norm | 31.0 |" in body and "| **average** | | 45.5 |" in body
    assert "mean **0.600**" in body  # NMI averaged over the history
    assert "| code | 0.500 | 0.300 | 0.60 |" in body  # share of samples vs share of DoGraph weight
    for name in ("domain_weights", "domain_graph", "domain_heatmap"):
        assert (tmp_path / "run" / "dograph_plots" / f"{name}.png").is_file()
        assert f"dograph_plots/{name}.png" in body


def test_card_of_a_lora_adapter(tmp_path):
    from huggingface_hub import ModelCard

    from hf_dograph.card import build_model_card

    write_run_folder(tmp_path / "run", adapter=True)
    card = ModelCard(str(build_model_card(tmp_path / "run", repo_id="me/gpt2-lora-dograph")))
    assert card.data.library_name == "peft" and card.data.base_model == "openai-community/gpt2"
    assert {"dograph", "data-mixing", "peft"} <= set(card.data.tags)
    assert "AutoPeftModelForCausalLM" in card.text and "LoRA adapter" in card.text


def test_hub_references(tmp_path):
    from hf_dograph.hub import (
        HubRef,
        HubReferenceError,
        from_pretrained_kwargs,
        parse_hub_reference,
        resolve_checkpoint,
    )

    assert parse_hub_reference("me/model") == HubRef("me/model")
    assert parse_hub_reference("me/model@v1:last-checkpoint") == HubRef("me/model", "v1", "last-checkpoint")
    assert parse_hub_reference("hf://me/model:runs/checkpoint-5/") == HubRef("me/model", None, "runs/checkpoint-5")
    assert str(HubRef("me/model", "main", "ckpt")) == "me/model@main:ckpt"
    assert from_pretrained_kwargs("me/model@dev:sub") == {"pretrained_model_name_or_path": "me/model",
                                                          "revision": "dev", "subfolder": "sub"}
    assert from_pretrained_kwargs(str(tmp_path)) == {"pretrained_model_name_or_path": str(tmp_path)}
    assert resolve_checkpoint(str(tmp_path)) == str(tmp_path)  # a folder is never looked up on the Hub
    with pytest.raises(HubReferenceError, match="USER/NAME"):
        resolve_checkpoint("not/a/valid/ref")


@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="real-Hub test: set HF_TOKEN to run it")
def test_push_and_pull_real_hub(tmp_path):
    """Same round trip against huggingface.co, in a private repo deleted afterwards."""
    import uuid

    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"))
    env.pop("HF_ENDPOINT", None)
    whoami = subprocess.run(
        [sys.executable, "-c", "from huggingface_hub import whoami; print(whoami()['name'])"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    ).stdout.strip()
    repo = f"{whoami}/hf-dograph-test-{uuid.uuid4().hex[:8]}"
    try:
        got = run_child(env, tmp_path / "run", repo, None, timeout=600)
        assert got["logits_max_abs_diff"] == 0.0 and got["tokenizer_same"]
        assert got["checkpoint"] == "last-checkpoint" and got["resumed_steps"] == 3
    finally:
        subprocess.run([sys.executable, "-c", f"from huggingface_hub import delete_repo; delete_repo({repo!r}, "
                        "missing_ok=True)"], env=env, timeout=60)


if __name__ == "__main__":  # the child process
    import logging

    logging.basicConfig(level=logging.ERROR)
    _out, _repo, _cli = sys.argv[1], sys.argv[2], sys.argv[3] or None
    print(json.dumps(child(Path(_out), _repo, _cli)))
