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
        if not (v > -torch.inf).any():
            return
        _, inv, counts = hashes.unique(return_inverse=True, return_counts=True)
        single = counts[inv] == 1  # most rows: their window occurs once in this batch
        if single.all():
            cv, ci = v.T.topk(min(self.k, len(v)), dim=1)  # [n, k']
            self._merge(cv, rows[ci], hashes[ci])
            return
        # copies of a window within the batch: each window's best row per latent, then the singles
        n, vd, rd = v.shape[1], v[~single], rows[~single]
        groups, gi = hashes[~single].unique(return_inverse=True)
        index = gi[:, None].expand(-1, n)
        best = torch.full((len(groups), n), -torch.inf).scatter_reduce(0, index, vd, "amax")
        at_best = (vd == best[gi]) & (vd > -torch.inf)
        best_row = torch.full((len(groups), n), -1).scatter_reduce(
            0, index, torch.where(at_best, rd[:, None], -1), "amax"
        )
        s_rows, s_hash = rows[single], hashes[single]
        S = len(s_rows)
        cv, ci = torch.cat([v[single], best]).T.topk(min(self.k, S + len(groups)), dim=1)  # [n, k']
        from_group = best_row.T.gather(1, (ci - S).clamp(min=0))
        cr = torch.where(ci < S, s_rows[ci.clamp(max=max(S - 1, 0))] if S else -1, from_group)
        ch = torch.where(
            ci < S, s_hash[ci.clamp(max=max(S - 1, 0))] if S else -1, groups[(ci - S).clamp(min=0)]
        )
        self._merge(cv, cr, ch)

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
