"""LRP backward rules for relevance patching (RelP; Jafari, Eberle, Khakzar, Nanda 2025, arXiv 2508.21258).

RelP(c) = (a_c^clean - a_c^corr) . d~M/da_c, where d~ is the gradient of a *modified backward graph*: each
nonlinearity's backward is replaced by an LRP rule, the forward values are untouched. `rules(model)` applies
the rules to a TransformerBridge for the length of a `with` block:

- "norm" (LN-rule, Ali et al. 2022): LayerNorm/RMSNorm with the scale 1/std or 1/rms held constant, so the
  norm is linear in its input (centring stays differentiable);
- "identity" (AttnLRP eq. 9): act(x) passes relevance as if act(x) = x * (act(x)/x).detach();
- "half" (uniform rule): the gated product act(gate) * up of SwiGLU/GeGLU gives each factor half the
  relevance (gradient x input of a product counts it twice);
- ah=True (AH-rule): the attention pattern (softmax output) is a constant in the backward;
- epsilon (LRP-eps on every projection and the unembedding): the output gradient is scaled by
  z / (z + eps * sign(z)).

How: hooks on the Bridge's own hook points, never module surgery and never construction-time state (the
reference fork's identity rule was fixed when the MLP was built and silently did nothing when switched on
after loading; methods.md 4.4). A rule spans two hook points (e.g. `ln.hook_in` -> `ln.hook_out`): the first
hook records the span's input, the second returns `_Bypass.apply(...)`, an autograd Function whose forward
returns the hook's own tensor (bit-identical forward) and whose backward sends the rule's gradient straight
to the recorded input, skipping the span's own graph. Hooks act only for the thread that entered the block,
so a concurrent forward pass on the same pooled model (the app's prompt lens) sees the plain model.
Limits: parameter gradients inside a bypassed span (the norm's weight) are not computed, and a hook that
replaces a span's input after the rules were entered is not seen by them (enter `rules` last).
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
from transformer_lens.model_bridge.generalized_components.gated_mlp import (
    GatedMLPBridge,
    resolve_activation_fn,
)
from transformer_lens.model_bridge.generalized_components.linear import LinearBridge
from transformer_lens.model_bridge.generalized_components.mlp import MLPBridge
from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge
from transformer_lens.model_bridge.generalized_components.unembedding import UnembeddingBridge

from workbench.interventions import model_lock

RULE_NAMES = ("norm", "identity", "half")
DEFAULT_RULES = ("norm", "identity", "half")  # RelP's default list; AH is opt-in there too
STABILIZER = 1e-6  # the fork's identity-rule stabiliser: act(x) / (x + 1e-6 sign x)
_levels = itertools.count(-880_000, -1)  # one hook level per `rules` block, so nested blocks stay apart

Rule = Callable[..., Sequence[torch.Tensor | None]]


class LRPRuleError(ValueError):
    """A rule name or option the model cannot honour; raised before any forward pass."""


class _Bypass(torch.autograd.Function):
    """Forward: `out` unchanged. Backward: `rule(grad, *inputs)` goes to `inputs`, nothing to `out`'s graph."""

    @staticmethod
    def forward(ctx, rule: Rule, out: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.rule = rule
        ctx.save_for_backward(*inputs)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None, *ctx.rule(grad, *ctx.saved_tensors))


def _stabilize(x: torch.Tensor) -> torch.Tensor:
    return x + STABILIZER * torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


