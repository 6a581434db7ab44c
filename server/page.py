"""The status page at ``/``: the evolver's activity, tasks, their accuracy over time and a
picture of the layer pool.

The picture follows the paper's Figures 1 and 3: one column per task, its path drawn
bottom-up (patch embedding first, head on top); each component box is coloured by the task
that trained it (grey: root model), and a component shared by several paths carries the
same short id in each column.
"""

from __future__ import annotations

import colorsys
import html
import time
from typing import Any

KIND_SHORT = {"patch_embedding": "patch", "conv_stem": "conv", "class_token": "cls", "position_embedding": "pos",
              "transformer_block": "block", "head": "head"}


def _colour(index: int) -> str:
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.55, 0.9)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def layer_pool_svg(system: dict[str, Any]) -> str:
    comps = {c["id"]: c for c in system["components"]}
    tasks = sorted(system["tasks"])
    trainers = sorted({c["task"] for c in comps.values() if c["task"]})
    colours = {t: _colour(i) for i, t in enumerate(trainers)}
    box_w, box_h, gap = 120, 26, 16
    depth = max((len(v["components"]) for v in system["tasks"].values()), default=0)
    width = max(1, len(tasks)) * (box_w + gap) + gap
    height = depth * (box_h + 6) + 60
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">']
    for col, task in enumerate(tasks):
        x = gap + col * (box_w + gap)
        parts.append(f'<text x="{x + box_w / 2}" y="{height - 8}" text-anchor="middle" font-weight="bold">'
                     f'{html.escape(task)}</text>')
        for row, cid in enumerate(system["tasks"][task]["components"]):
            c = comps.get(cid, {"kind": "?", "task": None, "private": False})
            y = height - 30 - (row + 1) * (box_h + 6)
            fill = colours.get(c["task"], "#cccccc")
            stroke = ' stroke="#b00" stroke-width="2" stroke-dasharray="4 2"' if c["private"] else ' stroke="#333"'
            label = f'{KIND_SHORT.get(c["kind"], c["kind"])} {cid[:6]}'
            origin = (f'trained on {c["task"]}' if c["task"] else
                      "trained on a private task" if c["private"] else "of the root model")
            parts.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4" fill="{fill}"{stroke}>'
                         f'<title>{html.escape(c["kind"])} {cid} {html.escape(origin)}</title></rect>')
            parts.append(f'<text x="{x + box_w / 2}" y="{y + 17}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span style="background:{colours[t]};padding:2px 6px">{html.escape(t)}</span>' for t in trainers)
    return "".join(parts) + f'<p>trained on: <span style="background:#ccc;padding:2px 6px">root</span> {legend} ' \
                            '(dashed red border: private)</p>'


def age(seconds: float) -> str:
    """A short duration, e.g. ``"3 s"``, ``"12 min"``, ``"2.5 h"``, ``"4.0 d"``."""
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def evolver_line(status: dict[str, Any], now: float) -> str:
    """What the evolver is doing now, in words (plain text, not escaped).

    Args:
      status: the store's evolver status (``GET /v1/system``'s ``evolver``; may be empty).
      now: unix seconds.
    """
    if not status:
        return "evolver: no status yet (not started, or serving without an evolver)"
    updated = status.get("updated")
    ago = f"updated {age(now - updated)} ago" if isinstance(updated, (int, float)) else "never updated"
    if status.get("state") != "training":
        return f"evolver: {status.get('state') or 'idle'}, {ago}"
    if status.get("task") is None:  # a task the caller may not see (Service._evolver_status)
        return f"evolver: training a {status.get('phase') or 'task'} you cannot see, {ago}"
    running = status.get("children_running", 0)
    phase = status.get("phase")
    return (f"evolver: training {status.get('task')}" + (f" ({phase})" if phase else "") +
            f", iteration {status.get('iteration')}, generation {status.get('generation')}/{status.get('generations')}, "
            f"{running} {'child' if running == 1 else 'children'} running, {ago}")


