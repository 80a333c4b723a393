"""Corpus bigram model: the target distribution of bigram subnetworks (Chang & Bergen 2025, §5).

P_bigram(w_{t+1} | w_t) is the maximum-likelihood estimate from counts of adjacent token pairs in
a text source tokenized with the model's tokenizer, exactly as the reference `ngram_utils.py`
(`NGramModel.ngram_predict_with_backoff`, bigrams, no count pruning):

- a context seen in the corpus            -> count(prev, w) / count(prev, ·)   (MLE, no smoothing)
- a context never seen as a context       -> the unigram distribution count(w) / N
- no unigram counts at all (empty corpus) -> uniform 1/vocab (unreachable here: MIN_TOKENS refuses it)

No smoothing: a token never seen after a seen context, or never seen at all under the unigram
back-off, has probability 0 and infinite surprisal (the evaluation drops those, as the
reference's `ngram_corr_dropinf`).

Counting. Each document is tokenized without special tokens and followed by EOS, as `data.pack`
packs it. Pairs never cross documents: the first token of a document is counted after the
*start* context (row `vocab_size`, the reference's placeholder id), never after the previous
document's EOS. Unigram counts are the column sums (every counted token once). `contexts()` maps
BOS/EOS inputs to the start context, since after them a model predicts a document's first token.

Surprisal is in nats (−ln p) everywhere, like the cross-entropy.

Storage: CSR arrays (`indptr` [vocab+2], `indices`, `counts`) in safetensors under
`$WORKBENCH_HOME/bigrams/<key>/`, key = sha256(tokenizer definition, corpus fingerprint, vocab),
so a second call with the same tokenizer and text is a load.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from safetensors.torch import load_file, save

from workbench import data, paths

BIGRAM_VERSION = 1  # bump when the same text would count differently
MIN_TOKENS = 1000
"""Smallest corpus accepted: a floor against degenerate corpora, not a quality bar. Measured with the
SmolLM2 tokenizer, counting the first K tokens of WikiText-2 test and looking up the contexts of its
last 50k tokens: a seen context (a real bigram row, not the unigram back-off) at 39 % of positions
for K = 200, 47 % for 1,000, 67 % for 10,000, 87 % for 100,000. Below ~1,000 tokens most targets
are the unigram, so the mask would learn a unigram model."""
_REDUCE_EVERY = 4_000_000  # pairs buffered before merging into the running counts (~64 MB)


class BigramError(ValueError):
    """A corpus or input the bigram model cannot use; the message says why (CLI: `error: ...`)."""


class BigramModel:
    """Bigram counts in CSR form and the back-off distribution over a `vocab_size` vocabulary.

    Rows 0..vocab-1 are previous tokens, row `vocab_size` (`self.start`) is the document start.
    API (fixed; the mask training's loss uses `cross_entropy`):
    - `prob(prev, next)` -> P(next | prev) [n]; `surprisal(prev, next)` -> −ln P [n] (nats, may be inf)
    - `cross_entropy(prev, log_q)` -> [n] = −Σ_w P(w | prev) log_q[:, w], no dense [n, vocab] target
    - `dense(prev)` -> [n, vocab] target (small tests only)
    - `contexts(token_ids, specials)` -> ids with BOS/EOS replaced by the start context
    """

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor, counts: torch.Tensor, vocab_size: int):
        if indptr.shape != (vocab_size + 2,):
            raise BigramError(f"indptr has shape {tuple(indptr.shape)}; expected ({vocab_size + 2},)")
        self.vocab_size = vocab_size
        self.start = vocab_size
        self.indptr = indptr.long()
        self.indices = indices.long()
        self.counts = counts.long()
        self.row_total = self.counts.new_zeros(vocab_size + 1)
        rows = self._row_of_entries()
        self.row_total.index_add_(0, rows, self.counts)
        self.cond = (self.counts.double() / self.row_total[rows].clamp(min=1)).float()  # P(w | row) per entry
        self.unigram_counts = torch.zeros(vocab_size, dtype=torch.long).index_add_(
            0, self.indices, self.counts
        )
        self.n_tokens = int(self.unigram_counts.sum())
        if self.n_tokens:
            self.unigram = (self.unigram_counts / self.n_tokens).float()
        else:  # the reference's last resort: no counts at all -> uniform
            self.unigram = torch.full((vocab_size,), 1.0 / vocab_size)
        self._tables: dict[torch.device, dict[str, torch.Tensor]] = {}
        self._keys = rows * vocab_size + self.indices  # sorted: CSR rows ascending, columns sorted

    def _row_of_entries(self) -> torch.Tensor:
        return torch.repeat_interleave(torch.arange(self.vocab_size + 1), self.indptr.diff())

    # --- lookups ------------------------------------------------------------------------------
    def seen(self, prev: torch.Tensor) -> torch.Tensor:
        """Whether each context was seen in the corpus (else it backs off to the unigram)."""
        return self.row_total[self._check_prev(prev)] > 0

    def prob(self, prev: torch.Tensor, next: torch.Tensor) -> torch.Tensor:
        """P_bigram(next | prev) with the back-off above. prev, next: [n] ids -> [n] float."""
        prev, next = self._check_prev(prev), torch.as_tensor(next).long()
        key = prev * self.vocab_size + next
        pos = torch.searchsorted(self._keys, key).clamp(max=max(len(self._keys) - 1, 0))
        hit = self._keys[pos] == key if len(self._keys) else torch.zeros_like(key, dtype=torch.bool)
        bigram = torch.where(hit, self.cond[pos] if len(self.cond) else 0.0, 0.0)
        return torch.where(self.seen(prev), bigram, self.unigram[next])

    def surprisal(self, prev: torch.Tensor, next: torch.Tensor) -> torch.Tensor:
        """−ln P_bigram(next | prev) in nats; inf where the corpus gives probability 0."""
        return -torch.log(self.prob(prev, next).double()).float()

    def cross_entropy(self, prev: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """CE(P_bigram(·|prev), q) = −Σ_w P(w|prev) log q(w) per row; prev [n], log_q [n, vocab] -> [n].

        Seen contexts: a gather of log_q at the context's observed successors (CSR entries only);
        unseen contexts: one dot product with the unigram. Differentiable in log_q."""
        prev = self._check_prev(prev).to(log_q.device)
        if log_q.ndim != 2 or log_q.shape != (len(prev), self.vocab_size):
            raise BigramError(
                f"log_q has shape {tuple(log_q.shape)}; expected ({len(prev)}, {self.vocab_size})"
            )
        table = self._on(log_q.device)
        seen = table["row_total"][prev] > 0
        out = log_q.new_zeros(len(prev))
        rows = seen.nonzero().squeeze(1)
        if len(rows):
            out = out.index_put((rows,), self._seen_ce(prev[rows], log_q[rows]))
        rows = (~seen).nonzero().squeeze(1)
        if len(rows):
            out = out.index_put((rows,), -(log_q[rows] @ table["unigram"].to(log_q.dtype)))
        return out

    def _seen_ce(self, prev: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        device = log_q.device
        table = self._on(device)
        indptr = table["indptr"]
        starts, lengths = indptr[prev], indptr[prev + 1] - indptr[prev]
        row = torch.repeat_interleave(torch.arange(len(prev), device=device), lengths)
        first = torch.cumsum(lengths, 0) - lengths  # where each row's entries start in the batch
        entry = torch.arange(int(lengths.sum()), device=device) - first[row] + starts[row]
        cols, weight = table["indices"][entry], table["cond"][entry].to(log_q.dtype)
        return -log_q.new_zeros(len(prev)).index_add(0, row, log_q[row, cols] * weight)

    def _on(self, device) -> dict[str, torch.Tensor]:
        """The lookup tables on `device`, copied once per device (a training loop calls this every step)."""
        device = torch.device(device)
        if device not in self._tables:
            names = ("indptr", "indices", "cond", "row_total", "unigram")
            self._tables[device] = {n: getattr(self, n).to(device) for n in names}
        return self._tables[device]

    def dense(self, prev: torch.Tensor) -> torch.Tensor:
        """The full target P(·|prev) [n, vocab], for small tests."""
        prev = self._check_prev(prev)
        out = self.unigram.repeat(len(prev), 1)
        for i, p in enumerate(prev.tolist()):
            lo, hi = int(self.indptr[p]), int(self.indptr[p + 1])
            if hi > lo:
                out[i] = 0.0
                out[i, self.indices[lo:hi]] = self.cond[lo:hi]
        return out

    def contexts(self, token_ids: torch.Tensor, specials: list[int | None]) -> torch.Tensor:
        """token_ids with each special id (BOS, EOS) replaced by the start context."""
        out = torch.as_tensor(token_ids).long().clone()
        for s in {s for s in specials if s is not None}:
            out[out == s] = self.start
        return out

    def _check_prev(self, prev) -> torch.Tensor:
        prev = torch.as_tensor(prev).long()
        if len(prev) and (int(prev.min()) < 0 or int(prev.max()) > self.start):
            raise BigramError(f"context ids must lie in [0, {self.start}] (vocab {self.vocab_size} + start)")
        return prev

    # --- storage ------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        return {"indptr": self.indptr, "indices": self.indices.int(), "counts": self.counts}

    @classmethod
    def from_pairs(cls, prev: np.ndarray, next: np.ndarray, vocab_size: int) -> BigramModel:
        keys, counts = np.unique(prev.astype(np.int64) * vocab_size + next, return_counts=True)
        return cls._from_keys(keys, counts, vocab_size)

    @classmethod
    def _from_keys(cls, keys: np.ndarray, counts: np.ndarray, vocab_size: int) -> BigramModel:
        rows, cols = keys // vocab_size, keys % vocab_size
        indptr = np.zeros(vocab_size + 2, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=vocab_size + 1), out=indptr[1:])
        return cls(torch.from_numpy(indptr), torch.from_numpy(cols), torch.from_numpy(counts), vocab_size)


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of the tokenizer's full definition (fast tokenizers) or its vocabulary and class."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return paths.sha256_json(backend.to_str())
    return paths.sha256_json([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])


def bigram_model(source: str, tokenizer, vocab_size: int, progress: bool = True) -> BigramModel:
    """The cached BigramModel of `source` under `tokenizer`; counted (and cached) on first use.

    Raises BigramError for a corpus under MIN_TOKENS tokens, DataSourceError for unreadable text."""
    key = paths.sha256_json(
        [BIGRAM_VERSION, tokenizer_fingerprint(tokenizer), data.fingerprint(source), vocab_size]
    )
    folder = paths.home() / "bigrams" / key
    file = folder / "counts.safetensors"
    if file.exists():
        t = load_file(str(file))
        return BigramModel(t["indptr"], t["indices"], t["counts"], vocab_size)
    data.check_source(source)
    model = count(source, tokenizer, vocab_size, progress)
    folder.mkdir(parents=True, exist_ok=True)
    paths.atomic_write_bytes(file, save(model.tensors()))
    meta = {"source": source, "vocab_size": vocab_size, "n_tokens": model.n_tokens, "version": BIGRAM_VERSION}
    paths.atomic_write_bytes(folder / "meta.json", json.dumps(meta, indent=2).encode())
    return model


def count(source: str, tokenizer, vocab_size: int, progress: bool = True) -> BigramModel:
    """Count within-document bigrams of `source` (see the module docstring); not cached."""
    from tqdm import tqdm

    keys, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
    buffer: list[np.ndarray] = []
    n_buffered = 0
    bar = tqdm(unit="tok", desc="counting bigrams", disable=not progress)
    for ids in _document_ids(source, tokenizer):
        if ids.max() >= vocab_size:
            raise BigramError(f"token id {int(ids.max())} is outside the model's vocabulary ({vocab_size})")
        prev = np.concatenate([[vocab_size], ids[:-1]])  # first token: after the start context
        buffer.append(prev * vocab_size + ids)
        n_buffered += len(ids)
        bar.update(len(ids))
        if n_buffered >= _REDUCE_EVERY:
            keys, counts = _merge(keys, counts, buffer)
            buffer, n_buffered = [], 0
    bar.close()
    keys, counts = _merge(keys, counts, buffer)
    n_tokens = int(counts.sum())
    if n_tokens < MIN_TOKENS:
        raise BigramError(f"corpus has {n_tokens} tokens; bigram estimates need at least {MIN_TOKENS}")
    return BigramModel._from_keys(keys, counts, vocab_size)


def _merge(keys: np.ndarray, counts: np.ndarray, buffer: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not buffer:
        return keys, counts
    new_keys, new_counts = np.unique(np.concatenate(buffer), return_counts=True)
    all_keys, inverse = np.unique(np.concatenate([keys, new_keys]), return_inverse=True)
    return all_keys, np.bincount(inverse, weights=np.concatenate([counts, new_counts])).astype(np.int64)


def _document_ids(source: str, tokenizer, batch: int = 256):
    """Token ids of each document (no special tokens) followed by EOS, as `data.pack` packs them."""
    eos = tokenizer.eos_token_id
    docs: list[str] = []
    for text in data.iter_documents(source):
        docs.append(text)
        if len(docs) == batch:
            yield from _encode(docs, tokenizer, eos)
            docs = []
    yield from _encode(docs, tokenizer, eos)


def _encode(docs: list[str], tokenizer, eos: int | None):
    if not docs:
        return
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids = ids + [eos] if eos is not None else ids
        if ids:
            yield np.asarray(ids, dtype=np.int64)
