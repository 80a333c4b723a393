"""Gradient attributions of the metric to components: AtP, RelP and integrated gradients.

* AtP (Nanda 2023; Kramar et al. 2024): score(c) = (a_c^source - a_c^base) . dM/da_c, the gradient
  taken on the base run (the corrupted run when denoising): 2 forward passes + 1 backward pass
  score every component at once. A first-order Taylor approximation of activation patching.
* RelP (Jafari, Eberle, Khakzar, Nanda 2025): the same product with the gradient of the backward
  graph that `workbench.lrp.rules` modifies (LRP propagation coefficients); forward unchanged.
  It is `gradients(...)` called inside `with lrp.rules(model, ...)`, nothing else.
* IG (EAP-IG style; Hanna et al. 2024): the gradient averaged over n points on the straight
  path between the base and source input embeddings (midpoint rule, alpha = (k + 1/2)/n), times
  the same activation difference: n forward + n backward passes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from jaxtyping import Float, Int

from workbench.interventions import hooked

EMBED = "hook_embed"  # token embedding output: the IG path interpolates here


class NoGradientError(ValueError):
    """The model gives no gradient to its activations (inference mode, or a model without autograd)."""


def gradients(
    model,
    tokens: Int[torch.Tensor, "batch pos"],
    hooks: list[str],
    metric: Callable,
    rows: Int[torch.Tensor, " batch"],
    embed: Callable | None = None,
    points: dict | None = None,
) -> dict[str, torch.Tensor]:
    """dM/da at each hook (hook name -> [batch, pos, ...]) for one forward + one backward pass.

    M is the sum of the per-row metric (rows never interact, so row i's gradient is that of
    its own prompt's metric). `embed` may replace the token embedding (IG's interpolation).
    """
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(x, hook):
            acts[name] = x
            return x

        return hook

    def leaf(x, hook):  # a graph from the embedding on, also when the weights are frozen
        x = embed(x) if embed is not None else x
        return x if x.requires_grad else x.detach().requires_grad_(True)

    fwd = [(EMBED, leaf)] + [(n, keep(n)) for n in dict.fromkeys(hooks)]
    if torch.is_inference_mode_enabled():
        raise NoGradientError("the model is running under torch.inference_mode(): no gradients to attribute")
    with torch.enable_grad(), hooked(model, fwd=fwd, points=points):
        logits = model(tokens, return_type="logits")
        value = metric(logits[:, -1], rows).sum()
        if not value.requires_grad:
            raise NoGradientError("the model gives no gradients (its forward pass is detached from autograd)")
        found = [n for n in dict.fromkeys(hooks) if n in acts]
        grads = torch.autograd.grad(value, [acts[n] for n in found], allow_unused=True)
    out = {n: (g if g is not None else torch.zeros_like(acts[n])).detach() for n, g in zip(found, grads)}
    return {n: out[n] for n in hooks}


def integrated_gradients(
    model,
    base_tokens: Int[torch.Tensor, "batch pos"],
    e_base: Float[torch.Tensor, "batch pos d_model"],
    e_source: Float[torch.Tensor, "batch pos d_model"],
    hooks: list[str],
    metric: Callable,
    steps: int,
    max_rows: int,
    points: dict | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """Mean gradient over the embedding path e_base -> e_source (hook -> [batch, pos, ...]) and the calls made.

    `e_base`/`e_source`: the token-embedding outputs (`hook_embed`) of the base and source prompts.
    """
    b = base_tokens.shape[0]
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps
    per_call = max(1, max_rows // b)
    total: dict[str, torch.Tensor] = {}
    calls = 0
    for start in range(0, steps, per_call):
        a = alphas[start : start + per_call].to(e_base.dtype)
        path = (e_base + a.view(-1, 1, 1, 1) * (e_source - e_base)).reshape(-1, *e_base.shape[1:])
        grads = gradients(
            model,
            base_tokens.repeat(len(a), 1),
            hooks,
            metric,
            torch.arange(b).repeat(len(a)),
            embed=lambda x, path=path: path.to(x.dtype),
            points=points,
        )
        for name, g in grads.items():
            g = g.view(len(a), b, *g.shape[1:]).sum(0)
            total[name] = total[name] + g if name in total else g
        calls += 1
    return {n: g / steps for n, g in total.items()}, calls
