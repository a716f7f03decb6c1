"""What a run writes and publishes: strict JSON (no bare NaN), only the published model in a push, --smoke
outputs in a fresh private temporary folder (never through a planted symlink)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile

import pytest

from hf_dograph.cli import main


def strict_load(path):
    """json.loads that refuses NaN / Infinity, as every JSON parser outside Python does."""
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path} holds the non-JSON {c}"))


def test_smoke_goes_to_a_fresh_private_temp_dir_and_per_domain_json_is_strict(tmp_path, monkeypatch, capsys):
    """One run checks both: --smoke without --output-dir, and a validation split without tokens (all NaN)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # $TMPDIR for this process
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "hf-dograph-smoke").symlink_to(victim)  # the fixed path the old --smoke wrote to
    assert main(["train", "tiny", "--smoke", "--set", "data.max_validation_sequences_per_domain=0"]) == 0
    printed = capsys.readouterr().out
    assert list(victim.iterdir()) == []  # nothing went through the symlink
    out = type(tmp_path)(re.search(r"saved: (\S+) \(", printed)[1])
    assert out.parent == tmp_path and out.name.startswith("hf-dograph-smoke-tiny-")
    assert not out.is_symlink() and stat.S_IMODE(out.stat().st_mode) == 0o700
    assert (out / "model.safetensors").is_file()

    saved = strict_load(out / "per_domain_eval.json")  # every loss is NaN: written as null
    assert {d["loss"] for d in saved["per_domain"]["domains"].values()} == {None}
    assert saved["per_domain"]["mean_loss"] is None
    strict_load(out / "domain_names.json")


def test_shared_smoke_folder_refuses_a_planted_symlink(tmp_path, monkeypatch):
    """Under a launcher the processes share one folder named after the launch: made 0700, never followed."""
    from hf_dograph.run_folder import RunFolderError, private_temp_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = private_temp_dir("smoke-", shared_key="run-1")
    assert path == tmp_path / f"smoke-{os.getuid()}-run-1" and stat.S_IMODE(path.stat().st_mode) == 0o700
    assert private_temp_dir("smoke-", shared_key="run-1") == path  # the other processes find it
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / f"smoke-{os.getuid()}-run-2").symlink_to(victim)
    with pytest.raises(RunFolderError, match="not a private folder"):
        private_temp_dir("smoke-", shared_key="run-2")
    open_dir = tmp_path / f"smoke-{os.getuid()}-run-3"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    with pytest.raises(RunFolderError, match="open to others"):
        private_temp_dir("smoke-", shared_key="run-3")


def test_per_domain_result_saves_strict_json(tmp_path):
    from hf_dograph.evaluation import PerDomainResult

    result = PerDomainResult(["a", "b"], [1.0, float("nan")], [10, 0])
    result.save(tmp_path / "r.json")
    saved = strict_load(tmp_path / "r.json")
    assert saved["domains"]["b"] == {"loss": None, "perplexity": None, "tokens": 0}
    assert math.isclose(saved["domains"]["a"]["perplexity"], math.e) and saved["worst_domain"] == "a"


def test_push_leaves_out_nested_runs_checkpoints_and_private_files(tmp_path):
    """What `hf-dograph push` and `--push-to-hub` upload of a --compare-uniform run folder."""
    from huggingface_hub.utils import filter_repo_objects

    from hf_dograph.publish import push_ignore_patterns

    out = tmp_path / "run"
    files = ["model.safetensors", "config.json", "README.md", "recipe.yaml", "dograph_state.json", "training_args.bin",
             "dograph_plots/domain_weights.png", "runs/Dec01/events.out.tfevents.1", "_hf_dograph.lock",
             "checkpoint-2/optimizer.pt", "last-checkpoint/optimizer.pt", ".per_domain_eval.json.123.tmp",
             "uniform/model.safetensors", "uniform/config.json", "uniform/checkpoint-2/optimizer.pt",
             "uniform/checkpoint-2/trainer_state.json"]
    for name in files:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(b"x")
    pushed = set(filter_repo_objects(files, ignore_patterns=push_ignore_patterns(out)))
    assert pushed == {"model.safetensors", "config.json", "README.md", "recipe.yaml", "dograph_state.json",
                      "training_args.bin", "dograph_plots/domain_weights.png", "runs/Dec01/events.out.tfevents.1",
                      "last-checkpoint/optimizer.pt"}
    with_checkpoints = set(filter_repo_objects(files, ignore_patterns=push_ignore_patterns(out, include_checkpoints=True)))
    assert with_checkpoints == pushed | {"checkpoint-2/optimizer.pt"}
