"""What changed between two builds' reports, each change marked as within or beyond its noise band.

Noise bands, per kind of figure:
- latency percentiles: the 95% bootstrap intervals of the two builds (beyond noise when they do not
  overlap and the figure moved by more than LATENCY_DRIFT; reports without intervals compare as
  "no interval"); the gated student/teacher p50 ratio also needs the move to be worth more than
  LATENCY_FLOOR_MS of the student's time;
- NMSE vs the teacher: 1.96 x the combined standard error over the held-out samples;
- closed-loop success rates: 1.96 x the two-proportion standard error over the episodes;
- cosine and every other figure: exact (a deterministic function of the same inputs), so any change
  beyond float rounding is beyond noise.

``baseline_gates`` turns the gate metrics' regressions beyond noise into failing gates, for
``vlacompile build --baseline``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

Z95 = 1.959963984540054
# The bootstrap interval holds one run's sampling noise, not the drift between two runs on a shared
# machine (another job, the CPU's clock): a latency moves beyond noise only when the intervals are
# apart AND it moved by more than this fraction.
LATENCY_DRIFT = 0.2
# Below this, a change of the student's p50 is scheduling and timer jitter on a shared machine
# (measured: rebuilds with nothing changed moved a 0.25 ms student by 0.06 ms and a 0.36 ms one by 0.11 ms).
LATENCY_FLOOR_MS = 0.25


def _get(report: dict, path: str):
    cur: Any = report
    for part in path.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return None
        cur = cur[part]
    return cur


def _latency(report: dict, who: str) -> dict | None:
    lat = _get(report, f"latency.{who}") or {}
    if lat.get("kind") == "estimated":
        return None  # an estimate is not a measurement to compare
    return lat


def _row(metric: str, old, new, better: str, band: float | None, kind: str, note: str = "") -> dict:
    delta = None if old is None or new is None else new - old
    if delta is None:
        status = "added" if old is None and new is not None else "removed" if new is None and old is not None else "missing"
    elif band is None:
        status = "changed" if abs(delta) > 1e-12 * max(1.0, abs(old)) else "same"
    else:
        status = "beyond noise" if abs(delta) > band else ("same" if delta == 0 else "within noise")
    worse = delta is not None and ((delta > 0) if better == "lower" else (delta < 0))
    return {"metric": metric, "old": old, "new": new, "delta": delta, "band": band, "band_kind": kind,
            "status": status, "direction": ("worse" if worse else "better") if delta else "same", "better": better, "note": note}


def diff_reports(old: dict, new: dict) -> dict[str, Any]:
    """Every compared figure, the inputs and files that changed, as a JSON-ready dict."""
    rows: list[dict] = []
    # Accuracy.
    se = [_get(r, "accuracy.nmse_standard_error") for r in (old, new)]
    band = Z95 * math.sqrt(se[0] ** 2 + se[1] ** 2) if None not in se else None
    rows.append(_row("accuracy.nmse_vs_teacher", _get(old, "accuracy.nmse_vs_teacher"), _get(new, "accuracy.nmse_vs_teacher"),
                     "lower", band, "1.96 x combined standard error over held-out samples" if band is not None else "exact"))
    for m in ("cosine", "worst_cosine", "max_abs_error"):
        rows.append(_row(f"accuracy.{m}", _get(old, f"accuracy.{m}"), _get(new, f"accuracy.{m}"),
                         "lower" if m == "max_abs_error" else "higher", None, "exact"))
    # Latency (measured figures only).
    for who in ("teacher", "student"):
        lo, ln = _latency(old, who), _latency(new, who)
        for q in ("p50_ms", "p90_ms", "p99_ms"):
            a, b = (lo or {}).get(q), (ln or {}).get(q)
            ia, ib = ((lo or {}).get("intervals") or {}).get(q), ((ln or {}).get("intervals") or {}).get(q)
            row = _row(f"latency.{who}.{q}", a, b, "lower", None, "95% bootstrap intervals")
            if ia and ib and row["delta"] is not None:
                overlap = ia[0] <= ib[1] and ib[0] <= ia[1]
                drift = abs(row["delta"]) <= LATENCY_DRIFT * abs(a)
                row["status"] = "within noise" if overlap or drift else "beyond noise"
                row["band"] = [ia, ib]
            elif row["delta"] is not None:
                row["band_kind"], row["status"] = "no interval in one of the reports", "changed" if row["delta"] else "same"
            rows.append(row)
    # The student's p50 in units of the teacher's, both timed interleaved in the same run: what a
    # slower or busier machine does to both cancels (what the baseline gate judges latency by).
    ratios = []
    for r in (old, new):
        t, st = _latency(r, "teacher") or {}, _latency(r, "student") or {}
        if t.get("p50_ms") and st.get("p50_ms"):
            ti, si = (t.get("intervals") or {}).get("p50_ms"), (st.get("intervals") or {}).get("p50_ms")
            ratios.append((st["p50_ms"] / t["p50_ms"], [si[0] / ti[1], si[1] / ti[0]] if ti and si else None))
        else:
            ratios.append((None, None))
    row = _row("latency.student_over_teacher_p50", ratios[0][0], ratios[1][0], "lower", None, "95% bootstrap intervals")
    if ratios[0][1] and ratios[1][1] and row["delta"] is not None:
        ia, ib = ratios[0][1], ratios[1][1]
        apart = not (ia[0] <= ib[1] and ib[0] <= ia[1])
        # The ratio's change in the new build's milliseconds: sub-0.1 ms moves are jitter, not a regression.
        moved_ms = abs(row["delta"]) * ((_latency(new, "teacher") or {}).get("p50_ms") or 0.0)
        row["status"] = ("beyond noise" if apart and abs(row["delta"]) > LATENCY_DRIFT * abs(row["old"]) and moved_ms > LATENCY_FLOOR_MS
                         else "within noise")
        row["band"] = [ia, ib]
    elif row["delta"] is not None:
        row["band_kind"], row["status"] = "no interval in one of the reports", "changed" if row["delta"] else "same"
    rows.append(row)
    # Closed loop.
    for who in ("teacher", "student"):
        a, b = _get(old, f"closed_loop.{who}.success_rate"), _get(new, f"closed_loop.{who}.success_rate")
        na, nb = _get(old, "closed_loop.episodes"), _get(new, "closed_loop.episodes")
        band = Z95 * math.sqrt(a * (1 - a) / na + b * (1 - b) / nb) if None not in (a, b, na, nb) and na and nb else None
        rows.append(_row(f"closed_loop.{who}.success_rate", a, b, "higher", band, "1.96 x two-proportion standard error"))
        for task in sorted(set((_get(old, f"closed_loop.{who}.tasks") or {})) | set((_get(new, f"closed_loop.{who}.tasks") or {}))):
            ta = (_get(old, f"closed_loop.{who}.tasks") or {}).get(task, {})
            tb = (_get(new, f"closed_loop.{who}.tasks") or {}).get(task, {})
            pa, pb, ea, eb = ta.get("success_rate"), tb.get("success_rate"), ta.get("episodes"), tb.get("episodes")
            band = Z95 * math.sqrt(pa * (1 - pa) / ea + pb * (1 - pb) / eb) if None not in (pa, pb, ea, eb) and ea and eb else None
            rows.append(_row(f"closed_loop.{who}.tasks.{task}", pa, pb, "higher", band, "1.96 x two-proportion standard error"))
    # Memory and size.
    rows.append(_row("student.params", _get(old, "student.params"), _get(new, "student.params"), "lower", None, "exact"))
    rows.append(_row("student.flow_steps", _get(old, "student.flow_steps"), _get(new, "student.flow_steps"), "lower", None, "exact"))
    mem = [_get(r, "latency.student.process_memory.peak_rss_mb") for r in (old, new)]
    rows.append(_row("student.process_memory_mb", mem[0], mem[1], "lower", None, "exact"))

    def changed(path: str) -> dict | None:
        a, b = _get(old, path), _get(new, path)
        return None if a == b else {"old": a, "new": b}

    def stage_params(r: dict) -> list:
        return [[st.get("stage"), st.get("params")] for st in r.get("stages") or []]

    recipe = changed("recipe") or ({"old": stage_params(old), "new": stage_params(new)}
                                   if stage_params(old) != stage_params(new) else None)
    inputs = {k: v for k, v in {"recipe": recipe, "target": changed("target"), "seed": changed("seed"),
                                "teacher": changed("teacher.weights_sha256") or changed("teacher.checkpoint"),
                                "episodes": changed("episodes.path"), "tool_versions": changed("tool_versions")}.items() if v}
    files_old = {f["path"]: f["sha256"] for f in _get(old, "artifact.files") or []}
    files_new = {f["path"]: f["sha256"] for f in _get(new, "artifact.files") or []}
    files = {"added": sorted(set(files_new) - set(files_old)), "removed": sorted(set(files_old) - set(files_new)),
             "changed": sorted(p for p in set(files_old) & set(files_new) if files_old[p] != files_new[p])}
    gates_old = {g["name"]: g["status"] for g in _get(old, "gates.gates") or []}
    gates_new = {g["name"]: g["status"] for g in _get(new, "gates.gates") or []}
    gates = {n: {"old": gates_old.get(n), "new": gates_new.get(n)} for n in sorted(set(gates_old) | set(gates_new))
             if gates_old.get(n) != gates_new.get(n)}
    compared = [r for r in rows if r["status"] != "missing"]
    return {"old": {"target": old.get("target"), "status": old.get("status")},
            "new": {"target": new.get("target"), "status": new.get("status")},
            "metrics": compared, "inputs": inputs, "files": files, "gates": gates,
            "beyond_noise": [r["metric"] for r in compared if r["direction"] != "same" and
                             (r["status"] == "beyond noise" or (r["status"] == "changed" and r["band_kind"] == "exact"))]}


def diff_builds(old: str | Path, new: str | Path, *, out: str | Path | None = None) -> dict[str, Any]:
    """``vlacompile report diff OLD NEW [--out PATH]``: the diff of two builds (directories or report.json
    files), written as Markdown to ``out`` and as JSON to ``out``.json when given. Both reports must
    be of this schema and hold what the gates compare; ``out`` must be a file path that overwrites
    nothing either build holds (checked before anything is written)."""
    import json

    from vlacompile.artifact import COMPARE_REPORT_KEYS, held_files, read_report
    from vlacompile.errors import ArtifactError
    from vlacompile.outputs import check_output_file

    reports = [read_report(p, COMPARE_REPORT_KEYS) for p in (old, new)]
    if out is not None:
        out = Path(out)
        held = [(f"build {p}", f) for p, r in zip((old, new), reports) for f in held_files(p, r)]
        check_output_file(out, protected=held, option="--out", example="diff.md")  # first: `.` has no name to add .json to
        check_output_file(out.with_name(out.name + ".json"), protected=held, option="--out", example="diff.md")
    try:
        diff = diff_reports(*reports)
    except (KeyError, TypeError, AttributeError, ValueError) as e:  # a section of an unexpected shape
        raise ArtifactError(f"the two reports cannot be compared: a section has an unexpected shape ({e!r})", source=f"{old}, {new}",
                            hint="compare two reports written by `vlacompile build` (rebuild one that was edited)") from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_diff_markdown(diff))
        out.with_name(out.name + ".json").write_text(json.dumps(diff, indent=2) + "\n")
    return diff


# Latency is judged by the student's p50 relative to the teacher's in the same run (interleaved timing):
# two builds on one machine at different times, or on two CI runners, differ in absolute terms by more
# than any bootstrap interval shows (measured: a rebuild's p99 of 20 calls moved 0.73 -> 1.25 ms under
# load). Absolute percentiles are in the diff, with their intervals, for the reviewer.
GATED = {"accuracy.nmse_vs_teacher", "accuracy.cosine", "accuracy.worst_cosine", "latency.student_over_teacher_p50",
         "closed_loop.student.success_rate"}


def baseline_gates(diff: dict, source: str) -> list[dict]:
    """One gate per gate metric: fails when the new build is worse than the baseline beyond noise."""
    out = []
    for r in diff["metrics"]:
        if r["metric"] not in GATED or r["delta"] is None:
            continue
        # "changed" is beyond noise only for exact figures; a latency without intervals cannot be judged.
        regressed = r["direction"] == "worse" and (r["status"] == "beyond noise" or (r["status"] == "changed" and r["band_kind"] == "exact"))
        band = r["band"]
        band_text = ("intervals " + " vs ".join(f"[{a:.4g}, {b:.4g}]" for a, b in band)) if isinstance(band, list) \
            else (f"band +-{band:.4g}" if band is not None else "exact")
        out.append({"name": f"baseline:{r['metric']}", "value": r["new"], "limit": r["old"],
                    "comparison": "<=" if r["better"] == "lower" else ">=", "unit": "", "kind": "measured",
                    "status": "fail" if regressed else "pass", "source": source,
                    "note": f"{r['old']:.4g} -> {r['new']:.4g} ({r['delta']:+.4g}; {band_text}, {r['band_kind']}): "
                            + ("a regression beyond noise" if regressed else r["status"])})
    return out


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


MARK = {"beyond noise": "**beyond noise**", "changed": "**changed**", "within noise": "within noise", "same": "same",
        "added": "added", "removed": "removed"}


def render_diff_markdown(diff: dict) -> str:
    """The diff as Markdown for a pull-request comment."""
    lines = [f"## vlacompile: {diff['old']['target']} ({diff['old']['status']}) -> {diff['new']['target']} ({diff['new']['status']})", ""]
    moved = diff["beyond_noise"]
    lines.append(f"{len(moved)} figure(s) moved beyond noise: " + (", ".join(f"`{m}`" for m in moved) if moved else "none") + ".")
    lines += ["", "| figure | old | new | change | noise band | verdict |", "|---|---|---|---|---|---|"]
    for r in diff["metrics"]:
        if r["status"] == "same" and not r["metric"].startswith(("accuracy.", "latency.student")):
            continue
        band = r["band"]
        band_text = " vs ".join(f"[{_fmt(a)}, {_fmt(b)}]" for a, b in band) if isinstance(band, list) \
            else (f"+-{_fmt(band)}" if band is not None else r["band_kind"])
        change = "-" if r["delta"] is None else f"{r['delta']:+.4g} ({r['direction']})"
        verdict = MARK.get(r["status"], r["status"])
        if r["status"] == "changed" and r["band_kind"] != "exact":
            verdict = "changed (no noise band to judge it)"
        lines.append(f"| `{r['metric']}` | {_fmt(r['old'])} | {_fmt(r['new'])} | {change} | {band_text} | {verdict} |")
    if diff["gates"]:
        lines += ["", "Gates that changed: " + ", ".join(f"`{n}` {v['old'] or 'absent'} -> {v['new'] or 'absent'}"
                                                     for n, v in diff["gates"].items())]
    if diff["inputs"]:
        lines += ["", "Inputs that changed: " + ", ".join(f"`{k}`" for k in diff["inputs"])]
    f = diff["files"]
    if any(f.values()):
        lines += ["", "Artifact files: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in f.items() if v)]
    return "\n".join(lines) + "\n"
