"""Running top-k examples per latent with one example per distinct token window.

Repeated text (WikiText headers, boilerplate) puts the same context window in a latent's top list
many times (one sentence filled 7 of a latent's top 20). Each store row gets a hash of the token
window the dashboard shows around it; a latent's top list keeps the highest activation of each
window once. Within a batch, rows sharing a window are reduced to their maximum first, so a batch
full of copies cannot crowd out other windows.
"""

from __future__ import annotations

import torch

_PRIME = (1 << 31) - 1  # two 31-bit polynomial hashes, packed in one int64: no overflow anywhere
_BASES = (1_000_003, 998_244_353)


@torch.no_grad()
def window_hashes(token_ids: torch.Tensor, ctx_len: int, before: int, after: int) -> torch.Tensor:
    """[rows] int64 hash of tokens [r − before, r + after] within row r's sequence (−1 outside)."""
    n = len(token_ids)
    rows = torch.arange(n)
    parts = []
    for base in _BASES:
        h = torch.zeros(n, dtype=torch.int64)
        for w in range(-before, after + 1):
            at = rows + w
            inside = (at >= 0) & (at < n) & (at // ctx_len == rows // ctx_len)
            tok = torch.where(inside, token_ids[at.clamp(0, n - 1)], -1) + 2  # >= 1
            h = (h * base + tok) % _PRIME
        parts.append(h)
    return parts[0] * (1 << 31) + parts[1]


class UniqueTopK:
    """Top-k values per latent over streamed batches, at most one per window hash."""

    def __init__(self, n: int, k: int):
        self.k = k
        self.vals = torch.full((n, k), -torch.inf)
        self.rows = torch.full((n, k), -1)
        self.hashes = torch.full((n, k), -1, dtype=torch.int64)

    @torch.no_grad()
    def add(self, v: torch.Tensor, rows: torch.Tensor, hashes: torch.Tensor) -> None:
        """v: [B, n] candidate values (−inf = not a candidate); rows, hashes: [B]."""
        uniq, inv = hashes.unique(return_inverse=True)  # [U], [B]
        n = v.shape[1]
        index = inv[:, None].expand(-1, n)
        best = torch.full((len(uniq), n), -torch.inf).scatter_reduce(0, index, v, "amax")
        at_best = (v == best[inv]) & (v > -torch.inf)
        best_row = torch.full((len(uniq), n), -1).scatter_reduce(
            0, index, torch.where(at_best, rows[:, None], -1), "amax"
        )
        cv, gi = best.T.topk(min(self.k, len(uniq)), dim=1)  # [n, k'] distinct windows
        self._merge(cv, best_row.T.gather(1, gi), uniq[gi])

    def _merge(self, cv: torch.Tensor, cr: torch.Tensor, ch: torch.Tensor) -> None:
        vals = torch.cat([self.vals, cv], 1)  # [n, M]
        rows = torch.cat([self.rows, cr], 1)
        hashes = torch.cat([self.hashes, ch], 1)
        vals, order = vals.sort(dim=1, descending=True)
        rows, hashes = rows.gather(1, order), hashes.gather(1, order)
        m = vals.shape[1]
        earlier = torch.ones(m, m, dtype=torch.bool).tril(-1)  # [j, j']: j' before j
        same = (hashes[:, :, None] == hashes[:, None, :]) & earlier  # [n, M, M]
        dup = same.any(-1) & (vals > -torch.inf)
        vals = vals.masked_fill(dup, -torch.inf)
        self.vals, idx = vals.topk(self.k, dim=1)
        self.rows, self.hashes = rows.gather(1, idx), hashes.gather(1, idx)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [n, k], rows [n, k]); empty slots: value −inf, row −1."""
        rows = self.rows.masked_fill(self.vals == -torch.inf, -1)
        return self.vals, rows