def _norm_rule(norm: NormalizationBridge) -> Rule:
    """dy/dx of the norm with the scale (std or rms of x) held constant.

    y = c(x) / s * w + b (c centres for LayerNorm, is the identity for RMSNorm), so with s constant
    dx = c(dy * w) / s. Norm bridges that override the weight step (LNPre, RMSPre) are differentiated
    through that override instead (one small autograd call per norm in the backward).
    """
    oc = norm.original_component
    eps = (
        getattr(oc, "eps", None) or getattr(oc, "variance_epsilon", None) or getattr(norm.config, "eps", 1e-5)
    )
    closed_form = type(norm)._apply_weight_and_bias is NormalizationBridge._apply_weight_and_bias
    centre = not norm.uses_rms_norm

    def rule(grad: torch.Tensor, x: torch.Tensor):
        xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
        centred = xf - xf.mean(-1, keepdim=True) if centre else xf
        scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        if closed_form:
            weight = norm.weight + 1.0 if getattr(norm.config, "rmsnorm_uses_offset", False) else norm.weight
            g = grad.to(xf.dtype) * weight.to(xf.dtype)
            g = g - g.mean(-1, keepdim=True) if centre else g
            return ((g / scale).to(x.dtype),)
        with torch.enable_grad():
            x_ = xf.detach().requires_grad_(True)
            c = x_ - x_.mean(-1, keepdim=True) if centre else x_
            (dx,) = torch.autograd.grad(norm._apply_weight_and_bias(c / scale, x.dtype), x_, grad)
        return (dx.to(x.dtype),)

    return rule


def _act_rule(grad: torch.Tensor, pre: torch.Tensor, post: torch.Tensor):
    """Identity rule for post = act(pre): slope act(pre)/pre instead of act'(pre); `post` is not differentiated."""
    return grad * post / _stabilize(pre), None


