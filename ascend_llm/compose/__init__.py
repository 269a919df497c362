"""Composing a recipe: Hydra over the typed schemas of `config/`, command-line override checks, and
`model.pretrained` (the architecture read from a model directory through interop/). Above `config/` (schemas only,
no Hydra, no files read) and `interop/`."""

from ascend_llm.compose.recipe import compose_recipe, recipes_dir, register_schema, to_recipe

__all__ = ["compose_recipe", "recipes_dir", "register_schema", "to_recipe"]
