"""What an analysis may touch: models (pooled), stores, captures and progress reporting."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm

from workbench.capture import CaptureConfig, capture
from workbench.models import load_model
from workbench.store import ActivationStore

T = TypeVar("T")
Progress = Callable[[int, int], None]


class ModelPool:
    """Keeps the last few booted models so Jupyter, CLI runs and app reruns never reload them."""

    def __init__(self, max_models: int = 2):
        self.max_models = max_models
        self._models: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def get(self, key: str, processing: str = "raw"):
        ident = (key, processing)
        if ident in self._models:
            self._models.move_to_end(ident)
            return self._models[ident]
        model = load_model(key, processing)
        self._models[ident] = model
        while len(self._models) > self.max_models:
            self._models.popitem(last=False)
        return model

    def put(self, model) -> None:
        """Adopt an already-booted model (tests, notebooks) under its own key."""
        self._models[(model.workbench.key, model.workbench.processing)] = model


POOL = ModelPool()


class Context:
    """Passed to every analysis run: all I/O goes through here."""

    def __init__(
        self,
        progress: Progress | None = None,
        pool: ModelPool = POOL,
        show_bars: bool = True,
        work_dir: Path | None = None,
        engine: str = "local",
        address: str | None = None,
    ):
        self.on_progress = progress
        self.pool = pool
        self.show_bars = show_bars and progress is None
        self._work_dir = work_dir
        self.engine, self.address = engine, address  # where `map` runs: here, or as Ray tasks
        self.mapped = False  # whether the analysis used `map` (engine="ray" is moot otherwise)

    @property
    def work_dir(self) -> Path:
        """Scratch folder private to this (analysis, config) key: checkpoints survive a killed run."""
        if self._work_dir is None:
            import tempfile

            self._work_dir = Path(tempfile.mkdtemp(prefix="workbench-"))
        self._work_dir.mkdir(parents=True, exist_ok=True)
        return self._work_dir

    def model(self, key: str, processing: str = "raw"):
        return self.pool.get(key, processing)

    def store(self, path: str | Path) -> ActivationStore:
        return ActivationStore(path)

    def capture(self, cfg: CaptureConfig) -> ActivationStore:
        cfg.preflight()  # text and context length checked before the model loads
        model = self.model(cfg.model, cfg.processing)
        cfg.check_model(model)
        store = capture(cfg, model=model, progress=self.on_progress or self.show_bars)
        cfg.warn_if_short(store.n_rows)
        return store

    def store_or_capture(self, store: str, cfg: CaptureConfig) -> ActivationStore:
        """The store at `store` if given, else a (cached, resumable) capture of `cfg`."""
        return self.store(store) if store else self.capture(cfg)

    def map(
        self,
        fn: Callable[..., T],
        items: list[tuple],
        desc: str = "",
        needed: Sequence[tuple[str, str]] = (),
        stage: tuple[int, int] = (0, 1),
    ) -> Iterator[T]:
        """`fn(*item)` for each item, in item order (so a reduction adds in the local order), here
        or, with engine="ray", as Ray tasks (workbench.distributed.ray_mapreduce); `needed`
        (label, path) must exist on every Ray node. `fn` must be a module-level function.
        `stage` = (k, n): this map is pass k of n equal passes, so the app's progress callback
        sees one count across them."""
        self.mapped = True
        if self.engine == "ray":
            from workbench.distributed.ray_mapreduce import map_ordered

            results = map_ordered(fn, items, address=self.address, needed=needed)
        else:
            results = (fn(*item) for item in items)
        k, n = stage
        yield from self.progress(
            results, total=len(items), desc=desc, done_before=k * len(items), overall=n * len(items)
        )

    def progress(
        self,
        items: Iterable[T],
        total: int | None = None,
        desc: str = "",
        done_before: int = 0,
        overall: int | None = None,
    ) -> Iterator[T]:
        """Iterate with a tqdm bar (CLI/Jupyter) or the caller's callback (app); the callback gets
        (done_before + i, overall) when these items are one part of a longer job."""
        total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
        bar = tqdm(items, total=total, desc=desc, disable=not self.show_bars)
        for i, item in enumerate(bar, 1):
            yield item
            if self.on_progress and total:
                self.on_progress(done_before + i, overall or total)
