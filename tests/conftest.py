"""Shared test set-up: never touch the Hub; small generic fixtures."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# Before anything imports huggingface_hub / transformers / datasets: tests run offline.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_name] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# CI has ../shared beside the clone; a developer checkout has it at the same place.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_benchmark(name: str):
    """The script `benchmarks/<name>.py` as a module (benchmarks are scripts, not a package). `benchmarks/` goes
    on sys.path first, since several import their helpers from `step_cost`; the module is registered in
    sys.modules, which dataclasses defined in it need."""
    folder = REPO_ROOT / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def redpajama_dir() -> Path:
    """The RedPajama sample (one folder per domain); the test is skipped where it is absent."""
    path = SHARED_DATA / "redpajama_sample"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path}")
    return path


@pytest.fixture
def tiny_gpt2_config():
    """Factory of tiny GPT-2 configs (no Hub): tiny_gpt2_config(vocab_size=259, n_layer=1, ...)."""
    from transformers import GPT2Config

    def make(vocab_size: int = 259, **overrides) -> GPT2Config:
        values = dict(
            vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2,
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0,
        )
        values.update(overrides)
        return GPT2Config(**values)

    return make
