"""From a parsed recipe to what a run needs: its `TrainingArguments` (a `DoGraphConfig` for DoGraph), its
model (from a config, pretrained, LoRA-wrapped), and the check that its Hub resources can be had.
"""

from __future__ import annotations

import os

from ..config import DoGraphConfig
from ..data.hub import HubAccessError, check_hub_resource
from ..data.tokenizers import OFFLINE_TOKENIZERS
from ..hub import from_pretrained_kwargs
from .spec import ModelSpec, Recipe, RecipeError


def build_training_args(recipe: Recipe, output_dir: str | os.PathLike):
    """`DoGraphConfig` (trainer "dograph") or `TrainingArguments` (trainer "uniform") from the recipe.

    `remove_unused_columns` defaults to False: our collator builds exactly the model's inputs
    (plus the `domain` label DoGraphTrainer strips), and the Trainer must not drop `domain`
    from the raw dataset before the collator sees it.
    """
    from transformers import TrainingArguments

    kwargs = {"remove_unused_columns": False, "report_to": "none", **recipe.training}
    import torch

    if "dataloader_pin_memory" not in recipe.training:
        # Pinned memory only helps host-to-GPU copies; without a GPU torch warns on every run.
        kwargs["dataloader_pin_memory"] = bool(torch.cuda.is_available())
    if "use_cpu" not in recipe.training and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # `torchrun` on a machine without GPUs: the Trainer only goes data-parallel on CPUs with use_cpu
        # (`accelerate launch --cpu` says so itself), else every process would train alone.
        kwargs["use_cpu"] = True
    kwargs["output_dir"] = str(output_dir)
    try:
        if recipe.trainer == "dograph":
            return DoGraphConfig(**kwargs, **recipe.dograph)
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as err:
        raise RecipeError(f"recipe {recipe.name!r}: invalid training settings: {err}") from None


def check_resources(recipe: Recipe) -> None:
    """Fail now, naming the resource, when a Hub model, tokenizer or dataset cannot be had."""
    try:
        if recipe.model.name_or_path:
            repo = from_pretrained_kwargs(recipe.model.name_or_path)["pretrained_model_name_or_path"]
            check_hub_resource(repo, "model", what="model.name_or_path")
        if recipe.tokenizer.name not in OFFLINE_TOKENIZERS:
            check_hub_resource(recipe.tokenizer.name, "model", what="tokenizer.name")
        if recipe.data.source == "hub":
            check_hub_resource(recipe.data.name, "dataset", what="data.name", streaming=recipe.data.streaming)
    except HubAccessError as err:
        raise RecipeError(f"recipe {recipe.name!r}: {err}") from None


def model_config(spec: ModelSpec, tokenizer=None):
    """The `PretrainedConfig` of a `model.config` section; vocab and special ids from the tokenizer."""
    from transformers import AutoConfig

    cfg = dict(spec.config)
    model_type = cfg.pop("model_type")
    if tokenizer is not None:
        cfg.setdefault("vocab_size", len(tokenizer))
        # The model's special ids are the tokenizer's (a byte tokenizer has no BOS: its EOS stands in).
        ids = {
            "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        for key, token_id in ids.items():
            if token_id is not None:
                cfg.setdefault(key, token_id)
    if spec.attn_implementation:
        cfg["attn_implementation"] = spec.attn_implementation
    return AutoConfig.for_model(model_type, **cfg)


def build_model(recipe: Recipe, tokenizer=None):
    """The recipe's causal LM (random init from `model.config`, or pretrained), LoRA-wrapped if asked.

    Raises `RecipeError` when the tokenizer has more tokens than the model's vocabulary.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = recipe.model
    extra = {"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}
    if spec.config is not None:
        model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer))
    else:
        source = from_pretrained_kwargs(spec.name_or_path)  # USER/NAME[@REV][:SUBFOLDER] or a folder
        if spec.from_scratch:
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(**source), **extra)
        else:
            if spec.dtype:
                extra["dtype"] = spec.dtype
            model = AutoModelForCausalLM.from_pretrained(**source, **extra)
    if tokenizer is not None and len(tokenizer) > model.config.vocab_size:
        raise RecipeError(
            f"recipe {recipe.name!r}: the tokenizer has {len(tokenizer)} tokens but model vocab_size is "
            f"{model.config.vocab_size}: raise model.config.vocab_size or drop it (it defaults to the tokenizer's)"
        )
    if spec.lora:
        from peft import LoraConfig, get_peft_model

        try:
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **spec.lora))
        except (ValueError, TypeError) as err:
            raise RecipeError(f"recipe {recipe.name!r}: model.lora: {err}") from None
    return model


def count_parameters_on_meta(recipe: Recipe) -> int:
    """Parameters of the recipe's model, built on the meta device (no memory, no weights).

    Shared (tied) weights count once, as `model.parameters()` yields them once.
    """
    import torch
    from transformers import AutoModelForCausalLM

    if recipe.model.config is None:
        raise RecipeError(f"recipe {recipe.name!r}: counting parameters needs model.config (an architecture)")
    config = model_config(recipe.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())