def accuracy_svg(task: str, history: list[dict[str, Any]]) -> str:
    """Validation and test accuracy of a task's published best paths over time.

    Args:
      task: task name (the chart's title).
      history: the task resource's ``history`` (``time`` in unix seconds, accuracies in [0, 1]).

    Returns:
      An inline SVG: x = minutes since the first publish, y = accuracy in [0, 1].
    """
    w, h, left, right, top, bottom = 290, 150, 44, 10, 20, 28
    pw, ph = w - left - right, h - top - bottom
    t0 = history[0]["time"] if history else 0.0
    span = max((p["time"] - t0) / 60 for p in history) if history else 0.0
    span = span or 1.0

    def xy(p: dict[str, Any], key: str) -> tuple[float, float]:
        return left + pw * (p["time"] - t0) / 60 / span, top + ph * (1 - min(1.0, max(0.0, p[key])))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             f'font-size="10"><title>{html.escape(task)}: accuracy over time</title>',
             f'<text x="{left}" y="12" font-weight="bold">{html.escape(task)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for frac in (0.0, 0.5, 1.0):
        y = top + ph * (1 - frac)
        parts.append(f'<text x="{left - 4}" y="{y + 3:.1f}" text-anchor="end">{frac:g}</text>')
    parts.append(f'<text x="{left}" y="{h - 14}" text-anchor="middle">0</text>')
    parts.append(f'<text x="{left + pw}" y="{h - 14}" text-anchor="middle">{span:.3g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{h - 3}" text-anchor="middle">minutes since first answer</text>')
    parts.append(f'<text transform="translate(10 {top + ph / 2}) rotate(-90)" text-anchor="middle">accuracy</text>')
    for key, colour, name in (("validation_accuracy", "#1f77b4", "validation"), ("test_accuracy", "#ff7f0e", "test")):
        points = [xy(p, key) for p in history if isinstance(p.get(key), (int, float))]
        if points:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
            parts.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
            parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2" fill="{colour}"/>' for x, y in points)
    parts.append(f'<text x="{left + pw}" y="12" text-anchor="end"><tspan fill="#1f77b4">validation</tspan> '
                 '<tspan fill="#ff7f0e">test</tspan></text></svg>')
    return "".join(parts)


def _row(t: dict[str, Any], now: float) -> str:
    m = t["metrics"]
    improved = t.get("improved_at")
    paused = (t.get("evolution") or {}).get("paused", False)
    cells = [t["name"], t["state"], "yes" if t["private"] else "", str(len(t["labels"])), str(t["iterations_done"]),
             f"{m.get('validation_accuracy', float('nan')):.4f}", f"{m.get('test_accuracy', float('nan')):.4f}",
             str(m.get("activated_params", "")), str(t["system_version"]),
             "" if improved is None else f"{age(now - improved)} ago", "yes" if paused else ""]
    return "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"


def render_page(tasks: list[dict[str, Any]], system: dict[str, Any], now: float | None = None) -> str:
    """The status page.

    Args:
      tasks: task resources (``GET /v1/tasks``).
      system: ``GET /v1/system``.
      now: unix seconds the ages are measured from (default: the current time).
    """
    now = time.time() if now is None else now
    rows = "".join(_row(t, now) for t in tasks)
    evolver: dict[str, Any] = system.get("evolver") or {}
    charts = "".join(accuracy_svg(t["name"], t["history"]) for t in tasks if t.get("history"))
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mu2net</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}
.charts svg{{margin:0 12px 12px 0}}</style>
</head><body><h1>mu2net</h1>
<p>system version {system['system_version']} &middot; layer pool {system['total_params']:,} parameters
({len(system['components'])} components) &middot; loaded unique parameters {system['loaded_unique_params']:,}</p>
<p>{html.escape(evolver_line(evolver, now))}</p>
<table><tr><th>task</th><th>state</th><th>private</th><th>classes</th><th>iterations</th><th>val acc</th>
<th>test acc</th><th>activated params</th><th>version</th><th>last improvement</th><th>paused</th></tr>{rows}</table>
<h2>Accuracy over time</h2><div class="charts">{charts or '<p>no published path yet</p>'}</div>
<h2>Layer pool</h2>{layer_pool_svg(system)}</body></html>"""
