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
    load_mask,
    load_model,
    masked,
    open_store,
    run,
    show_tokens,
)

__all__ = [
    "cached",
    "capture",
    "list_analyses",
    "list_models",
    "list_stores",
    "load",
    "load_mask",
    "load_model",
    "masked",
    "open_store",
    "run",
    "show_tokens",
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


class _RegisterWithSAELens:
    """Registers our dictionary architectures (top-AFA, the transcoder) the moment SAELens finishes
    importing, so `SAE.load_from_disk` knows them after `import workbench` alone, without making
    `import workbench` import SAELens (tens of seconds on a loaded machine). A one-shot meta-path
    finder: it wraps the loader of the `sae_lens` package, then steps aside."""

    def find_spec(self, name, path=None, target=None):
        if name != "sae_lens":
            return None
        import importlib.util

        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            run = spec.loader.exec_module

            def exec_then_register(module):
                run(module)
                _register_architectures()

            spec.loader.exec_module = exec_then_register
        return spec


def _register_architectures() -> None:
    """Import `workbench.sae`, whose import registers its classes in SAELens' registry."""
    import importlib
    import warnings

    try:
        importlib.import_module("workbench.sae")
    except Exception as err:  # noqa: BLE001 - SAELens must stay importable even if ours cannot register
        warnings.warn(f"workbench could not register its SAELens architectures: {err}", stacklevel=2)


if "sae_lens" in sys.modules:
    _register_architectures()
elif not any(isinstance(f, _RegisterWithSAELens) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithSAELens())
