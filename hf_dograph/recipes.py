"""YAML recipes: one file says which model, tokenizer, data, DoGraph settings and training run.

A recipe has these top-level keys (all sections optional but `model`; see recipes/*.yaml):

    name:        the run's name (default: the file's stem); outputs go to outputs/<name>
    description: one line for `hf-dograph list`
    extends:     another recipe whose values this one overrides (a uniform twin is 3 lines)
    trainer:     "dograph" (DoGraphTrainer) or "uniform" (the plain transformers.Trainer)
    model:       `config:` (an architecture: model_type + sizes, trained from scratch) or
                 `name_or_path:` (pretrained weights); optional `lora:` (peft LoraConfig fields)
    tokenizer:   `name:` gpt2-bpe-offline | bytes | a Hub id or a local folder
    data:        `hf_dograph.data.DataSpec` fields
    dograph:     `DoGraphSettings` fields
    training:    `TrainingArguments` fields (bf16/fp16 also take "auto": on where the GPU supports it)

Every key is checked against the dataclass it fills: an unknown key fails with its section
and the closest valid names; a bad value fails with the field's name, before any training.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import DoGraphConfig, DoGraphSettings
from .data.hub import HubAccessError, check_hub_resource
from .data.spec import DataError, DataSpec
from .data.tokenizers import OFFLINE_TOKENIZERS

TOP_LEVEL_KEYS = ("name", "description", "extends", "trainer", "model", "tokenizer", "data", "dograph", "training")
SECTIONS = ("model", "tokenizer", "data", "dograph", "training")
TRAINERS = ("dograph", "uniform")
DEFAULT_RECIPE = "tiny"


class RecipeError(ValueError):
    """A recipe is wrong; the message names the recipe, the key and the fix."""


@dataclass
class ModelSpec:
    """The `model:` section."""

    config: dict | None = None  # {"model_type": "gpt2", "n_layer": 24, ...}: a new model, random init
    name_or_path: str | None = None  # pretrained weights (Hub id or folder)
    from_scratch: bool = False  # with name_or_path: its architecture only, random init
    lora: dict | None = None  # peft.LoraConfig fields; task_type is CAUSAL_LM
    dtype: str | None = None  # dtype to load pretrained weights in ("bfloat16", "auto"...)
    attn_implementation: str | None = None  # "sdpa", "eager", ...


@dataclass
class TokenizerSpec:
    """The `tokenizer:` section."""

    name: str = "gpt2-bpe-offline"  # gpt2-bpe-offline | bytes | Hub id | folder
    model_max_length: int | None = None  # default: data.seq_len


@dataclass
class Recipe:
    """A parsed, validated recipe. `raw` is the merged YAML it came from (what gets saved)."""

    name: str
    description: str
    trainer: str
    model: ModelSpec
    tokenizer: TokenizerSpec
    data: DataSpec
    dograph: dict
    training: dict
    raw: dict
    path: Path | None = None

    def to_yaml(self, for_file: bool = False) -> str:
        """The recipe as YAML, without credentials (`hub_token` and the like: `redaction`), so that neither
        `hf-dograph show` nor a saved `recipe.yaml` holds one. `for_file`: also write the home directory as
        `~` (recipes read it back), as the CLI saves it beside a run."""
        from .redaction import home_relative, redact

        raw = redact(self.raw)
        return yaml.safe_dump(home_relative(raw) if for_file else raw, sort_keys=False, allow_unicode=True)

    def settings(self) -> DoGraphSettings:
        return DoGraphSettings(**self.dograph)


# ----------------------------------------------------------------------------- finding recipes
def recipe_dirs() -> list[Path]:
    """Where recipes are looked up by name: $HF_DOGRAPH_RECIPES, then the repository's recipes/."""
    dirs = []
    if os.environ.get("HF_DOGRAPH_RECIPES"):
        dirs += [Path(p) for p in os.environ["HF_DOGRAPH_RECIPES"].split(os.pathsep) if p]
    here = Path(__file__).resolve().parent
    dirs += [here.parent / "recipes", here / "recipes"]  # source checkout; packaged copy
    return [d for d in dirs if d.is_dir()]


