"""Mechanisms of factual recall after Lv et al. 2024 (arXiv 2403.19521), at the last position.

* DLA: each component's output c projected on the attribute's unembedding through the final
  norm with its scale frozen: DLA(c) = ((c - mean c) if LayerNorm else c) / s . (gamma * W_U[:, o]).
  Embedding + every attention output + every MLP output (+ the norm's bias and b_U) = the logit.
* Mover heads (path patching, IOI style): a head's output at the last position is replaced by
  its mean over the facts while every head's q, k, v stay at their clean values; the change of
  the attribute logit (MLPs downstream still respond). Their attention from the last position
  to the subject tokens is reported with it.
* Function application: the regression MLP_out = sum_h a_h head_h + b over facts (shared scalar
  a_h per upstream head at the last position, shared intercept vector b); b projected through
  the unembedding — does the "task" intercept point at the attributes?
* Anti-overconfidence: the final layer's components with negative mean DLA, and P(attribute)
  when they are zeroed at the last position.
"""

from __future__ import annotations

import torch

from workbench.analyses.factual.tracing import EMBED, last_logits
from workbench.interventions import hook_points, hooked

N_TOP = 10


def _names(n_layers: int) -> list[str]:
    per = ("hook_attn_out", "hook_mlp_out", "attn.hook_z", "attn.hook_q", "attn.hook_k", "attn.hook_v")
    per += ("attn.hook_pattern",)
    return [EMBED, "hook_pos_embed", f"blocks.{n_layers - 1}.hook_resid_post"] + [
        f"blocks.{layer}.{n}" for layer in range(n_layers) for n in per
    ]


@torch.no_grad()
def clean_cache(model, tokens) -> dict[str, torch.Tensor]:
    """Every activation the mechanisms need, one clean run, batch dim dropped."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(x, hook):
            acts[name] = x[0].detach().clone()

        return hook

    names = _names(model.cfg.n_layers)
    points = {n: p for n, p in model.hook_dict.items() if n in names}
    with hooked(model, fwd=[(n, keep(n)) for n in points], points=points):
        acts["logits"] = model(tokens[None], return_type="logits")[0, -1]
    return acts


def unembed_dir(model, target: int) -> torch.Tensor:
    """gamma * W_U[:, target]: the direction a normalized residual is read along for the target."""
    gamma = next((p for n, p in model.ln_final.named_parameters() if n.endswith("weight")), None)
    w = model.W_U[:, target]
    return w * gamma if gamma is not None else w


def _layer_norm(model) -> bool:
    return str(model.cfg.normalization_type).startswith("LN")


def final_scale(model, resid: torch.Tensor) -> torch.Tensor:
    """The final norm's scale s [pos] of residuals [pos, d] (centred variance for LayerNorm)."""
    x = resid - resid.mean(-1, keepdim=True) if _layer_norm(model) else resid
    return (x.pow(2).mean(-1) + model.cfg.eps).sqrt()


