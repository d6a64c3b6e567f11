"""report.html: one self-contained file (inline CSS, plots as base64 PNG) for reviewers.

Plots: latency distribution teacher vs student, per-dimension error, and action traces teacher vs
student vs recorded. matplotlib is used through its object API with the Agg canvas, so no GUI
backend or global pyplot state is touched.
"""
from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

import numpy as np

from vlacompile.report.markdown import ESTIMATED, fmt, headline, sections

MAX_TRACE_DIMS = 6
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.25em .55em;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.est{font-style:italic;background:#fff8e1} code{background:#f4f4f4;padding:0 .2em}
.verdict{padding:.7em 1em;border-radius:6px;font-size:1.1em;margin:1em 0}
.passed{background:#e6f4ea;border:1px solid #34a853} .failed{background:#fce8e6;border:1px solid #d93025}
.unverified{background:#fff8e1;border:1px solid #f9ab00}
figure{margin:1em 0} figcaption{font-size:.85em;color:#555} img{max-width:100%}
"""


def _inline(text: str) -> str:
    """The little Markdown the section sentences use (**bold**, `code`), after escaping."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _series(lat: dict[str, Any]) -> np.ndarray | None:
    """Raw latency samples, or (from a report re-read from JSON) samples rebuilt from its histogram."""
    if lat.get("samples_ms"):
        return np.asarray(lat["samples_ms"], dtype=np.float64)
    hist = lat.get("histogram")
    if hist:
        edges = np.asarray(hist["edges_ms"])
        centres = (edges[:-1] + edges[1:]) / 2
        return np.repeat(centres, hist["counts"])
    return None


def latency_plot(report: dict[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    lat = report.get("latency") or {}
    student = lat.get("student") or {}
    estimated = student.get("kind") == "estimated"
    runs = [("teacher", lat.get("teacher") or {}, "#4c72b0"),
            ("student on this host" if estimated else "student", student.get("host_measurement") or student, "#dd8452")]
    data = [(name, _series(d), d, c) for name, d, c in runs]
    data = [(n, s, d, c) for n, s, d, c in data if s is not None and len(s)]
    if not data:
        return None
    lo = max(min(s.min() for _, s, _, _ in data), 1e-3)
    hi = max(s.max() for _, s, _, _ in data)
    bins = np.geomspace(lo * 0.95, hi * 1.05, 60)
    fig = Figure(figsize=(9, 3.6))
    ax = fig.add_subplot()
    for name, s, d, color in data:
        ax.hist(s, bins=bins, alpha=0.6, color=color, label=f"{name} ({d.get('runtime', '?')}), p99 {fmt(d.get('p99_ms'))} ms")
        ax.axvline(d["p99_ms"], color=color, linestyle=":")
    limit = (report.get("gates") or {}).get("gates") or []
    for g in limit:
        if g["name"] == "p99_latency_ms":
            ax.axvline(g["limit"], color="#d93025", linewidth=1.5, label=f"p99 limit {fmt(g['limit'])} ms")
    if estimated and student.get("p99_ms"):
        ax.axvline(student["p99_ms"], color="#555", linestyle="--",
                   label=f"estimated lower bound for {student.get('estimated_for')}: {fmt(student['p99_ms'])} ms")
    ax.set_xscale("log")
    ax.set_xlabel("get_action latency (ms, log scale)")
    ax.set_ylabel("calls")
    ax.legend(fontsize=8)
    ax.set_title("Latency distribution (measured on this host)")
    return _png(fig)


def error_plot(report: dict[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    acc = report.get("accuracy") or {}
    per_dim = acc.get("per_dim") or []
    if not per_dim:
        return None
    dims = [d["dim"] for d in per_dim]
    fig = Figure(figsize=(9, 3.2))
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax1.bar(dims, [d["nmse"] for d in per_dim], color="#4c72b0")
    limit = next((g["limit"] for g in (report.get("gates") or {}).get("gates", []) if g["name"] == "nmse_vs_teacher"), None)
    if limit is not None:
        ax1.axhline(limit, color="#d93025", linestyle="--", label=f"limit on the mean {fmt(limit)}")
        ax1.legend(fontsize=8)
    ax1.set_title("NMSE vs teacher per action dimension")
    ax1.set_xlabel("action dimension")
    ax2.bar(dims, [d["max_abs_error"] for d in per_dim], color="#dd8452", label="max")
    ax2.bar(dims, [d["rmse"] for d in per_dim], color="#55a868", width=0.5, label="RMSE")
    ax2.set_title("Absolute error per dimension (physical units)")
    ax2.set_xlabel("action dimension")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.set_xticks(dims)
    fig.tight_layout()
    return _png(fig)


def traces_plot(report: dict[str, Any]) -> str | None:
    from matplotlib.figure import Figure

    traces = report.get("traces") or []
    if not traces:
        return None
    n_dims = min(len(traces[0]["teacher"][0]), MAX_TRACE_DIMS)
    fig = Figure(figsize=(2.4 * n_dims + 1, 2.2 * len(traces)))
    axes = fig.subplots(len(traces), n_dims, squeeze=False)
    for row, tr in enumerate(traces):
        arrays = {k: np.asarray(tr[k]) for k in ("recorded", "teacher", "student") if tr.get(k) is not None}
        for d in range(n_dims):
            ax = axes[row][d]
            for key, style in (("recorded", dict(color="#999", linewidth=2)), ("teacher", dict(color="#4c72b0")), ("student", dict(color="#dd8452", linestyle="--"))):
                if key in arrays:
                    ax.plot(arrays[key][:, d], label=key, **style)
            if row == 0:
                ax.set_title(f"action dim {d}", fontsize=9)
            if d == 0:
                ax.set_ylabel(f"ep {tr['episode_index']} t={tr['frame_index']}", fontsize=8)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Action chunks: teacher vs student vs recorded (x: step in the chunk)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(
            f"<td class=\"est\">{html.escape(str(c))}</td>" if ESTIMATED in str(c) else f"<td>{html.escape(str(c))}</td>" for c in row
        )
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(report: dict[str, Any]) -> str:
    word, meaning = headline(report)
    status = report.get("status", "failed")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>vlacompile report: {html.escape(str(report.get('target')))} {html.escape(word)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>vlacompile report: {html.escape(str(report.get('target')))}</h1>",
        f'<div class="verdict {html.escape(status)}"><b>{html.escape(word)}</b> ({html.escape(meaning)})</div>',
    ]
    # Plots go under the section they illustrate.
    plots = {
        "Latency (ms)": [(latency_plot, "Latency distribution of get_action, teacher vs student, measured on this host "
                          "(an estimate for another target is drawn as a dashed line).")],
        "Accuracy per action dimension": [
            (error_plot, "Per-dimension error of the student against the teacher."),
            (traces_plot, f"Action chunks from {len(report.get('traces') or [])} held-out episodes: recorded demonstration (grey), "
                          "teacher (blue), student (orange, dashed), same observation and noise."),
        ],
    }
    for sec in sections(report):
        parts.append(f"<h2>{html.escape(sec.title)}</h2>")
        bullets = [line[2:] for line in sec.lines if line.startswith("- ")]
        parts += [f"<p>{_inline(line)}</p>" for line in sec.lines if not line.startswith("- ")]
        if bullets:
            parts.append("<ul>" + "".join(f"<li>{_inline(b)}</li>" for b in bullets) + "</ul>")
        if sec.rows:
            parts.append(_table(sec.headers, sec.rows))
        for plot, caption in plots.get(sec.title, []):
            img = plot(report)
            if img:
                alt = html.escape(caption.split(":")[0])
                parts.append(f'<figure><img alt="{alt}" src="{img}"><figcaption>{html.escape(caption)}</figcaption></figure>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
