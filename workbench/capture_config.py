"""What a capture records (`CaptureConfig`), checked before any model loads.

Kept apart from `capture.py` (which needs torch and TransformerLens) so that building and
validating a config, listing options and `--help` stay fast.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

from workbench import checks, data, sites
from workbench.models import DEFAULT_MODEL

DEFAULT_SITES = ("blocks.*.mlp.hook_post", "blocks.*.hook_resid_post")
log = logging.getLogger("workbench")
_SIZES = ("n_tokens", "ctx_len", "batch_size", "shard_tokens")


@dataclass(frozen=True)
class CaptureConfig:
    """What to capture; every field is part of the run's identity."""

    model: str = DEFAULT_MODEL
    """Model key (see `workbench models`), local HF folder or Hub id."""
    sites: tuple[str, ...] = DEFAULT_SITES
    """TransformerLens hook names or globs, comma-separated (commas inside {a,b} are the choice's), e.g.
    blocks.*.mlp.hook_post,blocks.*.hook_resid_{pre,post}."""
    data: str = field(default_factory=data.default_source)
    """Text source: .txt/.jsonl/.json/.parquet path or hf:<dataset>."""
    n_tokens: int = 2048
    """Token budget (rounded down to whole sequences; a shorter text gives fewer)."""
    ctx_len: int = 128
    """Tokens per sequence, BOS included."""
    bos: Literal["prepend", "none"] = "prepend"
    """BOS policy: 'prepend' (each sequence starts with BOS) or 'none'."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Storage dtype: float32, float16 or bfloat16."""
    processing: Literal["raw", "compat"] = "raw"
    """Weight processing: 'raw' (HF numerics) or 'compat' (TL/SAELens folded norms)."""
    batch_size: int = 8
    """Sequences per forward pass."""
    shard_tokens: int = 1024
    """Rows per shard (rounded to whole batches); bounds memory."""

    def __post_init__(self):
        if isinstance(self.sites, str):
            object.__setattr__(self, "sites", tuple(sites.split_patterns(self.sites)))
        else:  # a tuple may still hold "a,b" items (the app's list fields)
            object.__setattr__(self, "sites", tuple(p for s in self.sites for p in sites.split_patterns(s)))
        if not self.sites:
            raise ValueError("no sites given; pass TransformerLens hook names such as blocks.*.mlp.hook_post")
        checks.check_config(self, positive=_SIZES)
        if self.ctx_len < 2:
            raise ValueError(f"ctx_len must be at least 2 (BOS and one token), got {self.ctx_len}")
        if self.n_tokens < self.ctx_len:
            raise ValueError(f"n_tokens ({self.n_tokens}) must be at least ctx_len ({self.ctx_len})")

    @property
    def shard_seqs(self) -> int:
        return max(self.batch_size, self.shard_tokens // self.ctx_len // self.batch_size * self.batch_size)

    def check_model(self, model) -> None:
        """After the load, before any compute: the context fits the booted model's positions."""
        self._check_positions(getattr(model.cfg, "n_ctx", None))

    def _check_positions(self, limit: int | None) -> None:
        if limit is not None and self.ctx_len > limit:
            raise ValueError(
                f"ctx_len {self.ctx_len} exceeds the {limit} positions of model '{self.model}'; "
                f"use --ctx-len {limit} or less"
            )

    def warn_if_short(self, n_rows: int) -> None:
        """One warning line when the text ran out before the token budget."""
        asked = self.n_tokens // self.ctx_len * self.ctx_len
        if n_rows < asked:
            log.warning(
                "captured %d tokens, fewer than the %d asked for: the text source ran out (%s)",
                n_rows,
                asked,
                self.data,
            )

    def preflight(self) -> None:
        """Checks that read files but load no model: the text source (UTF-8, well-formed records)
        and, from the model's config.json when it is on disk, context length and layer indices."""
        data.check_source(self.data)
        from workbench import models

        config = models.model_config(self.model)
        if config is None:
            return  # known only once loaded (a GGUF key converted on first use)
        self._check_positions(models.max_positions(config))
        n_layers = models.n_layers(config)
        if n_layers is not None:
            sites.check_layers(self.sites, n_layers)
