"""A raw recipe validated into a `Recipe` (every key checked against the dataclass it fills, every value
against its field's type, before any training), and a recipe loaded by name or path.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
import types
import typing
from pathlib import Path
from typing import Any

from ..config import DoGraphConfig, DoGraphSettings
from ..data.spec import DataError, DataSpec
from .build import build_training_args
from .files import embedded_default_raw, find_recipe, read_yaml, resolve_extends
from .overrides import apply_overrides, smoke_raw
from .spec import (
    DEFAULT_RECIPE,
    TOP_LEVEL_KEYS,
    TRAINERS,
    ModelSpec,
    Recipe,
    RecipeError,
    TokenizerSpec,
    training_fields,
)


def _unknown_key(recipe: str, section: str, key: str, valid: list[str]) -> RecipeError:
    close = difflib.get_close_matches(str(key), valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    where = f"{section}.{key}" if section else str(key)
    return RecipeError(f"recipe {recipe!r}: unknown key {where!r} in section '{section or 'top level'}'.{hint}")


def _check_keys(recipe: str, section: str, values: dict, valid: list[str]) -> None:
    if not isinstance(values, dict):
        raise RecipeError(f"recipe {recipe!r}: section {section!r} must be a mapping, got {type(values).__name__}")
    for key in values:
        if key not in valid:
            raise _unknown_key(recipe, section, key, valid)


def _simple_types(hint) -> tuple[set, bool]:
    """The plain types a type hint allows (bool/int/float/str/list/dict) and whether None is allowed."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    allowed, optional = set(), False
    for a in args:
        if a is type(None):
            optional = True
            continue
        origin = typing.get_origin(a) or a
        if origin in (bool, int, float, str, list, dict):
            allowed.add(origin)
        elif inspect.isclass(origin) and issubclass(origin, str):  # str enums (IntervalStrategy...)
            allowed.add(str)
        else:
            allowed.add(object)
    return allowed, optional


def _coerce(recipe: str, where: str, value: Any, hint) -> Any:
    """Check `value` against the field's type (YAML reads `5e-4` as a string: make it a float)."""
    allowed, optional = _simple_types(hint)
    if value is None:
        if optional or object in allowed:
            return None
        raise RecipeError(f"recipe {recipe!r}: {where} cannot be null")
    if object in allowed:
        return value
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif isinstance(value, int) and (int in allowed or float in allowed):
        return value
    elif isinstance(value, float) and float in allowed:
        return value
    elif isinstance(value, float) and int in allowed and value.is_integer():
        return int(value)
    elif isinstance(value, str):
        if str in allowed:
            return value
        for kind in (int, float):
            if kind in allowed:
                try:
                    return kind(value)
                except ValueError:
                    pass
        if bool in allowed and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif isinstance(value, (list, tuple)) and list in allowed:
        return list(value)
    elif isinstance(value, dict) and dict in allowed:
        return value
    elif isinstance(value, (list, dict)) and str in allowed:
        pass
    expected = " or ".join(sorted(t.__name__ for t in allowed)) + (" or null" if optional else "")
    raise RecipeError(f"recipe {recipe!r}: {where}={value!r} has the wrong type: expected {expected}")


def _auto_precision(key: str, value: Any) -> Any:
    """bf16/fp16 "auto": on when a GPU supports it (so one recipe runs on GPUs and CPUs)."""
    if value != "auto":
        return value
    import torch

    if not torch.cuda.is_available():
        return False
    if key == "bf16":
        return bool(torch.cuda.is_bf16_supported())
    return not torch.cuda.is_bf16_supported()  # fp16 only where bf16 is not available


def _check_model(recipe: str, model: dict) -> ModelSpec:
    _check_keys(recipe, "model", model, [f.name for f in dataclasses.fields(ModelSpec)])
    spec = ModelSpec(**model)
    if bool(spec.config) == bool(spec.name_or_path):
        raise RecipeError(
            f"recipe {recipe!r}: the model section needs exactly one of model.config (an architecture, trained "
            "from scratch) or model.name_or_path (pretrained weights)"
        )
    if spec.config is not None:
        check_model_config(recipe, spec.config)
    if spec.lora is not None:
        if not isinstance(spec.lora, dict):
            raise RecipeError(f"recipe {recipe!r}: model.lora must be a mapping of peft.LoraConfig fields")
        from peft import LoraConfig

        valid = [f.name for f in dataclasses.fields(LoraConfig) if f.init and f.name != "task_type"]
        for key in spec.lora:
            if key not in valid:
                raise _unknown_key(recipe, "model.lora", key, valid)
    return spec


