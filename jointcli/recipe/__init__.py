"""The recipe: a YAML file validated by pydantic, the single source of truth of a run.

    recipe = load_recipe("recipes/sst2.yaml", ["data.split.train=16"])

sections.py holds data, metric, models, program, schedule and runtime; optimizers.py the optimizers
and their training settings; schema.py the whole recipe and the references between its sections;
load.py the YAML, the `key=value` overrides and the one-line errors.
"""

from .load import load_recipe, parse_overrides, recipe_to_yaml, validate_recipe
from .optimizers import (
    Curriculum,
    Groups,
    Lora,
    OptimizerSpec,
    ParamGroup,
    PromptOptimizer,
    SimultaneousOptimizer,
    SoftPrompt,
    TraceSettings,
    Train,
    WeightOptimizer,
)
from .schema import Recipe
from .sections import (
    EMBEDDED_MODEL,
    Data,
    LiteLLMModel,
    LocalModel,
    Metric,
    MlflowTracking,
    ModelSpec,
    Module,
    Program,
    Runtime,
    Schedule,
    Select,
    Split,
    Tracking,
    did_you_mean,
)

__all__ = [
    "EMBEDDED_MODEL",
    "Curriculum",
    "Data",
    "Groups",
    "LiteLLMModel",
    "LocalModel",
    "Lora",
    "Metric",
    "MlflowTracking",
    "ModelSpec",
    "Module",
    "OptimizerSpec",
    "ParamGroup",
    "Program",
    "PromptOptimizer",
    "Recipe",
    "Runtime",
    "Schedule",
    "Select",
    "SimultaneousOptimizer",
    "SoftPrompt",
    "Split",
    "TraceSettings",
    "Tracking",
    "Train",
    "WeightOptimizer",
    "did_you_mean",
    "load_recipe",
    "parse_overrides",
    "recipe_to_yaml",
    "validate_recipe",
]
