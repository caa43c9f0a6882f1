"""`python -m engine bench --plot FILE.svg`: a benchmark report as one picture, self-contained SVG (no plotting
library): for each component, each variant's latency, and the floor beside them.

Each row: a line from the fastest call to the p99, a box from the 25th to the 75th percentile (the IQR), a mark
at the p50 with its value, on a log scale of milliseconds shared by every row; the component's floor (its FLOPs
over the measured matmul peak) is a dashed red mark across its rows. `python -m engine bench --plot-from
REPORT.json --plot FILE.svg` draws a saved report again.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

ROW = 22  # px per variant row
LABEL = 330  # px for the labels on the left
PLOT = 560  # px for the scale
COLOURS = {"eager": "#7f7f7f", "compile": "#1f77b4", "ours": "#2ca02c", "onnxruntime": "#9467bd",
           "tensorrt": "#ff7f0e"}


def _percentiles(row: dict) -> tuple[float, float, float, float, float]:
    samples = row.get("samples_ms") or [row["p50_ms"]]
    low, q1, q3 = np.percentile(samples, [0, 25, 75])
    return float(low), float(q1), row["p50_ms"], float(q3), float(row.get("p99_ms") or max(samples))


def svg(report: dict) -> str:
    rows = [row for row in report["rows"] if row.get("p50_ms")]
    if not rows:
        raise ValueError("the report has no timed rows to plot")
    values = [v for row in rows for v in _percentiles(row)] + [r["floor_ms"] for r in rows if r.get("floor_ms")]
    low = 10 ** math.floor(math.log10(min(values)))
    high = 10 ** math.ceil(math.log10(max(values)))

    def x(ms: float) -> float:
        return LABEL + PLOT * (math.log10(ms) - math.log10(low)) / (math.log10(high) - math.log10(low))

    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["component"], []).append(row)
    height = 70 + sum(ROW * len(g) + 18 for g in groups.values()) + 40
    width = LABEL + PLOT + 30
    title = f"{report['device']['name']} | torch {report['versions']['torch']} | {report['date']}"
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="10" y="18" font-size="13">{escape(title)}</text>',
           f'<text x="10" y="34" fill="#555">latency per call, ms (log scale): line fastest..p99, box IQR, mark '
           f'p50; dashed red: the floor (FLOPs / measured peak)</text>']
    y = 56
    for exponent in range(round(math.log10(low)), round(math.log10(high)) + 1):
        for step in (1, 2, 5):
            ms = step * 10 ** exponent
            if low <= ms <= high:
                out.append(f'<line x1="{x(ms):.1f}" y1="{y - 4}" x2="{x(ms):.1f}" y2="{height - 40}" '
                           f'stroke="#eee"/><text x="{x(ms):.1f}" y="{height - 26}" text-anchor="middle" '
                           f'fill="#555">{ms:g}</text>')
    for component, members in groups.items():
        out.append(f'<text x="10" y="{y + 12}" font-weight="bold">{escape(component)}</text>')
        y += 18
        top = y
        for row in members:
            fastest, q1, p50, q3, p99 = _percentiles(row)
            colour = COLOURS.get(row["variant"], "#333")
            middle = y + ROW / 2
            out += [f'<text x="24" y="{middle + 4:.1f}">{escape(row["label"])} (batch {row.get("batch", "?")})</text>',
                    f'<line x1="{x(fastest):.1f}" y1="{middle}" x2="{x(p99):.1f}" y2="{middle}" stroke="{colour}"/>',
                    f'<rect x="{x(q1):.1f}" y="{middle - 6}" width="{max(x(q3) - x(q1), 1):.1f}" height="12" '
                    f'fill="{colour}" fill-opacity="0.35" stroke="{colour}"/>',
                    f'<line x1="{x(p50):.1f}" y1="{middle - 8}" x2="{x(p50):.1f}" y2="{middle + 8}" '
                    f'stroke="{colour}" stroke-width="2"/>',
                    f'<text x="{x(p99) + 4:.1f}" y="{middle + 4:.1f}" fill="{colour}">{p50:.3g}</text>']
            y += ROW
        floor = next((row["floor_ms"] for row in members if row.get("floor_ms")), None)
        if floor:
            out.append(f'<line x1="{x(floor):.1f}" y1="{top}" x2="{x(floor):.1f}" y2="{y}" stroke="red" '
                       f'stroke-dasharray="4 3"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