def check_model_config(recipe: str, config: dict) -> None:
    """Every key of `model.config` must be a field of the model type's config class."""
    from transformers import CONFIG_MAPPING

    if not isinstance(config, dict) or "model_type" not in config:
        raise RecipeError(f"recipe {recipe!r}: model.config needs a model_type (e.g. gpt2, llama)")
    model_type = config["model_type"]
    if model_type not in CONFIG_MAPPING:
        close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise RecipeError(f"recipe {recipe!r}: model.config.model_type={model_type!r} is unknown.{hint}")
    cls = CONFIG_MAPPING[model_type]
    valid = ["model_type"] + [f.name for f in dataclasses.fields(cls)] + list(getattr(cls, "attribute_map", {}))
    for key in config:
        if key not in valid:
            raise _unknown_key(recipe, "model.config", key, valid)


def parse_recipe(raw: dict, name: str, path: Path | None = None) -> Recipe:
    """Validate a raw (merged) recipe and build a `Recipe`; raises `RecipeError` naming the key."""
    raw = copy.deepcopy(raw)
    recipe = str(raw.get("name") or name)
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise _unknown_key(recipe, "", key, list(TOP_LEVEL_KEYS))
    trainer = raw.get("trainer", "dograph")
    if trainer not in TRAINERS:
        raise RecipeError(f"recipe {recipe!r}: trainer={trainer!r} is unknown: use one of {', '.join(TRAINERS)}")
    if not raw.get("model"):
        raise RecipeError(f"recipe {recipe!r}: the model section is missing")
    model = _check_model(recipe, raw["model"])
    if isinstance(model.name_or_path, str) and model.name_or_path.startswith("~"):
        model.name_or_path = os.path.expanduser(model.name_or_path)  # saved recipes write the home as ~

    tok = raw.get("tokenizer") or {}
    _check_keys(recipe, "tokenizer", tok, [f.name for f in dataclasses.fields(TokenizerSpec)])
    tokenizer = TokenizerSpec(**tok)
    if isinstance(tokenizer.name, str) and tokenizer.name.startswith("~"):
        tokenizer.name = os.path.expanduser(tokenizer.name)

    data_raw = raw.get("data") or {}
    _check_keys(recipe, "data", data_raw, [f.name for f in dataclasses.fields(DataSpec)])
    data_hints = typing.get_type_hints(DataSpec)
    data_vals = {k: _coerce(recipe, f"data.{k}", v, data_hints[k]) for k, v in data_raw.items()}
    data = DataSpec(**data_vals)
    try:
        data.validate()
    except DataError as err:
        raise RecipeError(f"recipe {recipe!r}: {err}") from None

    hints = typing.get_type_hints(DoGraphConfig)
    dograph_raw = raw.get("dograph") or {}
    _check_keys(recipe, "dograph", dograph_raw, [f.name for f in dataclasses.fields(DoGraphSettings)])
    dograph = {k: _coerce(recipe, f"dograph.{k}", v, hints[k]) for k, v in dograph_raw.items()}
    try:
        DoGraphSettings(**dograph).validate_dograph()
    except ValueError as err:
        raise RecipeError(f"recipe {recipe!r}: dograph.{err}") from None

    training_raw = raw.get("training") or {}
    _check_keys(recipe, "training", training_raw, training_fields())
    training = {}
    for k, v in training_raw.items():
        v = _auto_precision(k, v) if k in ("bf16", "fp16") else v
        training[k] = _coerce(recipe, f"training.{k}", v, hints[k])
    result = Recipe(
        name=recipe, description=str(raw.get("description") or ""), trainer=trainer, model=model,
        tokenizer=tokenizer, data=data, dograph=dograph, training=training, raw=raw, path=path,
    )
    # TrainingArguments checks the rest (strategies, scheduler names, precision on this machine...).
    build_training_args(result, output_dir=os.path.join("outputs", recipe))
    return result


def load_recipe(name_or_path: str | None = None, overrides: list[str] | None = None, smoke: bool = False) -> Recipe:
    """Find, merge (`extends`), optionally shrink (`--smoke`), override (`--set`) and validate a recipe.

    With no name: the default recipe `tiny` (from recipes/ or the copy inside the package).
    """
    name_or_path = name_or_path or DEFAULT_RECIPE
    path = find_recipe(name_or_path)
    raw = read_yaml(path) if path is not None else embedded_default_raw()
    raw = resolve_extends(raw, path)
    name = str(raw.get("name") or (path.stem if path else DEFAULT_RECIPE))
    raw["name"] = name
    if smoke:
        raw = smoke_raw(raw)
    raw = apply_overrides(raw, overrides or [])  # after --smoke: what the user sets explicitly wins
    return parse_recipe(raw, name, path)


def uniform_twin(recipe: Recipe) -> Recipe:
    """The same recipe trained by the plain `Trainer`: identical model, data, seed and hyper-parameters."""
    raw = copy.deepcopy(recipe.raw)
    raw["trainer"] = "uniform"
    raw["name"] = f"{recipe.name}-uniform" if not recipe.name.endswith("-uniform") else recipe.name
    return parse_recipe(raw, raw["name"], recipe.path)