def _gated_rule(act: Callable, identity: bool, half: bool) -> Rule:
    """h = act(g) * u. Identity: slope act(g)/g for the activation; half: each factor gets half of h's relevance."""
    share = 0.5 if half else 1.0

    def rule(grad: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
        with torch.enable_grad():
            g_ = g.detach().requires_grad_(not identity)
            a = act(g_)
        if identity:
            slope = a.detach() / _stabilize(g)
        else:  # the activation's ordinary derivative
            (slope,) = torch.autograd.grad(a, g_, torch.ones_like(a))
        return share * grad * u * slope, share * grad * a.detach()

    return rule


def _eps_rule(epsilon: float) -> Rule:
    def rule(grad: torch.Tensor, z: torch.Tensor):
        return (grad * z / (z + epsilon * torch.where(z >= 0, 1.0, -1.0).to(z.dtype)),)

    return rule


def _detached(grad: torch.Tensor):
    return ()


def check_rules(names: Sequence[str], epsilon: float | None = None) -> tuple[str, ...]:
    """The rule names, validated (unknown names and a non-positive epsilon are user errors)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in RULE_NAMES]
    if unknown:
        raise LRPRuleError(
            f"unknown LRP rule(s) {unknown}; known: {list(RULE_NAMES)} (plus ah=True, epsilon=...)"
        )
    if epsilon is not None and not epsilon > 0:
        raise LRPRuleError(f"epsilon must be a positive number, got {epsilon}")
    return tuple(dict.fromkeys(names))


class _Plan:
    """What each hook point does under the rules; `applied` counts rule applications inside the block."""

    def __init__(self, model, names: tuple[str, ...], ah: bool, epsilon: float | None):
        self.steps: dict[object, list[Callable]] = {}
        self.saved: dict[str, torch.Tensor] = {}
        self.applied: Counter[str] = Counter()
        self.owner = threading.get_ident()
        self.planned: list[tuple[str, str]] = []  # (module path, rule) pairs, to catch idle rules
        for path, module in model.named_modules():
            if "norm" in names and isinstance(module, NormalizationBridge):
                self._span("norm", path, module.hook_in, module.hook_out, [], _norm_rule(module))
            if {"identity", "half"} & set(names) and isinstance(module, MLPBridge):
                self._mlp(path, module, "identity" in names, "half" in names)
            if ah and isinstance(module, AttentionBridge):
                self.planned.append((path, "ah"))
                self._add(module.hook_pattern, partial(self._bypass, "ah", [], _detached))
            if epsilon is not None and isinstance(module, LinearBridge | UnembeddingBridge):
                self._add(module.hook_out, partial(self._bypass, "epsilon", ["@self"], _eps_rule(epsilon)))
        # a rule with nothing to act on would silently be plain AtP (the fork's pitfall); "half" is
        # legitimately idle on ungated MLPs (GPT-2), so it is not checked
        found = {r for *_, r in self.planned}
        idle = [r for r in (*[n for n in names if n != "half"], *(["ah"] if ah else [])) if r not in found]
        if idle:
            raise LRPRuleError(
                f"LRP rule(s) {idle} found nothing to act on in {type(model).__name__}: no "
                "TransformerBridge norm / MLP / attention module of the supported kinds"
            )

    def _mlp(self, path: str, mlp: MLPBridge, identity: bool, half: bool) -> None:
        if type(mlp) is GatedMLPBridge:
            oc = mlp.original_component
            act = getattr(oc, "act_fn", None) or resolve_activation_fn(mlp.config)
            gate, up, out = mlp.gate.hook_out, getattr(mlp, "in").hook_out, mlp.out.hook_in
            rule = _gated_rule(act, identity, half)
            label = "+".join(n for n, on in (("identity", identity), ("half", half)) if on)
            self._span(label, path, gate, out, [(up, path + ":up")], rule)
        elif type(mlp) is MLPBridge:
            if identity:  # an ungated MLP has no product: "half" has nothing to do there
                self._span(
                    "identity", path, getattr(mlp, "in").hook_out, mlp.out.hook_in, ["@self"], _act_rule
                )
        else:
            raise LRPRuleError(
                f"LRP rules 'identity'/'half' do not support {type(mlp).__name__} ({path}); "
                "supported: MLPBridge, GatedMLPBridge"
            )

    def _span(self, rule: str, path: str, first, last, more: list, fn: Rule) -> None:
        """Record `first` (and `more` points) during the forward; bypass at `last` with `fn`."""
        keys = [path]
        self.planned += [(path, r) for r in rule.split("+")]
        self._add(first, partial(self._record, path))
        for extra in more:
            if extra == "@self":
                keys.append("@self")
            else:
                point, key = extra
                self._add(point, partial(self._record, key))
                keys.append(key)
        self._add(last, partial(self._bypass, rule, keys, fn))

    def _add(self, point, step: Callable) -> None:
        self.steps.setdefault(point, []).append(step)

    def _record(self, key: str, t: torch.Tensor) -> torch.Tensor:
        self.saved[key] = t
        return t

    def _bypass(self, rule: str, keys: list[str], fn: Rule, t: torch.Tensor) -> torch.Tensor:
        inputs = []
        for key in keys:
            if key == "@self":
                inputs.append(t)
            elif (x := self.saved.pop(key, None)) is None:
                raise LRPRuleError(
                    f"LRP rule '{rule}' at {key}: its input hook did not fire before its output"
                )
            else:
                inputs.append(x)
        for name in rule.split("+"):
            self.applied[name] += 1
        return _Bypass.apply(fn, t, *inputs)

    def hook(self, steps: list[Callable], t: torch.Tensor, hook) -> torch.Tensor | None:
        if threading.get_ident() != self.owner:
            return None  # a forward pass of another thread on the same pooled model sees no rules
        for step in steps:
            t = step(t)
        return t


@contextmanager
def rules(
    model,
    names: Sequence[str] = DEFAULT_RULES,
    *,
    ah: bool = False,
    epsilon: float | None = None,
) -> Iterator[Counter]:
    """Apply LRP rules to `model`'s backward inside the block; yields a Counter of rule applications.

    The forward pass is bit-identical to the plain one; every hook is removed on exit, also when the block
    raises. `names` is a subset of ("norm", "identity", "half") (or a comma-separated string).
    """
    names = check_rules(names, epsilon)
    plan = _Plan(model, names, ah, epsilon)  # raises on unsupported modules before any hook is added
    level = next(_levels)
    points = list(plan.steps)
    with model_lock(model):  # a run holds the model's lock, as every intervention block does
        try:
            for point in points:
                point.add_hook(partial(plan.hook, plan.steps[point]), dir="fwd", level=level)
            yield plan.applied
        finally:
            for point in points:
                point.remove_hooks("fwd", level=level)
            plan.saved.clear()
