"""Recipes: every one parses; the paper models have the paper's sizes and hyper-parameters (PAPER_FACTS);
bad recipes fail before training with an error that names the key or the cause."""

from __future__ import annotations

import pytest
import yaml

from hf_dograph.data import PILE_17_SUBSETS, SLIMPAJAMA_DOMAINS
from hf_dograph.recipes import (
    TINY_RECIPE_YAML,
    RecipeError,
    available_recipes,
    check_resources,
    count_parameters_on_meta,
    load_recipe,
    parse_recipe,
    uniform_twin,
)

from conftest import REPO_ROOT

PAPER_RUNS = ["gpt2-small-slimpajama", "gpt2-medium-slimpajama", "tinyllama-1.1b-pile", "llama-3.2-3b-pile"]
ALL_FILES = sorted(p.stem for p in (REPO_ROOT / "recipes").glob("*.yaml"))

# PAPER_FACTS, table 8. Llama-3.2-3B: its stated architecture (28 x 3072, FFN 8192, 8 KV heads, vocab
# 128256, tied) has 3.21B parameters, the model's official count; "3B" is the paper's rounded name.
PAPER_PARAMS = {
    "gpt2-small-slimpajama": 210e6,
    "gpt2-medium-slimpajama": 300e6,
    "tinyllama-1.1b-pile": 1.1e9,
    "llama-3.2-3b-pile": 3.21e9,
}
# PAPER_FACTS, tables 8 and 9.
ARCH = {
    "gpt2-small-slimpajama": dict(n_layer=24, n_head=16, n_embd=768, n_inner=3072, vocab_size=50257),
    "gpt2-medium-slimpajama": dict(n_layer=36, n_head=24, n_embd=768, n_inner=3072, vocab_size=50257),
    "tinyllama-1.1b-pile": dict(num_hidden_layers=22, num_attention_heads=32, hidden_size=2048,
                                intermediate_size=5632, num_key_value_heads=4, vocab_size=32000),
    "llama-3.2-3b-pile": dict(num_hidden_layers=28, num_attention_heads=24, hidden_size=3072,
                              intermediate_size=8192, num_key_value_heads=8, vocab_size=128256,
                              tie_word_embeddings=True),
}
PROTOCOL = {  # batch, steps, sequence length
    "gpt2-small-slimpajama": (48, 20_000, 512),
    "gpt2-medium-slimpajama": (48, 20_000, 512),
    "tinyllama-1.1b-pile": (64, 25_000, 2048),
    "llama-3.2-3b-pile": (64, 25_000, 2048),
}