def available_recipes() -> dict[str, Path | None]:
    """Recipe name → file (None for the embedded default when no file provides it)."""
    found: dict[str, Path | None] = {}
    for d in recipe_dirs():
        for path in sorted(d.glob("*.yaml")):
            found.setdefault(path.stem, path)
    found.setdefault(DEFAULT_RECIPE, None)
    return dict(sorted(found.items()))


def find_recipe(name_or_path: str) -> Path | None:
    """The file of a recipe given by name ("tiny") or path ("recipes/tiny.yaml").

    Returns None for the embedded default when no file provides it; raises `RecipeError`
    listing the available recipes when the name is unknown.
    """
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or os.sep in name_or_path or "/" in name_or_path:
        if p.is_file():
            return p
        raise RecipeError(f"recipe file {name_or_path!r} does not exist")
    recipes = available_recipes()
    if name_or_path in recipes:
        return recipes[name_or_path]
    close = difflib.get_close_matches(name_or_path, list(recipes), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise RecipeError(f"unknown recipe {name_or_path!r}.{hint} Available: {', '.join(recipes)}")


def _read_yaml(path: Path) -> dict:
    """A recipe file's mapping; `RecipeError` naming the file, the line and the fix when it cannot be read."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise RecipeError(f"recipe {path}, line {line} (byte offset {err.start}): not UTF-8 text (byte "
                          f"0x{data[err.start]:02x}). Fix: save the file as UTF-8") from None
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = " ".join(str(getattr(err, "problem", None) or err).split())
        raise RecipeError(f"recipe {path}{where}: not valid YAML ({problem}). Fix: correct that line (`key: value`, "
                          "nested keys indented with spaces, no tabs)") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path}: the top level must be a mapping of sections. Fix: write it as "
                          "`model:`, `data:`, `training:`... sections (see recipes/tiny.yaml)")
    return raw


def deep_merge(base: dict, override: dict) -> dict:
    """`base` updated by `override`, recursively for nested mappings (lists are replaced)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _resolve_extends(raw: dict, path: Path | None, seen: tuple = ()) -> dict:
    parent = raw.get("extends")
    if not parent:
        return raw
    if parent in seen:
        raise RecipeError(f"recipe 'extends' loops: {' -> '.join(seen + (parent,))}")
    parent_path = None
    if path is not None and (path.parent / f"{parent}.yaml").is_file():
        parent_path = path.parent / f"{parent}.yaml"
    else:
        parent_path = find_recipe(parent)
    parent_raw = _read_yaml(parent_path) if parent_path else embedded_default_raw()
    parent_raw = _resolve_extends(parent_raw, parent_path, seen + (parent,))
    merged = deep_merge(parent_raw, {k: v for k, v in raw.items() if k != "extends"})
    merged.pop("extends", None)
    if "name" not in raw:  # a child is not its parent
        merged.pop("name", None)
    return merged


def embedded_default_raw() -> dict:
    """The default recipe (`tiny`) as shipped inside the package, for installs without recipes/."""
    return yaml.safe_load(TINY_RECIPE_YAML)


# ----------------------------------------------------------------------------- --set overrides
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


def _section_fields() -> dict[str, list[str]]:
    return {
        "model": [f.name for f in dataclasses.fields(ModelSpec)],
        "tokenizer": [f.name for f in dataclasses.fields(TokenizerSpec)],
        "data": [f.name for f in dataclasses.fields(DataSpec)],
        "dograph": [f.name for f in dataclasses.fields(DoGraphSettings)],
        "training": _training_fields(),
    }


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set key=value` items to a raw recipe. A key without a section
    (`learning_rate=1e-3`) goes to the one section that has such a field."""
    out = copy.deepcopy(raw)
    fields = _section_fields()
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


# ----------------------------------------------------------------------------- --smoke
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


# ----------------------------------------------------------------------------- validation
def _training_fields() -> list[str]:
    from transformers import TrainingArguments

    return [f.name for f in dataclasses.fields(TrainingArguments) if f.init]


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
    _check_keys(recipe, "training", training_raw, _training_fields())
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
    raw = _read_yaml(path) if path is not None else embedded_default_raw()
    raw = _resolve_extends(raw, path)
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


# ----------------------------------------------------------------------------- building
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
            from .hub import from_pretrained_kwargs

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
        from .hub import from_pretrained_kwargs

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


# The default recipe, kept inside the package so that `hf-dograph train` works from any install
# (a wheel has no recipes/ folder). tests/test_recipes.py checks it equals recipes/tiny.yaml.
TINY_RECIPE_YAML = """\
# tiny: the embedded default. `hf-dograph train` with no recipe runs this.
#
# A tiny GPT-2 trained from scratch with DoGraph on the embedded corpus: five generated text
# domains (prose 60% ... arithmetic 2%) that need no files and no network. It finishes in
# under 3 minutes on 2 CPU cores and ends with a per-domain validation table. It shows the
# mechanics, not the paper's numbers: for those see the gpt2-*/llama recipes.
#
# Try: hf-dograph train --compare-uniform            (DoGraph vs plain Trainer, side by side)
#      hf-dograph train --set dograph.objective=robust --set training.max_steps=100
name: tiny
description: "Embedded default: tiny GPT-2 from scratch on the built-in 5-domain corpus (CPU, < 3 min)"
trainer: dograph              # dograph = DoGraphTrainer; uniform = plain transformers.Trainer

model:
  config:                     # an architecture, randomly initialized (trained from scratch)
    model_type: gpt2
    n_layer: 2
    n_embd: 64
    n_head: 4
    n_positions: 128          # >= data.seq_len
    # vocab_size: from the tokenizer (259 for bytes)

tokenizer:
  name: bytes                 # one token per UTF-8 byte: a 259-token vocabulary keeps the model tiny

data:
  source: embedded            # the built-in generated corpus
  embedded_chars: 400000      # ~400k bytes = ~400k tokens
  embedded_proportions:       # the human domains and their (unbalanced) shares of the text
    prose: 0.60
    code: 0.20
    dialogue: 0.10
    tables: 0.08
    arithmetic: 0.02
  seq_len: 128
  packing: pack               # blocks of 128 tokens, one domain per block, no token lost
  validation_fraction: 0.1    # per domain

dograph:
  num_domains: 4              # m: fewer than the paper's 11, for batches of 16
  projection_dim: 64          # k: sketch size (the projection is regenerated each step: keep it small on CPU)
  kmeans_n_init: 1            # one K-means start per step: enough for 16 sketches, and cheaper
  objective: uncertainty      # the paper's best objective
  uncertainty_eps: 1.0        # ε = mean σ²: with 16 samples in 4 domains, one-sample domains are common and
                              # the default 0.1 hands them most of the weight (worse validation loss here)
  grad_engine: factored

training:
  max_steps: 200
  per_device_train_batch_size: 16
  per_device_eval_batch_size: 32
  learning_rate: 3.0e-3       # tiny models take large steps
  lr_scheduler_type: cosine
  warmup_steps: 20
  weight_decay: 0.01
  max_grad_norm: 1.0
  logging_steps: 25
  save_strategy: "no"         # one final checkpoint, written by hf-dograph
  eval_strategy: "no"         # the per-domain table at the end replaces it
  report_to: none
  seed: 0
  dataloader_drop_last: true  # no 2-sequence batch at an epoch's end: DoGraph clusters each batch
  dataloader_num_workers: 0
"""
