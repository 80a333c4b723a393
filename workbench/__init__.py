"""Mechanistic interpretability workbench: `import workbench as wb`; every door goes through `workbench.api`."""

from workbench.api import (
    cached,
    capture,
    list_analyses,
    list_models,
    list_stores,
    load,
    load_model,
    open_store,
    run,
)

__all__ = [
    "cached",
    "capture",
    "list_analyses",
    "list_models",
    "list_stores",
    "load",
    "load_model",
    "open_store",
    "run",
]
__version__ = "0.1.0"
