"""What a recipe is: its sections, the dataclasses they fill, and `Recipe`, a parsed and validated one.

A recipe is a YAML file that says which model, tokenizer, data, DoGraph settings and training run.

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

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..config import DoGraphSettings
from ..data.spec import DataSpec
from ..redaction import home_relative, redact

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
        raw = redact(self.raw)
        return yaml.safe_dump(home_relative(raw) if for_file else raw, sort_keys=False, allow_unicode=True)

    def settings(self) -> DoGraphSettings:
        """The DoGraph settings of the `dograph:` section (the defaults for the rest)."""
        return DoGraphSettings(**self.dograph)


def section_fields() -> dict[str, list[str]]:
    """The valid keys of each section: the fields of the dataclass it fills."""
    return {
        "model": [f.name for f in dataclasses.fields(ModelSpec)],
        "tokenizer": [f.name for f in dataclasses.fields(TokenizerSpec)],
        "data": [f.name for f in dataclasses.fields(DataSpec)],
        "dograph": [f.name for f in dataclasses.fields(DoGraphSettings)],
        "training": training_fields(),
    }


def training_fields() -> list[str]:
    """The fields of `TrainingArguments` (the `training:` section's valid keys)."""
    from transformers import TrainingArguments

    return [f.name for f in dataclasses.fields(TrainingArguments) if f.init]
