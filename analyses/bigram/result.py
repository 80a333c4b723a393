"""The bigram-subnetwork result: where the kept weights are, how bigram-like the subnetwork is,
what ablating it costs, and how its residual stream moves from current- to next-token space
(Chang & Bergen 2025, arXiv 2504.15471). What each number counts: `evaluate.py`'s docstring."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from workbench.analyses.bigram.evaluate import BigramEval, layer_and_kind
from workbench.analysis import Result


@dataclass
class BigramResult(Result):
    model: str
    matrix_names: list[str]
    """HF names of every masked matrix (attention and MLP weights of every block)."""
    matrix_kept: list[int]
    matrix_total: list[int]
    n_kept: int
    n_maskable: int
    kept_fraction: float
    """Kept entries / entries of the maskable matrices (biases, norms, embeddings never masked)."""
    first_mlp_share: float
    """Share of all kept entries that lie in layer 0's MLP matrices."""
    ablation: list[dict]
    """Rows: variant, kept_fraction, mean_surprisal, std_surprisal (nats, held-out text)."""
    r_bigram: float
    """Pearson r, subnetwork vs bigram surprisals, positions with finite bigram surprisal."""
    n_r: int
    n_inf_dropped: int
    ce_bigram: float
    """Mean CE(P_bigram ‖ subnetwork) over every held-out position (nats)."""
    ce_bigram_full: float
    """The same for the full model."""
    n_positions: int
    scatter_bigram: torch.Tensor
    scatter_masked: torch.Tensor
    covsim_full: torch.Tensor
    """[site, site] cosine of residual covariances; site 0 = embeddings, site l = after block l−1."""
    covsim_sub: torch.Tensor
    held_out: str = ""
    """Which text was evaluated (source and sequence range)."""
    mask_path: str = ""
    training: dict = field(default_factory=dict)
    curves: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_eval(cls, evaluation: BigramEval, model: str, **extra) -> BigramResult:
        """Fill the result from `evaluate()`'s output; `extra`: held_out, mask_path, training, curves."""
        kept, total = evaluation.matrix_kept, evaluation.matrix_total
        first_mlp = sum(k for n, k in zip(evaluation.matrix_names, kept) if _in_first_mlp(n))
        return cls(
            model=model,
            matrix_names=evaluation.matrix_names,
            matrix_kept=kept,
            matrix_total=total,
            n_kept=sum(kept),
            n_maskable=sum(total),
            kept_fraction=sum(kept) / max(sum(total), 1),
            first_mlp_share=first_mlp / max(sum(kept), 1),
            ablation=evaluation.ablation,
            r_bigram=evaluation.r_bigram,
            n_r=evaluation.n_r,
            n_inf_dropped=evaluation.n_inf_dropped,
            ce_bigram=evaluation.ce_bigram,
            ce_bigram_full=evaluation.ce_bigram_full,
            n_positions=evaluation.n_positions,
            scatter_bigram=evaluation.scatter_bigram,
            scatter_masked=evaluation.scatter_masked,
            covsim_full=evaluation.covsim_full,
            covsim_sub=evaluation.covsim_sub,
            **extra,
        )

    def by_layer_kind(self) -> tuple[list[int], list[str], torch.Tensor, torch.Tensor]:
        """layers, kinds, kept [layer, kind] and size [layer, kind] (0 where a kind is absent)."""
        parsed = [layer_and_kind(n) for n in self.matrix_names]
        layers = sorted({p[0] for p in parsed})
        kinds = list(dict.fromkeys(p[1] for p in parsed))
        kept = torch.zeros(len(layers), len(kinds), dtype=torch.long)
        size = torch.zeros_like(kept)
        for (layer, kind), k, t in zip(parsed, self.matrix_kept, self.matrix_total):
            kept[layers.index(layer), kinds.index(kind)] += k
            size[layers.index(layer), kinds.index(kind)] += t
        return layers, kinds, kept, size

    def alignment(self) -> dict[str, torch.Tensor]:
        """Per residual site: covariance similarity to the embeddings (current token) and to the
        last block's output (next-token space), for the full model and the subnetwork."""
        out = {}
        for name, sim in (("full", self.covsim_full), ("subnetwork", self.covsim_sub)):
            if sim.numel():
                out[f"{name}: current token"] = sim[:, 0]
                out[f"{name}: next token"] = sim[:, -1]
        return out

    def figures(self) -> dict[str, Any]:
        from workbench.analyses.bigram import figures

        return figures.all_figures(self)

    def summary(self) -> list[dict[str, Any]]:
        head = [
            {"measure": "kept fraction of maskable weights", "value": self.kept_fraction},
            {"measure": "kept entries", "value": self.n_kept},
            {"measure": "share of kept entries in layer 0 MLP", "value": self.first_mlp_share},
            {"measure": "surprisal r with the bigram model", "value": self.r_bigram},
            {"measure": "CE to bigram, subnetwork (nats)", "value": self.ce_bigram},
            {"measure": "CE to bigram, full model (nats)", "value": self.ce_bigram_full},
        ]
        rows = [
            {"measure": f"mean surprisal: {r['variant']}", "value": r["mean_surprisal"]}
            for r in self.ablation
        ]
        return head + rows


def _in_first_mlp(name: str) -> bool:
    layer, kind = layer_and_kind(name)
    return layer == 0 and kind.split(".")[0] == "mlp"  # Llama, GPT-2 and NeoX all name it `mlp`
