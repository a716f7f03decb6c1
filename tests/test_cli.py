"""The `hf-dograph` command: every recipe smoke-runs offline, the embedded default runs end to end and
its checkpoint reloads, --compare-uniform prints both runs, bad input exits 2 with a named cause."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hf_dograph.cli import main

from conftest import REPO_ROOT

ALL_RECIPES = sorted(p.stem for p in (REPO_ROOT / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("name", ALL_RECIPES)
def test_every_recipe_smoke_runs_offline(name, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", name, "--smoke", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per-domain validation loss" in printed and "arithmetic" in printed
    assert (out / "config.json").is_file() or (out / "adapter_config.json").is_file()
    assert json.loads((out / "domain_names.json").read_text()) == ["prose", "code", "dialogue", "tables", "arithmetic"]


def test_embedded_default_end_to_end_and_checkpoint_reloads(tmp_path, monkeypatch, capsys):
    """`hf-dograph train` with no recipe (shortened), into outputs/tiny under the working directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dograph.data import DomainCollator, build_domain_dataset
    from hf_dograph.evaluation import evaluate_per_domain
    from hf_dograph.recipes import load_recipe

    monkeypatch.chdir(tmp_path)
    short = ["--set", "training.max_steps=4", "--set", "training.per_device_train_batch_size=8",
             "--set", "data.embedded_chars=40000", "--set", "training.logging_steps=2"]
    assert main(["train", *short]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "outputs" / "tiny"
    for expected in ("prose", "arithmetic", "mean over domains", "worst domain", "what DoGraph changed", str(out.name)):
        assert expected in printed
    saved = json.loads((out / "per_domain_eval.json").read_text())
    assert set(saved["per_domain"]["domains"]) == {"prose", "code", "dialogue", "tables", "arithmetic"}
    assert set(saved["dograph_weight_shares"]) == set(saved["per_domain"]["domains"])

    # The checkpoint reloads with plain transformers and gives the same per-domain losses.
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size == 259
    spec = load_recipe(str(out / "recipe.yaml")).data  # the run's own data section, as saved
    assert spec.embedded_chars == 40_000
    data = build_domain_dataset(spec, tok)
    result = evaluate_per_domain(model, data.validation, DomainCollator.for_tokenizer(tok), data.domain_names, batch_size=32)
    for name, loss in zip(result.domain_names, result.loss):
        assert loss == pytest.approx(saved["per_domain"]["domains"][name]["loss"], rel=1e-4)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([tok("1 + 1 = ")["input_ids"]])).logits).all()

    # The DoGraph model card was written beside it.
    assert (out / "README.md").is_file() and "DoGraph" in (out / "README.md").read_text()

    # `hf-dograph eval` on the saved run (its own recipe.yaml by default) prints the same numbers.
    assert main(["eval", str(out), "--batch-size", "32", "--json", str(tmp_path / "eval.json")]) == 0
    assert f"{result.mean_loss:.4f}" in capsys.readouterr().out
    assert json.loads((tmp_path / "eval.json").read_text())["mean_loss"] == pytest.approx(result.mean_loss)


def test_compare_uniform_prints_both(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["train", "tiny", "--smoke", "--compare-uniform", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DoGraph" in printed and "uniform" in printed and "vs uniform" in printed
    assert (out / "config.json").is_file() and (out / "uniform" / "config.json").is_file()
    assert (out / "uniform" / "recipe.yaml").read_text().count("trainer: uniform") == 1


def test_bad_input_exits_2_with_named_cause(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    cases = [
        (["train", "gpt2-small-slimpajama"], "DKYoon/SlimPajama-6B"),
        (["train", "tiny", "--set", "training.learnig_rate=1"], "learnig_rate"),
        (["train", "nope"], "unknown recipe 'nope'"),
        (["train", "tiny", "--set", "data.source=local", "--set", f"data.path={tmp_path}/none.jsonl",
          "--set", "data.label_field=src"], "no such file"),
        (["train", "tiny-uniform-missing"], "Available"),
    ]
    (tmp_path / "x.jsonl").write_text('{"text": "a", "source": "b"}\n')
    cases.append((["train", "tiny", "--set", "data.source=local", "--set", f"data.path={tmp_path}/x.jsonl",
                   "--set", "data.label_field=src"], "label_field='src' not found"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_list_show_and_help(capsys):
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ALL_RECIPES:
        assert name in listed
    assert main(["show", "tinyllama-1.1b-pile", "--smoke", "--set", "training.seed=3"]) == 0
    shown = capsys.readouterr().out
    assert "seed: 3" in shown and "source: embedded" in shown
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--smoke" in capsys.readouterr().out


def test_console_script_runs():
    # The installed package must provide the entry point next to the interpreter running the tests.
    exe = Path(sys.executable).parent / "hf-dograph"
    assert exe.is_file(), f"{exe} missing: install the package with pip install -e ."
    proc = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "tiny" in proc.stdout


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    """`torchrun -m hf_dograph.cli train ...` unchanged: data-parallel on CPUs, one table, one checkpoint."""
    import os

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "hf_dograph.cli", "train", "tiny", "--smoke", "--output-dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("per-domain validation loss") == 1  # printed by rank 0 only
    assert proc.stdout.count("recipe tiny:") == 1
    assert (out / "model.safetensors").is_file() and (out / "per_domain_eval.json").is_file()
    # Two ranks of batch 4 each: 2 steps see 16 sequences, twice a single process's epoch fraction (0.0138).
    import re

    epochs = [float(x) for x in re.findall(r"'epoch': '([0-9.]+)'", proc.stdout + proc.stderr)]
    assert epochs and epochs[-1] > 0.02, epochs
