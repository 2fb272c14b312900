"""Which models are registered: each model module's MODEL, by its name.

The registry (dlserve/registry.py) hands these out as ModelSpecs; Settings needs only
their names, to check DLSERVE_MODELS and to fill it when empty. The model modules import
the registry and Settings, so this module imports them by name, when first asked, and
imports neither of those itself.
"""

from __future__ import annotations

import importlib
from functools import cache
from typing import Any

BUILTIN = ("dlserve.models.digits", "dlserve.models.sentiment", "dlserve.models.recommender")


@cache
def registered(extra_modules: tuple[str, ...] = ()) -> dict[str, Any]:
    """Every model module's MODEL (a registry.ModelSpec, typed there) by the model's name:
    the built-in ones, then those of `extra_modules` (DLSERVE_MODEL_MODULES)."""
    models: dict[str, Any] = {}
    for module in (*BUILTIN, *extra_modules):
        try:
            model = importlib.import_module(module).MODEL
        except (ImportError, AttributeError) as exc:
            raise ValueError(
                f"model module {module!r} cannot be registered ({exc}); it must "
                "be importable and define MODEL, a ModelSpec"
            ) from None
        if model.name in models:
            raise ValueError(f"model {model.name!r} is registered twice (again by {module})")
        models[model.name] = model
    return models
