"""Mechanistic interpretability workbench: `import workbench as wb`; every door goes through `workbench.api`."""

import sys
import types

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


class _Package(types.ModuleType):
    """Keeps `wb.capture` the API function: importing the `workbench.capture` module (lazily, on
    first capture) would otherwise rebind the package attribute to the module."""

    def __setattr__(self, name, value):
        if name == "capture" and isinstance(value, types.ModuleType):
            return  # the module stays in sys.modules["workbench.capture"]
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
