"""Held-out text and the intervened forward pass shared by the PPL-p% search and the top-k sweep.

The held text is packed with `workbench.data.pack` (deterministic) and starts right after the
sequences the activation store was captured from, so thresholds are fitted on one text and
perplexity is measured on another. Loss is the mean next-token cross-entropy over every position;
top-1 agreement compares each position's argmax with the unmodified model's.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from workbench import data

# A site hook factory: (layer) -> fn(act [batch, pos, d_mlp], hook) -> modified act. It also
# returns how many entries it kept active and how many it looked at, via `Counter`.
HookFn = Callable[[torch.Tensor, object], torch.Tensor]


def held_tokens(
    source: str, tokenizer, ctx_len: int, bos: str, skip_seqs: int, n_tokens: int
) -> torch.Tensor:
    """[n_seq, ctx_len] token ids: `n_tokens // ctx_len` packed sequences after the first `skip_seqs`."""
    n_seq = max(1, n_tokens // ctx_len)
    seqs = list(itertools.islice(data.pack(source, tokenizer, ctx_len, bos), skip_seqs, skip_seqs + n_seq))
    if len(seqs) < n_seq:
        raise ValueError(
            f"text source {source} has only {skip_seqs + len(seqs)} sequences of {ctx_len} tokens; the "
            f"held text needs {n_seq} after the {skip_seqs} measured ones: lower --held-tokens or "
            "--n-tokens, or pass a larger --data"
        )
    return torch.tensor([s.tokens for s in seqs])


class Counter:
    """Active / considered entry counts per layer, filled by intervention hooks."""

    def __init__(self, layers: list[int]):
        self.kept = {layer: 0 for layer in layers}
        self.seen = {layer: 0 for layer in layers}

    def add(self, layer: int, kept: torch.Tensor) -> None:
        """`kept`: [batch, pos, d_mlp] bool of entries left active (positions already filtered)."""
        self.kept[layer] += int(kept.sum())
        self.seen[layer] += kept.numel()

    def ratios(self) -> dict[int, float]:
        return {layer: self.kept[layer] / max(self.seen[layer], 1) for layer in self.kept}

    def overall(self) -> float:
        return sum(self.kept.values()) / max(sum(self.seen.values()), 1)


@dataclass
class Eval:
    loss: float
    ppl: float
    top1_agree: float


class HeldEval:
    """Runs the model over the held tokens, with or without hooks, in fixed batches (bitwise repeatable)."""

    def __init__(self, model, tokens: Int[torch.Tensor, "n_seq pos"], batch_size: int):
        self.model, self.tokens, self.batch_size = model, tokens, batch_size
        self.dense_top1: torch.Tensor | None = None
        self.dense = self.evaluate([])
        self.n_predictions = tokens[:, 1:].numel()

    def _logits(self, batch: torch.Tensor, hooks: list) -> Float[torch.Tensor, "batch pos vocab"]:
        return self.model.run_with_hooks(batch, fwd_hooks=hooks, return_type="logits")

    def evaluate(self, hooks: list[tuple[str, HookFn]]) -> Eval:
        """Mean next-token loss, its perplexity, and top-1 agreement with the unmodified model."""
        nll, count, top1 = 0.0, 0, []
        with torch.inference_mode():
            for start in range(0, len(self.tokens), self.batch_size):
                batch = self.tokens[start : start + self.batch_size].to(self.model.cfg.device)
                logits = self._logits(batch, hooks).float()
                nll += F.cross_entropy(
                    logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"
                ).item()
                count += batch[:, 1:].numel()
                top1.append(logits.argmax(-1).cpu())
        top1 = torch.cat(top1)  # [n_seq, pos]
        if self.dense_top1 is None:
            self.dense_top1 = top1
        loss = nll / count
        agree = (top1 == self.dense_top1).double().mean().item()
        return Eval(loss=loss, ppl=math.exp(loss), top1_agree=agree)
