"""The status page at ``/``: tasks and a picture of the layer pool.

The picture follows the paper's Figures 1 and 3: one column per task, its path drawn
bottom-up (patch embedding first, head on top); each component box is coloured by the task
that trained it (grey: root model), and a component shared by several paths carries the
same short id in each column.
"""

from __future__ import annotations

import colorsys
import html
from typing import Any

KIND_SHORT = {"patch_embedding": "patch", "class_token": "cls", "position_embedding": "pos",
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
            parts.append(f'<rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4" fill="{fill}"{stroke}>'
                         f'<title>{html.escape(c["kind"])} {cid} trained on {html.escape(str(c["task"]))}</title></rect>')
            parts.append(f'<text x="{x + box_w / 2}" y="{y + 17}" text-anchor="middle">{html.escape(label)}</text>')
    parts.append("</svg>")
    legend = " ".join(f'<span style="background:{colours[t]};padding:2px 6px">{html.escape(t)}</span>' for t in trainers)
    return "".join(parts) + f'<p>trained on: <span style="background:#ccc;padding:2px 6px">root</span> {legend} ' \
                            '(dashed red border: private)</p>'


def render_page(tasks: list[dict[str, Any]], system: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(t['name'])}</td><td>{t['state']}</td><td>{'yes' if t['private'] else ''}</td>"
        f"<td>{len(t['labels'])}</td><td>{t['iterations_done']}</td>"
        f"<td>{t['metrics'].get('validation_accuracy', float('nan')):.4f}</td>"
        f"<td>{t['metrics'].get('test_accuracy', float('nan')):.4f}</td>"
        f"<td>{t['metrics'].get('activated_params', '')}</td><td>{t['system_version']}</td></tr>"
        for t in tasks)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>mu2net</title>
<meta http-equiv="refresh" content="10">
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd}}</style>
</head><body><h1>mu2net</h1>
<p>system version {system['system_version']} &middot; layer pool {system['total_params']:,} parameters
({len(system['components'])} components) &middot; loaded unique parameters {system['loaded_unique_params']:,}</p>
<table><tr><th>task</th><th>state</th><th>private</th><th>classes</th><th>iterations</th><th>val acc</th>
<th>test acc</th><th>activated params</th><th>version</th></tr>{rows}</table>
<h2>Layer pool</h2>{layer_pool_svg(system)}</body></html>"""
