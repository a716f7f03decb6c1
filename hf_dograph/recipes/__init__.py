"""YAML recipes: what a recipe is (`spec`), where recipes are and how one is read (`files`), the changes made
before parsing (`overrides`: --set, --smoke), validation and loading (`parse`), and what a run builds from
one (`build`: training arguments, the model, resource checks)."""

from .build import build_model, build_training_args, check_resources, count_parameters_on_meta, model_config
from .files import TINY_RECIPE_YAML, available_recipes, deep_merge, embedded_default_raw, find_recipe, recipe_dirs
from .overrides import SMOKE_HELP, apply_overrides, parse_override, smoke_raw
from .parse import check_model_config, load_recipe, parse_recipe, uniform_twin
from .spec import (
    DEFAULT_RECIPE, SECTIONS, TOP_LEVEL_KEYS, TRAINERS, ModelSpec, Recipe, RecipeError, TokenizerSpec,
)

__all__ = [
    "DEFAULT_RECIPE", "SECTIONS", "SMOKE_HELP", "TINY_RECIPE_YAML", "TOP_LEVEL_KEYS", "TRAINERS", "ModelSpec",
    "Recipe", "RecipeError", "TokenizerSpec", "apply_overrides", "available_recipes", "build_model",
    "build_training_args", "check_model_config", "check_resources", "count_parameters_on_meta", "deep_merge",
    "embedded_default_raw", "find_recipe", "load_recipe", "model_config", "parse_override", "parse_recipe",
    "recipe_dirs", "smoke_raw", "uniform_twin",
]
