"""FSDP2 on CPU (gloo) through torchrun: two processes with the model sharded by `fully_shard` and B/2 samples
each equal one plain process with B (3 SGD steps; parameters to 1e-5 relative, domain weights to 1e-4), with
gradient accumulation 1 and 2 — at engine level (DoGraph's step written out) and through `DoGraphTrainer` with
`TrainingArguments(fsdp=True, fsdp_config={"version": 2, ...})` (accelerate's FSDP2 preparation; see
`fsdp_worker.enable_cpu_fsdp` for how accelerate is let run FSDP on CPU processes), and under
`accelerate launch --config_file recipes/llama-3.2-3b-pile.accelerate.yml`; then `hf-dograph show` and the refusals."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fsdp_worker import run_name

pytest.importorskip("torch.distributed.fsdp", reason="FSDP2 needs torch >= 2.6")
from torch.distributed.fsdp import fully_shard  # noqa: E402,F401

WORKER = Path(__file__).with_name("fsdp_worker.py")
CONFIGS = [
    {"mode": "engine", "model": "gpt2", "accumulation": 1},
    {"mode": "engine", "model": "gpt2", "accumulation": 2},
    # built before sharding: the engine follows the model onto its shards (as under the Trainer)
    {"mode": "engine", "model": "llama", "accumulation": 1, "engine_before_sharding": True},
    {"mode": "engine", "model": "llama", "accumulation": 2},
    {"mode": "trainer", "model": "gpt2", "accumulation": 1},
    {"mode": "trainer", "model": "llama", "accumulation": 2},
    # a baseline: one ordinary backward of Σ α_i ℓ_i, reduced by FSDP itself (made a sum)
    {"mode": "trainer", "model": "gpt2", "accumulation": 2, "strategy": "loss_reweighting"},
]
# `accelerate launch --config_file recipes/llama-3.2-3b-pile.accelerate.yml` (2 processes, no mixed precision)
ACCELERATE_CONFIG = {"mode": "accelerate", "model": "llama", "accumulation": 2}
LAUNCH_CONFIG = Path(__file__).resolve().parents[1] / "recipes" / "llama-3.2-3b-pile.accelerate.yml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, launcher: str, configs: list[dict]) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = [str(WORKER), str(out), json.dumps({"configs": configs})]
    if launcher == "plain":
        cmd = [sys.executable, *args]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    else:  # the recipe's accelerate config file, as a user launches it; only the GPU count and precision changed
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(LAUNCH_CONFIG),
               "--num_processes=2", "--mixed_precision=no", f"--main_process_port={free_port()}", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory):
    # Two launches, at once (most of their time is start-up): one plain process, and 2 processes by
    # `accelerate launch` with the recipe's config file, in which the engine-level runs shard by hand, the
    # "trainer" runs take FSDP from TrainingArguments(fsdp=..., fsdp_config=...) and the "accelerate" run from the
    # launch (the config file's settings: ACCELERATE_USE_FSDP, FSDP_* in the environment).
    runs = {"plain": CONFIGS + [ACCELERATE_CONFIG], "accelerate": CONFIGS + [ACCELERATE_CONFIG]}
    outs = {name: tmp_path_factory.mktemp(f"fsdp_{name}") for name in runs}
    procs = {name: launch(outs[name], name, configs) for name, configs in runs.items()}
    results = {1: {}, 2: {}}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"{name}: {err[-6000:]}"
            results[1 if name == "plain" else 2].update({p.stem: torch.load(p) for p in outs[name].glob("*.pt")})
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    return results


@pytest.mark.parametrize("cfg", CONFIGS + [ACCELERATE_CONFIG], ids=run_name)
def test_fsdp_two_processes_equal_one(fsdp_runs, cfg):
    name = run_name(cfg)
    one, two = fsdp_runs[1][name], fsdp_runs[2][name]
    assert one["steps"] == two["steps"] == 3
    assert len(one["weights"]) == len(two["weights"])
    if cfg.get("strategy", "dograph") == "dograph":
        assert one["weights"], "the domains never acted: the test would not compare weights"
    for w1, w2 in zip(one["weights"], two["weights"]):
        assert torch.allclose(torch.tensor(w1), torch.tensor(w2), rtol=0, atol=1e-4), (w1, w2)
    # engine level: the sketches of the whole batch (the single-process ones: same projections, same
    # CountSketch) and every sample's weight multiplier v_i, one of each per micro-batch
    if cfg["mode"] == "engine":
        micro_batches = 3 * cfg["accumulation"]
        assert len(one["sketches"]) == len(two["sketches"]) == micro_batches
        assert len(one["multipliers"]) == len(two["multipliers"]) == micro_batches
    for z1, z2 in zip(one.get("sketches", []), two.get("sketches", [])):
        assert torch.allclose(z1, z2, rtol=1e-4, atol=1e-5 * float(z1.abs().max())), float((z1 - z2).abs().max())
    for v1, v2 in zip(one.get("multipliers", []), two.get("multipliers", [])):
        assert torch.allclose(v1, v2, rtol=1e-4, atol=1e-6), (v1, v2)
    assert one["params"].keys() == two["params"].keys()
    for n, p in one["params"].items():
        q = two["params"][n]
        assert q.shape == p.shape, n  # whole values (the worker all-gathers the shards)
        rel = float((p - q).norm() / p.norm().clamp(min=1e-12))
        assert rel <= 1e-5 and torch.allclose(p, q, rtol=1e-5, atol=1e-6), (n, rel)


def test_fsdp_setups_refused_with_the_fix():
    from hf_dograph.config import DoGraphSettings
    from hf_dograph.distributed import DEEPSPEED_REFUSAL, check_fsdp_setup

    v2, v1 = SimpleNamespace(fsdp_version=2), SimpleNamespace(fsdp_version=1)
    check_fsdp_setup(v2, DoGraphSettings())  # the default (factored engine): accepted
    check_fsdp_setup(v2, DoGraphSettings(mixing_strategy="uniform", grad_engine="opacus"))  # no sketches needed
    with pytest.raises(NotImplementedError, match="FSDP2.*version"):
        check_fsdp_setup(v1, DoGraphSettings())
    with pytest.raises(NotImplementedError, match="grad_engine='factored'"):
        check_fsdp_setup(v2, DoGraphSettings(grad_engine="opacus"))
    assert "FSDP2" in DEEPSPEED_REFUSAL and "recipes/llama-3.2-3b-pile.accelerate.yml" in DEEPSPEED_REFUSAL


def test_fsdp_launch_config_shown_for_llama_recipes_and_their_twins(capsys):
    from hf_dograph.cli import main
    from hf_dograph.distributed import launch_config_path

    for name in ("llama-3.2-3b-pile", "llama-3.2-3b-pile-uniform"):
        assert launch_config_path(name) == LAUNCH_CONFIG
    assert launch_config_path("tinyllama-1.1b-pile-uniform").name == "tinyllama-1.1b-pile.accelerate.yml"
    assert launch_config_path("tiny") is None
    assert main(["show", "llama-3.2-3b-pile-uniform"]) == 0
    shown = capsys.readouterr().out
    assert "accelerate launch --config_file" in shown and "llama-3.2-3b-pile.accelerate.yml" in shown
    assert "#     fsdp_version: 2" in shown
    import yaml

    assert yaml.safe_load(shown)["name"] == "llama-3.2-3b-pile-uniform"  # still a valid recipe
