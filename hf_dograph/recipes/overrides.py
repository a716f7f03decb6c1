"""A raw recipe changed before it is parsed: `--set section.key=value` overrides, and `--smoke`, any recipe
shrunk to run in seconds.
"""

from __future__ import annotations

import copy
import difflib
from typing import Any

import yaml

from .spec import TOP_LEVEL_KEYS, RecipeError, section_fields


def parse_override(item: str) -> tuple[list[str], Any]:
    """`"training.learning_rate=1e-3"` → (["training", "learning_rate"], 0.001); values are YAML."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value (e.g. training.learning_rate=3e-4)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {item!r}: the key is empty")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set key=value` items to a raw recipe. A key without a section
    (`learning_rate=1e-3`) goes to the one section that has such a field."""
    out = copy.deepcopy(raw)
    fields = section_fields()
    for item in overrides or ():
        keys, value = parse_override(item)
        if keys[0] not in TOP_LEVEL_KEYS:
            owners = [s for s, names in fields.items() if keys[0] in names]
            if len(owners) == 1:
                keys = [owners[0]] + keys
            elif len(owners) > 1:
                raise RecipeError(f"--set {item!r}: {keys[0]!r} is in sections {owners}: write e.g. {owners[0]}.{keys[0]}")
            else:
                every = [f"{s}.{n}" for s, names in fields.items() for n in names] + list(TOP_LEVEL_KEYS)
                close = difflib.get_close_matches(keys[0], every, n=3) + difflib.get_close_matches(
                    ".".join(keys), every, n=3
                )
                hint = f" Did you mean {', '.join(dict.fromkeys(close))}?" if close else ""
                raise RecipeError(f"--set {item!r}: unknown key {'.'.join(keys)!r}.{hint}")
        node = out
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise RecipeError(f"--set {item!r}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return out


SMOKE_HELP = (
    "the same recipe shrunk to run anywhere in seconds: the model keeps its family (GPT-2, "
    "LLaMA, LoRA on top) at 2 layers x 64, the tokenizer becomes 'bytes', the data the embedded corpus "
    "(20k characters, sequences of 32), training 2 steps of batch 4 in fp32 with no checkpoints or "
    "evaluation during training, DoGraph m <= 3 and k = 16. Outputs go to a temporary folder unless "
    "--output-dir is given. For checking that a recipe is wired right, not for results."
)


def _model_family(model: dict) -> str:
    cfg = model.get("config") or {}
    if cfg.get("model_type"):
        return str(cfg["model_type"])
    name = str(model.get("name_or_path") or "").lower()
    return "llama" if "llama" in name else "gpt2"


_TINY_CONFIGS = {
    "gpt2": {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 64},
    "llama": {
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 64,
    },
}


def smoke_raw(raw: dict) -> dict:
    """The `--smoke` version of a raw recipe (see `SMOKE_HELP`)."""
    out = copy.deepcopy(raw)
    model = dict(out.get("model") or {})
    family = _model_family(model)
    if family not in _TINY_CONFIGS:
        raise RecipeError(f"--smoke knows GPT-2 and LLaMA models, not model_type {family!r}")
    cfg = {"model_type": family, **_TINY_CONFIGS[family]}
    old = model.get("config") or {}
    if "tie_word_embeddings" in old:
        cfg["tie_word_embeddings"] = old["tie_word_embeddings"]
    smoke_model = {"config": cfg}
    if model.get("lora"):
        smoke_model["lora"] = model["lora"]
    out["model"] = smoke_model
    out["tokenizer"] = {"name": "bytes"}
    out["data"] = {"source": "embedded", "embedded_chars": 20_000, "seq_len": 32, "validation_fraction": 0.1}
    dograph = dict(out.get("dograph") or {})
    dograph["num_domains"] = min(int(dograph.get("num_domains", 11)), 3)
    dograph["projection_dim"] = 16
    dograph["kmeans_n_init"] = 1
    out["dograph"] = dograph
    training = dict(out.get("training") or {})
    for key in ("output_dir", "logging_dir", "resume_from_checkpoint", "hub_model_id", "deepspeed", "fsdp", "fsdp_config"):
        training.pop(key, None)
    training.update(
        max_steps=2, per_device_train_batch_size=4, per_device_eval_batch_size=4, gradient_accumulation_steps=1,
        warmup_steps=0, logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", bf16=False,
        fp16=False, dataloader_num_workers=0, torch_compile=False, push_to_hub=False,
    )
    for key in ("gradient_checkpointing", "activation_checkpointing"):
        training.pop(key, None)
    out["training"] = training
    return out
