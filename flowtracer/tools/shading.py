"""How a token's value becomes its background: one rule for the trace page (flowtracer.tools.trace,
shaded here in Python) and the run view (flowtracer.tools.view, shaded in the browser by `JS`,
the same rule with the same constants).

A value is first scaled to [0, 1] (`by_max`: value / the largest one, as throughput is; `by_range`:
between a low and a high, as weights are), then drawn as red with alpha = MAX_ALPHA * x.
"""

from __future__ import annotations

RGB = (220, 40, 40)
MAX_ALPHA = 0.85


def by_max(values: list[float]) -> list[float]:
    """value / max(values) (negatives as 0); all zeros when no value is positive."""
    top = max(values, default=0.0)
    top = top if top > 0 else 1.0
    return [max(v, 0.0) / top for v in values]


def by_range(values: list[float], lo: float, hi: float) -> list[float]:
    """(value - lo) / (hi - lo), clipped to [0, 1]; all zeros when hi <= lo (nothing stands out)."""
    span = hi - lo
    return [0.0 if span <= 0 else min(max((v - lo) / span, 0.0), 1.0) for v in values]


def alpha(x: float) -> float:
    return MAX_ALPHA * x


def background(x: float) -> str:
    """The CSS colour of a token whose scaled value is x."""
    return f"rgba({RGB[0]},{RGB[1]},{RGB[2]},{alpha(x):.3f})"


def show(tok: str) -> str:
    """A token as text with its whitespace visible (a bare newline or space would vanish)."""
    out = tok.replace("\n", "\\n").replace("\t", "\\t")
    return out if tok.strip() else out.replace(" ", "␣") or "∅"


# The same rule in the browser: shade(x) is background(x), byMax and byRange as above.
JS = f"""
const SHADE_RGB = '{RGB[0]},{RGB[1]},{RGB[2]}', SHADE_MAX = {MAX_ALPHA};
function shade(x) {{ return 'rgba(' + SHADE_RGB + ',' + (SHADE_MAX * x).toFixed(3) + ')'; }}
function byMax(v) {{ let top = 0; for (const x of v) if (x > top) top = x; top = top > 0 ? top : 1;
                    return v.map(x => Math.max(x, 0) / top); }}
function byRange(v, lo, hi) {{ const span = hi - lo;
  return v.map(x => span <= 0 ? 0 : Math.min(Math.max((x - lo) / span, 0), 1)); }}
"""
