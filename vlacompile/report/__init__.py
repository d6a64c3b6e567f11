"""Reports of a build: ``report.json`` (versioned, for CI), ``report.md`` (a pull-request comment) and
``report.html`` (self-contained, with plots), plus the few-line summary the CLI prints.

Every latency figure carries where it came from: ``"kind": "measured"`` with ``measured_on``, or
``"kind": "estimated"`` with ``estimated_for``; the Markdown and HTML mark estimates as such.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_reports", "summarize", "json_ready", "STATUS_TEXT"]

# Headline per status: what the exit code means.
STATUS_TEXT = {
    "passed": ("PASSED", 0, "every gate was measured and met"),
    "failed": ("FAILED", 1, "a gate failed"),
    "unverified": ("NOT VERIFIED", 3, "accuracy measured and met; latency and memory only estimated for the target"),
}
HISTOGRAM_BINS = 20


def _histogram(samples_ms: list[float]) -> dict[str, list]:
    counts, edges = np.histogram(np.asarray(samples_ms, dtype=np.float64), bins=HISTOGRAM_BINS)
    return {"edges_ms": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def json_ready(obj: Any) -> Any:
    """A JSON-safe copy: numpy values to Python, non-finite floats to null, raw latency samples
    replaced by a histogram (the raw list belongs in the HTML plot, not in a CI artifact)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if k == "samples_ms":
                if v:
                    out["histogram"] = _histogram(v)
                continue
            out[str(k)] = json_ready(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_ready(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def write_reports(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write report.json, report.md and report.html into ``out_dir``; return their paths."""
    from vlacompile.report.html import render_html
    from vlacompile.report.markdown import render_markdown

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "report.json", out_dir / "report.md", out_dir / "report.html"]
    paths[0].write_text(json.dumps(json_ready(report), sort_keys=True, indent=2, allow_nan=False) + "\n")
    paths[1].write_text(render_markdown(report))
    paths[2].write_text(render_html(report))
    return paths


def _num(x: Any, unit: str = "") -> str:
    from vlacompile.report.markdown import fmt

    return fmt(x) + unit


def summarize(report: dict[str, Any]) -> str:
    """A few lines for the terminal: verdict, accuracy, latency (measured or estimated), gates."""
    status = report.get("status", "failed")
    word, code, meaning = STATUS_TEXT.get(status, (status.upper(), report.get("exit_code", 1), ""))
    code = report.get("exit_code", code)
    lines = [f"{report.get('target', '?')}: {word} (exit {code}: {meaning})"]
    acc = report.get("accuracy") or {}
    if acc:
        self_nmse = (acc.get("teacher_self_consistency") or {}).get("nmse")
        line = (
            f"  accuracy: NMSE vs teacher {_num(acc.get('nmse_vs_teacher'))}, cosine {_num(acc.get('cosine'))}, "
            f"max abs error {_num(acc.get('max_abs_error'))} (dim {acc.get('max_abs_error_dim')})"
        )
        if self_nmse is not None:
            line += f"; teacher vs itself (other noise) {_num(self_nmse)}"
        lines.append(line)
    lat = report.get("latency") or {}
    teacher, student = lat.get("teacher") or {}, lat.get("student") or {}
    if student:
        if student.get("kind") == "estimated":
            host = student.get("host_measurement") or {}
            line = (
                f"  latency: student >= {_num(student.get('p99_ms'), ' ms')} ESTIMATED for {student.get('estimated_for')} "
                f"(roofline lower bound, not verified)"
            )
            if host:
                line += f"; on this host p50 {_num(host.get('p50_ms'), ' ms')} / p99 {_num(host.get('p99_ms'), ' ms')} ({host.get('runtime')})"
        else:
            line = (
                f"  latency: student p50 {_num(student.get('p50_ms'), ' ms')} / p99 {_num(student.get('p99_ms'), ' ms')} "
                f"measured on {student.get('measured_on')}"
            )
        if teacher:
            line += f"; teacher p50 {_num(teacher.get('p50_ms'), ' ms')} ({teacher.get('runtime')})"
        speedup = lat.get("speedup_p50") or lat.get("host_speedup_p50")
        if speedup:
            line += f", {speedup:.1f}x faster" + ("" if lat.get("speedup_p50") else " on this host")
        lines.append(line)
    cl = report.get("closed_loop")
    if cl:
        lines.append(
            f"  closed loop ({cl['suite']}, {cl['episodes']} episodes each): success teacher {_num(cl['teacher']['success_rate'])}, "
            f"student {_num(cl['student']['success_rate'])}"
        )
    gates = (report.get("gates") or {}).get("gates") or []
    if gates:
        count = {s: sum(g["status"] == s for g in gates) for s in ("pass", "fail", "not_verified")}
        line = f"  gates: {count['pass']} pass, {count['fail']} fail, {count['not_verified']} not verified"
        failing = [f"{g['name']} {_num(g['value'])} vs {g['comparison']} {_num(g['limit'])}" for g in gates if g["status"] == "fail"]
        if failing:
            line += " [failed: " + "; ".join(failing) + "]"
        lines.append(line)
    return "\n".join(lines)
