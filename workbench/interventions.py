"""Scoped interventions on a (shared, pooled) model: hooks that exist only inside a `with` block.

    with hooked(model, fwd=[("blocks.3.hook_attn_out", patch)]):
        logits = model(tokens)

* The hooks are removed on exit, also when the block raises; hooks added by others stay.
* They act only for the thread that entered the block: the app's prompt lens, running a forward
  pass on the same pooled model from another thread, sees the plain model.
* The block holds the model's lock (`model_lock`), so two runs never interleave their hooks on
  one model; readers that must not overlap with any run (the prompt lens) take the same lock.
* Unknown hook names are an `InterventionError` naming them (TransformerLens' own `hooks()`
  skips a name it does not know silently, which would turn a typo into an unpatched run).
* Nothing here changes a weight; patching replaces activations only.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

Hook = Callable  # (activation, hook) -> activation | None

_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()
_levels = itertools.count(-770_000, -1)  # one hook level per block: nested blocks remove only their own


class InterventionError(ValueError):
    """An intervention the model cannot take (unknown hook point); raised before any hook is added."""


def model_lock(model) -> threading.RLock:
    """The model's re-entrant lock: held by every intervention block on it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def hook_points(model, names: Sequence[str]) -> dict:
    """name -> the model's HookPoint, for each name; unknown names raise one error listing them."""
    table = model.hook_dict  # built once here: each lookup of the property rebuilds its alias map
    unknown = [n for n in dict.fromkeys(names) if n not in table]
    if unknown:
        raise InterventionError(f"unknown hook point(s) {unknown} on this model")
    return {n: table[n] for n in names}


@contextmanager
def hooked(
    model,
    fwd: Sequence[tuple[str, Hook]] = (),
    bwd: Sequence[tuple[str, Hook]] = (),
    points: dict | None = None,
) -> Iterator[None]:
    """Add forward/backward hooks for the body of the block (this thread only), then remove them.

    `points` (from `hook_points`) saves the hook-table lookup when the same names are hooked often.
    """
    names = [n for n, _ in fwd] + [n for n, _ in bwd]
    table = points if points is not None and all(n in points for n in names) else hook_points(model, names)
    owner, level = threading.get_ident(), next(_levels)

    def owned(fn: Hook) -> Hook:
        def hook(x, hook):
            return fn(x, hook) if threading.get_ident() == owner else None

        return hook

    added = []
    with model_lock(model):
        try:
            for direction, hooks in (("fwd", fwd), ("bwd", bwd)):
                for name, fn in hooks:
                    table[name].add_hook(owned(fn), dir=direction, level=level)
                    added.append((table[name], direction))
            yield
        finally:
            for point, direction in added:
                point.remove_hooks(direction, level=level)
