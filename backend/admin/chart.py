"""The learning curve on /admin: validation accuracy against labels used, one point per version, as inline SVG.

Drawn on the server from the same version views the API returns, so the page needs no chart
library and no script. Only presentation attributes are used (no style=), which the page's
Content-Security-Policy allows.
"""

from __future__ import annotations

from html import escape

from markupsafe import Markup

WIDTH, HEIGHT = 420, 220
LEFT, RIGHT, TOP, BOTTOM = 44, 16, 14, 36
COLORS = {"promoted": "#1a7f37", "rejected": "#cf222e", "rolled_back": "#9a6700"}
OTHER = "#6e7781"


def learning_curve(versions: list[dict], *, title: str) -> Markup:
    """SVG of cv accuracy (y, 0..1) against label count (x) for `versions` (views.version_view dicts)."""
    points = [v for v in versions if v.get("labels") is not None and v.get("cv_accuracy") is not None]
    most = max([v["labels"] for v in points], default=1) or 1
    span_x, span_y = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(labels: float) -> float:
        return round(LEFT + span_x * labels / most, 1)

    def y(accuracy: float) -> float:
        return round(TOP + span_y * (1 - accuracy), 1)

    parts = [f'<svg class="curve" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
             f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>']
    for tick in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y(tick)}" y2="{y(tick)}" stroke="#d0d7de"/>'
                     f'<text x="{LEFT - 6}" y="{y(tick) + 4}" text-anchor="end" font-size="11" fill="#57606a">'
                     f'{tick:.2f}</text>')
    for tick in sorted({0, most // 2, most}):
        parts.append(f'<text x="{x(tick)}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle" font-size="11" '
                     f'fill="#57606a">{tick}</text>')
    parts.append(f'<text x="{LEFT + span_x / 2}" y="{HEIGHT - 4}" text-anchor="middle" font-size="11" '
                 f'fill="#57606a">labels used</text>')
    served = [v for v in sorted(points, key=lambda v: v["version"]) if v.get("status") != "rejected"]
    if len(served) > 1:
        path = " ".join(f'{x(v["labels"])},{y(v["cv_accuracy"])}' for v in served)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#0969da" stroke-width="1.5"/>')
    for v in points:
        color = COLORS.get(v.get("status"), OTHER)
        label = escape(f'{v["name"]}: {v["labels"]} labels, cv accuracy {v["cv_accuracy"]:.3f} ({v.get("status")})')
        ring = (f'<circle cx="{x(v["labels"])}" cy="{y(v["cv_accuracy"])}" r="8" fill="none" stroke="#0969da" '
                f'stroke-width="2"/>') if v.get("current") else ""
        parts.append(f'<g class="point" data-version="{v["version"]}">{ring}<circle cx="{x(v["labels"])}" '
                     f'cy="{y(v["cv_accuracy"])}" r="4.5" fill="{color}"><title>{label}</title></circle></g>')
    if not points:
        parts.append(f'<text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" font-size="12" fill="#57606a">'
                     'no validated version yet</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
