"""No secret in any file hf_dograph writes or pushes, no local path in a model card.

The end-to-end test trains twice against the loopback Hub (tests/hub_server.py), with a token given
(1) on the command line, `hf-dograph train --set training.hub_token=... --push-to-hub`, with TensorBoard,
checkpoints pushed during training (hub_strategy=checkpoint) and --compare-uniform, and (2) through a
plain `TrainingArguments(hub_token=...)` handed to `DoGraphTrainer`, pushed with `trainer.push_to_hub()`.
Then it greps the bytes of every file under both output folders (pickles, safetensors, TensorBoard
event files included) and of every file of every commit pushed to the fake Hub. As in test_hub.py the
client runs in a child process (this file run as a script) whose environment points at the server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CLI_TOKEN = "hf_CliSecretTok3nForTestsOnly0123456789"
# Not shaped like a Hugging Face token: only the field name (hub_token) can say it is one.
LIB_TOKEN = "library-secret-Tok3n-5d1f9a"
CLI_REPO = "tester/secret-cli"
LIB_REPO = "tester/secret-lib"


# ============================================================================ the child (client side)
def child(root: Path) -> dict:
    from datasets import Dataset
    from transformers import TrainingArguments

    from hf_dograph import DoGraphTrainer
    from hf_dograph.cli import main
    from hf_dograph.data import load_tokenizer
    from tiny_models import make_batch, rows_from_batch, stack_collator, tiny_gpt2

    code = main([
        "train", "tiny", "--smoke", "--compare-uniform", "--output-dir", str(root / "cli"), "--push-to-hub",
        "--hub-model-id", CLI_REPO, "--set", f"training.hub_token={CLI_TOKEN}",
        "--set", "training.report_to=[tensorboard]", "--set", "training.save_strategy=steps",
        "--set", "training.save_steps=1", "--set", "training.hub_strategy=checkpoint",
    ])
    assert code == 0, code

    rows = rows_from_batch(make_batch(seed=1)) + rows_from_batch(make_batch(seed=2))
    args = TrainingArguments(
        output_dir=str(root / "lib"), max_steps=2, per_device_train_batch_size=8, save_strategy="steps", save_steps=1,
        logging_steps=1, report_to=["tensorboard"], use_cpu=True, disable_tqdm=True, push_to_hub=True,
        hub_model_id=LIB_REPO, hub_token=LIB_TOKEN, hub_strategy="every_save",
    )
    trainer = DoGraphTrainer(model=tiny_gpt2(), args=args, train_dataset=Dataset.from_list(rows),
                             data_collator=stack_collator, processing_class=load_tokenizer("bytes"))
    trainer.train()
    trainer.push_to_hub(commit_message="End of training")
    # the trainer still holds its token (it needs it to upload); only what is written lacks it
    return {"token_in_memory": trainer.args.hub_token == LIB_TOKEN}


# ============================================================================ the parent (test side)
def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def holding(files: dict[str, bytes], secrets: list[str]) -> list[str]:
    return [f"{name}: {s}" for name, data in files.items() for s in secrets if s.encode() in data]


def test_no_token_in_any_written_or_pushed_file(tmp_path):
    from hub_server import FakeHub

    root = tmp_path / "runs"
    with FakeHub() as hub:
        env = hub.client_env(os.environ, home=str(tmp_path / "hf_home"))
        env.update(PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
                   TOKENIZERS_PARALLELISM="false", WANDB_DISABLED="true")
        proc = subprocess.run([sys.executable, str(Path(__file__)), str(root)], env=env, capture_output=True,
                              text=True, timeout=400)
        assert proc.returncode == 0, f"child failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        pushed = {repo: {f"{oid[:7]}/{path}": data for oid, commit in hub.repos[repo].commits.items()
                         for path, data in commit.files.items()} for repo in (CLI_REPO, LIB_REPO)}
        final = {repo: hub.files(repo) for repo in (CLI_REPO, LIB_REPO)}
    assert got["token_in_memory"]
    secrets = [CLI_TOKEN, LIB_TOKEN]

    written = files_under(root)
    # the grep below means something only if the risky files are there
    for name in ("cli/recipe.yaml", "cli/README.md", "cli/training_args.bin", "cli/checkpoint-2/training_args.bin",
                 "lib/training_args.bin", "lib/checkpoint-2/training_args.bin"):
        assert name in written, name
    assert any(n.startswith("cli/runs/") and "tfevents" in n for n in written)
    assert any(n.startswith("lib/runs/") and "tfevents" in n for n in written)
    assert not holding(written, secrets), holding(written, secrets)
    for repo, files in pushed.items():
        assert not holding(files, secrets), (repo, holding(files, secrets))

    # what was pushed is the published model only: no uniform twin, no optimizer states outside last-checkpoint/
    cli_files = final[CLI_REPO]
    for name in ("model.safetensors", "README.md", "recipe.yaml", "dograph_state.json", "training_args.bin"):
        assert name in cli_files, name
    assert (root / "cli" / "uniform" / "checkpoint-1" / "optimizer.pt").is_file()  # there locally...
    assert not [f for f in cli_files if f.startswith("uniform/")]  # ...never pushed
    assert not [f for f in cli_files if f.startswith("checkpoint-") or "/checkpoint-" in f]
    assert not [f for f in cli_files if f.startswith("_") or "/_" in f]  # no lock file
    assert "training.hub_token" not in cli_files["recipe.yaml"].decode() and "hub_token" not in \
        cli_files["recipe.yaml"].decode()

    # training_args.bin still loads, as the original class, with its token removed and the rest intact
    import torch

    for path in (root / "cli" / "training_args.bin", root / "lib" / "checkpoint-2" / "training_args.bin"):
        args = torch.load(path, weights_only=False)
        assert args.hub_token is None and args.push_to_hub and args.max_steps == 2
        assert type(args).__module__ in ("hf_dograph.config", "transformers.training_args")


# ============================================================================ offline: the rules and the card
def test_credential_rule():
    from hf_dograph.redaction import is_credential_key

    for key in ("hub_token", "token", "HF_TOKEN", "auth_token", "authToken", "api_key", "client_secret",
                "password", "wandb_api_key", "aws_secret_access_key", "private_key"):
        assert is_credential_key(key), key
    for key in ("pad_token", "eos_token", "pad_token_id", "include_num_input_tokens_seen", "tokenizer",
                "average_tokens_across_devices", "max_tokens", "name"):
        assert not is_credential_key(key), key


def test_redact_drops_credentials_and_scrubs_text():
    from hf_dograph.redaction import REDACTED, redact, scrub_text

    raw = {"training": {"hub_token": "my-own-secret-123", "learning_rate": 0.1},
           "model": {"config": {"pad_token_id": 0}}, "domains": {"token": {"loss": 1.0}},
           "note": f"pasted {CLI_TOKEN} here"}
    out = redact(raw)
    assert "hub_token" not in out["training"] and out["training"]["learning_rate"] == 0.1
    assert out["model"]["config"]["pad_token_id"] == 0
    assert out["domains"] == {"token": {"loss": 1.0}}  # a results table keyed by a domain called "token" is data
    assert out["note"] == f"pasted {REDACTED} here"
    assert scrub_text("value my-own-secret-123 seen before") == f"value {REDACTED} seen before"
    assert redact(raw, drop=False)["training"]["hub_token"] == REDACTED


def test_strict_json_and_no_secret_in_json(tmp_path):
    from hf_dograph.jsonfiles import write_json

    path = write_json(tmp_path / "x.json", {"loss": float("nan"), "ppl": [1.0, float("inf")], "api_key": "k-12345678"})
    text = path.read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {"loss": None,
                                                                                                  "ppl": [1.0, None]}


def test_card_holds_no_token_nor_local_path(tmp_path, monkeypatch):
    """A recipe.yaml holding a token and local paths (written by hand or by an older version)."""
    from huggingface_hub import ModelCard

    from hf_dograph.card import build_model_card

    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = work / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (out / "recipe.yaml").write_text(
        "name: mine\nmodel:\n  name_or_path: /home/alice/models/my-base\n"
        "tokenizer:\n  name: /home/alice/models/my-base\n"
        f"data:\n  source: local\n  path: /home/alice/corpora/pile/*.jsonl\n  label_field: src\n"
        f"training:\n  hub_token: {LIB_TOKEN}\n  output_dir: {work}/data/out\n  learning_rate: 0.001\n")
    card = str(build_model_card(out, repo_id="me/mine"))
    assert LIB_TOKEN not in card and "hub_token" not in card
    assert "/home/alice" not in card and str(work) not in card
    assert "path: pile/*.jsonl" in card  # the dataset's name...
    assert "name_or_path: my-base" in card  # ...the model's...
    assert "output_dir: data/out" in card  # ...or relative to the working directory
    assert ModelCard(card).data.base_model is None  # a local folder is no Hub base model


def test_saved_recipe_has_no_token_and_home_as_tilde(tmp_path, monkeypatch):
    from hf_dograph.recipes import load_recipe

    monkeypatch.setenv("HOME", str(tmp_path))
    data = tmp_path / "corpus.jsonl"
    data.write_text('{"text": "a", "src": "b"}\n')
    recipe = load_recipe("tiny", [f"training.hub_token={CLI_TOKEN}", "data.source=local", f"data.path={data}",
                                  "data.label_field=src"])
    saved = recipe.to_yaml(for_file=True)
    assert CLI_TOKEN not in saved and "hub_token" not in saved and "path: ~/corpus.jsonl" in saved
    assert CLI_TOKEN not in recipe.to_yaml()  # `hf-dograph show`
    reloaded_path = tmp_path / "recipe.yaml"
    reloaded_path.write_text(saved)
    assert load_recipe(str(reloaded_path)).data.path == "~/corpus.jsonl"  # read back (sources expand ~)


if __name__ == "__main__":  # the child process
    import logging

    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(child(Path(sys.argv[1]))))