def project(model, comp: torch.Tensor, scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """DLA of component outputs [..., pos, d] with scales [pos]: [..., pos]."""
    if _layer_norm(model):
        comp = comp - comp.mean(-1, keepdim=True)
    return (comp / scale[:, None]) @ w


def head_outputs(model, z: torch.Tensor, layer: int) -> torch.Tensor:
    """[pos, head, d_head] -> each head's output [pos, head, d_model] (z_h W_O[h], without b_O)."""
    return torch.einsum("phe,hed->phd", z, model.blocks[layer].attn.W_O)


@torch.no_grad()
def dla(model, cache: dict, target: int) -> dict[str, torch.Tensor]:
    """heads [layer, head] at the last position; mlp, attn [layer, pos]; embed [pos]; rest (norm bias + b_U)."""
    n_layers = model.cfg.n_layers
    w = unembed_dir(model, target)
    scale = final_scale(model, cache[f"blocks.{n_layers - 1}.hook_resid_post"])
    embed = cache[EMBED] + cache.get("hook_pos_embed", 0)
    heads = torch.stack(
        [
            project(model, head_outputs(model, cache[f"blocks.{i}.attn.hook_z"][-1:], i)[0], scale[-1:], w)
            for i in range(n_layers)
        ]
    )
    bias = next((p for n, p in model.ln_final.named_parameters() if n.endswith("bias")), None)
    rest = model.b_U[target] + (bias @ model.W_U[:, target] if bias is not None else 0.0)
    return {
        "heads": heads,
        "mlp": torch.stack(
            [project(model, cache[f"blocks.{i}.hook_mlp_out"], scale, w) for i in range(n_layers)]
        ),
        "attn": torch.stack(
            [project(model, cache[f"blocks.{i}.hook_attn_out"], scale, w) for i in range(n_layers)]
        ),
        "embed": project(model, embed, scale, w),
        "rest": torch.as_tensor(float(rest.detach() if torch.is_tensor(rest) else rest)),
    }


def attention_to_subject(model, cache: dict, start: int, end: int) -> torch.Tensor:
    """[layer, head]: attention weight from the last position to the subject tokens (summed)."""
    return torch.stack(
        [cache[f"blocks.{i}.attn.hook_pattern"][:, -1, start:end].sum(-1) for i in range(model.cfg.n_layers)]
    )


@torch.no_grad()
def path_patch(model, tokens, target: int, cache: dict, means: torch.Tensor, max_rows: int) -> torch.Tensor:
    """[layer, head]: attribute logit with the head's last-position output mean-ablated (q, k, v of
    every head frozen clean) minus the clean logit."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    senders = [(layer, h) for layer in range(n_layers) for h in range(n_heads)]
    frozen = [f"blocks.{i}.attn.hook_{x}" for i in range(n_layers) for x in "qkv"]
    zs = [f"blocks.{i}.attn.hook_z" for i in range(n_layers)]
    points = hook_points(model, frozen + zs + ["ln_final.hook_out"])
    clean = float(cache["logits"][target])
    out = []
    for i in range(0, len(senders), max_rows):
        chunk = senders[i : i + max_rows]
        fwd = [(n, _freeze(cache[n])) for n in frozen]
        fwd += [
            (zs[i], _ablate([(r, h) for r, (ls, h) in enumerate(chunk) if ls == i], means[i]))
            for i in range(n_layers)
        ]
        logits = last_logits(model, tokens[None].expand(len(chunk), -1), fwd, points)
        out.append(logits[:, target].float() - clean)
    return torch.cat(out).view(n_layers, n_heads)


def _freeze(value: torch.Tensor):
    def hook(x, hook):
        return value.to(x.dtype).expand_as(x).clone()

    return hook


def _ablate(cells: list[tuple[int, int]], mean: torch.Tensor):
    rows = torch.tensor([r for r, _ in cells], dtype=torch.long)
    heads = torch.tensor([h for _, h in cells], dtype=torch.long)

    def hook(x, hook):
        if not len(rows):
            return None
        x = x.clone()
        x[rows, -1, heads] = mean[heads].to(x.dtype)
        return x

    return hook


def regression(model, mlp_out: torch.Tensor, heads: torch.Tensor, targets: list[int], scales) -> dict:
    """MLP_out [fact, d] ~ sum_h a_h heads[:, h] ([fact, head, d]) + b, least squares over every
    fact and dimension; R^2 (over the variation around the facts' mean) and b through the unembedding."""
    n, d = mlp_out.shape
    y, x = mlp_out.double(), heads.double()
    y_c, x_c = y - y.mean(0), x - x.mean(0)
    if x.shape[1]:
        a = torch.linalg.lstsq(x_c.permute(0, 2, 1).reshape(n * d, -1), y_c.reshape(n * d, 1)).solution[:, 0]
    else:
        a = torch.zeros(0, dtype=torch.float64)
    fit = y_c - torch.einsum("nhd,h->nd", x_c, a)
    total = float(y_c.pow(2).sum())
    r2 = 1 - float(fit.pow(2).sum()) / total if total > 0 else float("nan")
    b = y.mean(0) - torch.einsum("hd,h->d", x.mean(0), a)
    w = model.W_U.double()
    gamma = next((p for nm, p in model.ln_final.named_parameters() if nm.endswith("weight")), None)
    bb = b - b.mean() if _layer_norm(model) else b
    logits = (bb * (gamma.double() if gamma is not None else 1.0)) @ w / float(scales.mean())
    order = logits.argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    ranks = [int(rank[t]) for t in targets]
    return {
        "r2": r2,
        "coef": a.float(),
        "top_tokens": [model.tokenizer.decode([int(t)]) for t in order[:N_TOP]],
        "target_ranks": ranks,
        "median_rank": float(torch.tensor(ranks, dtype=torch.float).median()) if ranks else float("nan"),
    }


@torch.no_grad()
def suppression(model, prepared, remove_mlp: bool, heads: list[int]) -> torch.Tensor:
    """[fact, 2]: P(attribute) clean, and with the final layer's MLP (if `remove_mlp`) and `heads`
    zeroed at the last position."""
    last = model.cfg.n_layers - 1
    idx = torch.tensor(heads, dtype=torch.long)

    def zero_mlp(x, hook):
        x = x.clone()
        x[:, -1] = 0
        return x

    def zero_heads(x, hook):
        x = x.clone()
        x[:, -1, idx] = 0
        return x

    fwd = ([(f"blocks.{last}.hook_mlp_out", zero_mlp)] if remove_mlp else []) + (
        [(f"blocks.{last}.attn.hook_z", zero_heads)] if heads else []
    )
    out = []
    for p in prepared:
        clean = last_logits(model, p.tokens[None], []).float().softmax(-1)[0, p.target]
        cut = last_logits(model, p.tokens[None], fwd).float().softmax(-1)[0, p.target]
        out.append(torch.stack([clean, cut]))
    return torch.stack(out).cpu()


@torch.no_grad()
def run_all(model, prepared, max_batch_tokens: int, progress) -> dict:
    """Every mechanism on every fact: tensors [fact, ...] plus the regression and suppression summaries."""
    caches, per = (
        [],
        {"heads": [], "mlp_last": [], "attn_last": [], "embed_last": [], "rest": [], "subject_attn": []},
    )
    mlp_pos, attn_pos = [], []
    for p in progress(prepared, desc="mechanisms: caches and DLA"):
        c = clean_cache(model, p.tokens)
        caches.append(c)
        got = dla(model, c, p.target)
        per["heads"].append(got["heads"])
        per["mlp_last"].append(got["mlp"][:, -1])
        per["attn_last"].append(got["attn"][:, -1])
        per["embed_last"].append(got["embed"][-1])
        per["rest"].append(got["rest"])
        per["subject_attn"].append(attention_to_subject(model, c, p.start, p.end))
        mlp_pos.append(got["mlp"])
        attn_pos.append(got["attn"])
    n_layers = model.cfg.n_layers
    means = torch.stack(
        [torch.stack([c[f"blocks.{i}.attn.hook_z"][-1] for i in range(n_layers)]) for c in caches]
    ).mean(0)
    paths = [
        path_patch(model, p.tokens, p.target, c, means, max(1, max_batch_tokens // len(p.tokens)))
        for p, c in zip(progress(prepared, desc="mechanisms: path patching"), caches)
    ]
    out = {k: torch.stack(v).float().cpu() for k, v in per.items()}
    out["path"] = torch.stack(paths).cpu()
    out["mlp_pos"], out["attn_pos"] = mlp_pos, attn_pos
    out["regression"] = _regress(model, prepared, caches, out)
    out["suppression"], out["suppressors"] = _suppress(model, prepared, out)
    return out


def _regress(model, prepared, caches, out) -> dict:
    """The function-application regression at the MLP with the largest mean DLA at the last position."""
    if len(prepared) < 3:
        return {"layer": -1, "note": "needs at least 3 facts"}
    layer = int(out["mlp_last"].mean(0).argmax())
    last = model.cfg.n_layers - 1
    mlp = torch.stack([c[f"blocks.{layer}.hook_mlp_out"][-1] for c in caches])
    heads = torch.stack(
        [
            torch.cat(
                [head_outputs(model, c[f"blocks.{i}.attn.hook_z"][-1:], i)[0] for i in range(layer)]
                or [mlp[:0].new_zeros(0, mlp.shape[1])]
            )
            for c in caches
        ]
    )
    scales = torch.stack([final_scale(model, c[f"blocks.{last}.hook_resid_post"])[-1] for c in caches])
    got = regression(model, mlp.cpu(), heads.cpu(), [p.target for p in prepared], scales.cpu())
    got["layer"] = layer
    got["coef"] = got["coef"].tolist()
    return got


def _suppress(model, prepared, out) -> tuple[torch.Tensor, dict]:
    """The final layer's components with negative mean DLA (logit units) and P with them removed."""
    mlp = float(out["mlp_last"][:, -1].mean())
    heads = out["heads"][:, -1].mean(0)
    negative = [h for h in range(len(heads)) if float(heads[h]) < 0]
    probs = suppression(model, prepared, mlp < 0, negative)
    info = {
        "mlp_dla": mlp,
        "head_dla": [float(v) for v in heads],
        "removed": (["mlp"] if mlp < 0 else []) + [f"{model.cfg.n_layers - 1}.{h}" for h in negative],
        "suppression": min(mlp, 0.0) + float(heads.clamp(max=0).sum()),
    }
    return probs, info