def test_expected_recipes_exist():
    expected = set(PAPER_RUNS) | {f"{r}-uniform" for r in PAPER_RUNS} | {"tiny", "gpt2-lora-slimpajama"}
    assert expected <= set(ALL_FILES)
    assert expected <= set(available_recipes())


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_recipe_parses(name):
    recipe = load_recipe(name)
    assert recipe.name == name and recipe.description
    assert load_recipe(str(REPO_ROOT / "recipes" / f"{name}.yaml")).raw == recipe.raw  # by path too
    smoke = load_recipe(name, smoke=True)
    assert smoke.training["max_steps"] == 2 and smoke.data.source == "embedded" and smoke.tokenizer.name == "bytes"


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_paper_models_match_paper_facts(name):
    recipe = load_recipe(name)
    n = count_parameters_on_meta(recipe)
    assert abs(n - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.03, f"{name}: {n / 1e6:.1f}M"
    for key, value in ARCH[name].items():
        assert recipe.model.config[key] == value, key
    batch, steps, seq_len = PROTOCOL[name]
    t = recipe.training
    assert t["per_device_train_batch_size"] * t.get("gradient_accumulation_steps", 1) == batch
    assert t["max_steps"] == steps and recipe.data.seq_len == seq_len
    assert t["warmup_steps"] == 500 and t["learning_rate"] == 5e-4 and t["lr_scheduler_type"] == "cosine"
    assert t["weight_decay"] == 0.01 and t["max_grad_norm"] == 1.0
    assert recipe.trainer == "dograph"
    assert recipe.dograph["num_domains"] == 11 and recipe.dograph["objective"] == "uncertainty"
    assert recipe.dograph.get("mixing_strategy", "dograph") == "dograph"
    assert recipe.data.streaming and recipe.data.source == "hub"


def test_paper_data_sections():
    for name in ("gpt2-small-slimpajama", "gpt2-medium-slimpajama"):
        d = load_recipe(name).data
        assert d.name == "DKYoon/SlimPajama-6B" and d.label_field == "meta.redpajama_set_name"
        assert d.domains == list(SLIMPAJAMA_DOMAINS)
    for name in ("tinyllama-1.1b-pile", "llama-3.2-3b-pile"):
        d = load_recipe(name).data
        assert d.label_field == "meta.pile_set_name" and d.domains == list(PILE_17_SUBSETS)


def test_paper_gpt2_checks_from_paper_facts():
    # "GPT-2 vocab 50257 with 24 layers x 768 gives ≈ 209M parameters; 36 layers ≈ 294M."
    assert round(count_parameters_on_meta(load_recipe("gpt2-small-slimpajama")) / 1e6) == 209
    assert round(count_parameters_on_meta(load_recipe("gpt2-medium-slimpajama")) / 1e6) == 294


@pytest.mark.parametrize("name", PAPER_RUNS)
def test_uniform_twins_differ_only_in_trainer(name):
    base, twin = load_recipe(name), load_recipe(f"{name}-uniform")
    assert twin.trainer == "uniform"
    strip = lambda raw: {k: v for k, v in raw.items() if k not in ("name", "description", "trainer")}  # noqa: E731
    assert strip(twin.raw) == strip(base.raw)
    assert strip(uniform_twin(base).raw) == strip(base.raw)


def test_lora_recipe():
    recipe = load_recipe("gpt2-lora-slimpajama")
    assert recipe.model.name_or_path and recipe.model.lora["r"] == 16
    assert load_recipe("gpt2-lora-slimpajama", smoke=True).model.lora == recipe.model.lora


def test_tiny_is_the_default_and_its_embedded_copy_is_current():
    assert (REPO_ROOT / "recipes" / "tiny.yaml").read_text(encoding="utf-8") == TINY_RECIPE_YAML
    assert load_recipe(None).raw == load_recipe("tiny").raw
    tiny = load_recipe(None)
    assert tiny.data.source == "embedded" and tiny.tokenizer.name == "bytes" and tiny.trainer == "dograph"


def test_set_overrides_and_yaml_floats():
    r = load_recipe("tiny", ["training.learning_rate=1e-3", "dograph.num_domains=3", "model.config.n_layer=1",
                             "max_steps=7", "data.embedded_proportions={code: 1, prose: 1}"])
    assert r.training["learning_rate"] == 1e-3 and isinstance(r.training["learning_rate"], float)
    assert r.dograph["num_domains"] == 3 and r.model.config["n_layer"] == 1 and r.training["max_steps"] == 7
    assert r.data.embedded_proportions == {"code": 1, "prose": 1}
    raw = yaml.safe_load(TINY_RECIPE_YAML)
    raw["training"]["learning_rate"] = "5e-4"  # YAML 1.1 reads 5e-4 as a string
    assert parse_recipe(raw, "t").training["learning_rate"] == 5e-4


def test_bf16_auto_is_off_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the CPU behaviour")
    assert load_recipe("gpt2-small-slimpajama").training["bf16"] is False


# ----------------------------------------------------------------------------- bad recipes
def _raw(**changes):
    raw = yaml.safe_load(TINY_RECIPE_YAML)
    for dotted, value in changes.items():
        node = raw
        *path, last = dotted.split("__")
        for k in path:
            node = node.setdefault(k, {})
        node[last] = value
    return raw


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"trainning": {}}, r"unknown key 'trainning'.*Did you mean training"),
        ({"training__learnig_rate": 1e-3}, r"'training.learnig_rate'.*section 'training'.*learning_rate"),
        ({"dograph__num_domain": 4}, r"'dograph.num_domain'.*num_domains"),
        ({"data__seqlen": 4}, r"'data.seqlen'.*seq_len"),
        ({"model__config__n_layers": 4}, r"'model.config.n_layers'.*n_layer"),
        ({"model__lora": {"rank": 4}}, r"'model.lora.rank'"),
        ({"tokenizer__nmae": "bytes"}, r"'tokenizer.nmae'.*name"),
    ],
)
def test_unknown_keys_are_named(changes, pattern):
    with pytest.raises(RecipeError, match=pattern):
        parse_recipe(_raw(**changes), "bad")


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"training__learning_rate": "fast"}, r"training.learning_rate='fast' has the wrong type"),
        ({"training__max_steps": [1]}, r"training.max_steps"),
        ({"training__lr_scheduler_type": "cosinus"}, r"invalid training settings.*cosinus"),
        ({"dograph__objective": "entropy"}, r"dograph.objective='entropy' is unknown"),
        ({"dograph__num_domains": 0}, r"num_domains=0 must be >= 1"),
        ({"data__source": "ftp"}, r"data.source='ftp' is unknown"),
        ({"data__seq_len": 1}, r"data.seq_len=1"),
        ({"data__embedded_proportions": {"poetry": 1}}, r"data.embedded_proportions.*poetry"),
        ({"data__source": "hub"}, r"data.name is missing"),
        ({"data__source": "hub", "data__name": "x/y"}, r"data.label_field is missing"),
        ({"trainer": "doreme"}, r"trainer='doreme'"),
        ({"model__config__model_type": "gtp2"}, r"model_type='gtp2'.*gpt2"),
        ({"model__name_or_path": "gpt2"}, r"exactly one of model.config"),
    ],
)
def test_bad_values_are_named(changes, pattern):
    with pytest.raises(RecipeError, match=pattern):
        parse_recipe(_raw(**changes), "bad")


def test_bad_set_and_unknown_recipe():
    with pytest.raises(RecipeError, match=r"unknown key 'learnig_rate'.*training.learning_rate"):
        load_recipe("tiny", ["learnig_rate=1"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe("tiny", ["training.max_steps"])
    with pytest.raises(RecipeError, match=r"unknown recipe 'gpt2-smal'.*gpt2-small-slimpajama.*Available: .*tiny"):
        load_recipe("gpt2-smal")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe("missing/recipe.yaml")


@pytest.mark.parametrize(
    "name, resource",
    [
        ("gpt2-small-slimpajama", "DKYoon/SlimPajama-6B"),
        ("tinyllama-1.1b-pile", "TinyLlama/TinyLlama_v1.1"),
        ("gpt2-lora-slimpajama", "openai-community/gpt2"),
    ],
)
def test_unreachable_hub_without_local_copy_is_named(name, resource, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    with pytest.raises(RecipeError, match=rf"'{resource}'.*HF_HUB_OFFLINE"):
        check_resources(load_recipe(name))
