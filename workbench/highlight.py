"""Tokens coloured by one value each, as HTML: the prompt lens's view, inline in Jupyter too.

The feature-dashboard convention (Bricken et al. 2023; sae_vis / CircuitsVis `colored_tokens`):
orange for positive, blue for negative, opacity |value| / scale; hovering a token shows its value.
The scale can leave out positions (BOS: smollm2's BOS residual norm is ~2.5e4 against ~1e2 for the
other tokens, so a scale that includes it leaves every other token white); those positions are
drawn saturated and the legend says which were left out and their values.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field

POSITIVE, NEGATIVE = "255,110,0", "40,110,255"


def colour(value: float, vmax: float) -> str:
    """rgba of one value on a scale of ±vmax (clipped at the ends)."""
    alpha = min(abs(value) / vmax, 1.0) if vmax > 0 else 0.0
    return f"rgba({POSITIVE if value >= 0 else NEGATIVE},{alpha:.2f})"


def scale(values: Sequence[float], exclude: Sequence[int] = ()) -> float:
    """max |value| over the positions not in `exclude` (0 when none are left)."""
    left_out = set(exclude)
    return max((abs(v) for i, v in enumerate(values) if i not in left_out), default=0.0)


def token_spans(tokens: Sequence[str], values: Sequence[float], vmax: float, mark: int | None = None) -> str:
    """The tokens as coloured spans; `title` shows "position: 'token' = value" on hover."""
    spans = []
    for i, (tok, v) in enumerate(zip(tokens, values)):
        shown = html.escape(tok).replace("\n", "↵")
        tip = html.escape(f"{i}: {tok!r} = {v:.4g}", quote=True)
        outline = "outline:2px solid #333;" if i == mark else ""
        spans.append(
            f'<span class="tok" title="{tip}" style="background:{colour(v, vmax)};{outline}'
            f'border-radius:3px;padding:1px 0;white-space:pre-wrap">{shown}</span>'
        )
    return (
        '<div class="ctx" style="line-height:1.9;font-family:monospace;overflow-wrap:anywhere;'
        'margin-bottom:0.4em">' + "".join(spans) + "</div>"
    )


def legend(vmax: float, signed: bool, left_out: dict[int, float] | None = None) -> str:
    """A colour bar from -vmax (signed values) or 0 to +vmax, and the positions left out of it."""
    stops = f"rgba({NEGATIVE},1),#fff," if signed else "#fff,"
    bar = f"linear-gradient(to right,{stops}rgba({POSITIVE},1))"
    lo = f"{-vmax:.4g}" if signed else "0"
    note = ""
    if left_out:
        shown = ", ".join(f"position {i} ({v:.4g})" for i, v in left_out.items())
        note = f" · left out of the scale (drawn saturated): {html.escape(shown)}"
    return (
        '<div class="legend" style="font-size:0.8em;font-family:sans-serif;margin-bottom:0.6em">'
        f'<span>{lo}</span> <span style="display:inline-block;width:160px;height:0.8em;'
        f'vertical-align:middle;border:1px solid #ccc;background:{bar}"></span> '
        f"<span>{vmax:.4g}</span>{note}</div>"
    )


@dataclass
class TokenView:
    """Tokens coloured by values; renders itself in Jupyter (`_repr_html_`) and in the app (`html()`)."""

    tokens: list[str]
    values: list[float]
    title: str = ""
    exclude: list[int] = field(default_factory=list)
    """Positions left out of the colour scale (e.g. BOS)."""
    mark: int | None = None

    def html(self) -> str:
        vmax = scale(self.values, self.exclude)
        signed = min(self.values, default=0.0) < 0
        left_out = {i: self.values[i] for i in self.exclude if i < len(self.values)}
        head = f"<div><b>{html.escape(self.title)}</b></div>" if self.title else ""
        return head + token_spans(self.tokens, self.values, vmax, self.mark) + legend(vmax, signed, left_out)

    def _repr_html_(self) -> str:
        return self.html()


def show_tokens(
    tokens: Sequence[str], values: Sequence[float], title: str = "", exclude: Sequence[int] = ()
) -> TokenView:
    """Tokens coloured by one value each; displays inline in Jupyter. `exclude`: positions
    left out of the colour scale (BOS)."""
    if len(tokens) != len(values):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} values")
    return TokenView(list(tokens), [float(v) for v in values], title, list(exclude))
