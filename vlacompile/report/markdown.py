"""report.md: the build's verdict as a pull-request comment.

The tables are built once here (``sections``) and rendered both as Markdown and, by
``report/html.py``, as HTML. A cell holding an estimate says "(estimated)" in its text, so an
estimate can never be read as a measurement whatever the renderer.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

STATUS_CELL = {"pass": "✅ pass", "fail": "❌ fail", "not_verified": "⚠️ not verified"}
ESTIMATED = "(estimated)"


@dataclass
class Section:
    title: str
    headers: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)  # sentences shown before the table


def fmt(x: Any) -> str:
    """Numbers to a width a table can hold: 3 significant digits, thousands grouped."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        if x != x or x in (float("inf"), float("-inf")):
            return str(x)
        if x == 0:
            return "0"
        if abs(x) >= 1000:
            return f"{x:,.0f}"
        if abs(x) >= 1e-3:
            return f"{x:.3g}"
        return f"{x:.2e}"
    return str(x)


def headline(report: dict[str, Any]) -> tuple[str, str]:
    """(verdict word, sentence with the exit code and what it means)."""
    from vlacompile.report import STATUS_TEXT

    status = report.get("status", "failed")
    word, code, meaning = STATUS_TEXT.get(status, (str(status).upper(), 1, ""))
    code = report.get("exit_code", code)
    return word, f"exit code {code}: {meaning}"


def _overview(report: dict[str, Any]) -> Section:
    t, s = report.get("teacher") or {}, report.get("student") or {}
    samples = report.get("samples") or {}
    lines = [
        f"Target **{report.get('target')}**, recipe **{report.get('recipe')}**, vlacompile {report.get('vlacompile_version', '?')}.",
    ]
    rows = [
        ["teacher", fmt(t.get("params")), fmt(t.get("flow_steps")), "fp32", t.get("family") or "–"],
        ["student", fmt(s.get("params")), fmt(s.get("flow_steps")), s.get("precision") or "–",
         (f"{s['family']}, " if s.get("family") and s.get("family") != t.get("family") else "") + (s.get("onnx") or "–")],
    ]
    if t.get("opaque"):
        lines.append(f"The teacher is opaque ({t.get('format')}): {t.get('opaque_note')}.")
    if t.get("lerobot_semantics"):
        lines.append(f"LeRobot semantics: {t['lerobot_semantics']}.")
    if samples:
        lines.append(f"Verified on {samples.get('count')} samples from {samples.get('episodes')} held-out episodes.")
    return Section("Models", ["model", "parameters", "flow steps", "precision", "family / graph"], rows, lines)


def _gates(report: dict[str, Any]) -> Section:
    rows = []
    for g in (report.get("gates") or {}).get("gates") or []:
        unit = f" {g['unit']}" if g.get("unit") else ""
        value = fmt(g["value"]) + (unit if g["value"] is not None else "")
        if g.get("kind") == "estimated" and g["value"] is not None:
            # A lower bound on time/memory is an upper bound on a rate.
            value = f"{'≥' if g['comparison'] == '<=' else '≤'} {value} {ESTIMATED}"
        rows.append([g["name"], value, f"{g['comparison']} {fmt(g['limit'])}{unit}", STATUS_CELL.get(g["status"], g["status"]), g["source"], g.get("note", "")])
    return Section("Gates", ["gate", "value", "limit", "status", "source", "note"], rows)


def _latency_row(name: str, lat: dict[str, Any]) -> list[str]:
    if lat.get("kind") == "estimated":
        bound = f"≥ {fmt(lat.get('p50_ms'))} {ESTIMATED}"
        return [name, lat.get("runtime", "–"), bound, "–", bound, "–", "–", "–", f"estimated for {lat.get('estimated_for')} (roofline lower bound)"]
    return [
        name,
        lat.get("runtime", "–"),
        fmt(lat.get("p50_ms")),
        fmt(lat.get("p90_ms")),
        fmt(lat.get("p99_ms")),
        fmt(lat.get("max_ms")),
        fmt(lat.get("mean_ms")),
        fmt(lat.get("calls")),
        f"measured on {lat.get('measured_on')}",
    ]


def _latency(report: dict[str, Any]) -> Section:
    lat = report.get("latency") or {}
    rows, lines = [], ["The whole `get_action` call (pre-processing included), batch of one, warm."]
    if lat.get("teacher"):
        rows.append(_latency_row("teacher", lat["teacher"]))
    student = lat.get("student") or {}
    if student:
        rows.append(_latency_row("student", student))
        if student.get("host_measurement"):
            rows.append(_latency_row("student on this host (information only)", student["host_measurement"]))
            lines.append(
                f"The student's latency on **{student.get('estimated_for')}** is an ESTIMATE (a roofline lower bound from data-sheet "
                "figures), not a measurement; the host row is measured here and does not stand for the target."
            )
    for who, m in (("teacher", lat.get("teacher") or {}), ("student", student.get("host_measurement") or student)):
        iv = m.get("intervals")
        if iv:
            lines.append(f"{who} 95% intervals (bootstrap): p50 [{fmt(iv['p50_ms'][0])}, {fmt(iv['p50_ms'][1])}] ms, "
                         f"p99 [{fmt(iv['p99_ms'][0])}, {fmt(iv['p99_ms'][1])}] ms.")
    harness = (lat.get("teacher") or {}).get("harness")
    if harness:
        lines.append(f"Harness: {harness['warmup_calls']} warm-up and {harness['timed_calls']} timed calls each, batch "
                     f"{harness['batch']}, clock {harness['clock']}"
                     + (", teacher and student alternating call by call" if harness.get("interleaved_with") else
                        ", teacher and student each alone") + ".")
    if lat.get("speedup_p50"):
        lines.append(f"Student p50 is {lat['speedup_p50']:.1f}x faster than the teacher's.")
    elif lat.get("host_speedup_p50"):
        lines.append(f"On this host the student's p50 is {lat['host_speedup_p50']:.1f}x faster than the teacher's.")
    mem = (student.get("host_measurement") or student).get("process_memory")
    if mem:
        lines.append(f"Student process memory: peak {fmt(mem['peak_rss_mb'])} MB ({mem['scope']}; {fmt(mem['baseline_rss_mb'])} MB before the graph loads).")
    parts = lat.get("parts")
    if parts:
        lines.append(
            f"Per part (split graphs, {parts['runtime']}, measured on {parts['measured_on']}): System 2 p50 "
            f"{fmt(parts['system2']['p50_ms'])} ms once per chunk, System 1 p50 {fmt(parts['system1_step']['p50_ms'])} ms "
            f"per flow step x {parts['flow_steps']} = {fmt(parts['chunk_ms_p50'])} ms a chunk "
            f"(System 1 {100 * parts['system1_share_p50']:.0f}%)."
        )
    measured = {"teacher": lat.get("teacher") or {}, "student": student.get("host_measurement") or student}
    threads = [f"{k} {v['threads']}" for k, v in measured.items() if v.get("threads")]
    if threads:
        lines.append("Intra-op threads: " + ", ".join(threads) + ".")
    return Section("Latency (ms)", ["model", "runtime", "p50", "p90", "p99", "max", "mean", "calls", "source"], rows, lines)


def _control(report: dict[str, Any]) -> Section:
    c = report.get("control")
    if not c:
        return Section("Control rate", lines=["No latency figure to judge the control rate with."])
    est = ESTIMATED if str(c.get("source", "")).startswith("estimated") else ""
    a, s = c["async"], c["sync"]
    mark = lambda text: f"{text} {est}".strip()  # noqa: E731
    rows = [
        ["async (next chunk computed while one executes)", f"deadline {fmt(a['deadline_ms'])} ms", mark(f"{'met' if a['met'] else 'missed'}, slack {fmt(a['slack_ms'])} ms"), mark(f"up to {fmt(a['max_control_hz'])} Hz"), "✔" if c["gating"] == "async" else ""],
        ["sync (robot waits for each chunk)", f"stall {fmt(s['stall_ms_per_chunk'])} ms a chunk", mark(f"{fmt(s['slowdown'])}x task time"), mark(f"{fmt(s['effective_control_hz'])} Hz effective"), "✔" if c["gating"] == "sync" else ""],
    ]
    lines = [f"{c['actions_per_chunk']} actions a chunk at {fmt(c['control_hz'])} Hz, p99 {fmt(c['p99_ms'])} ms ({c.get('source')})."]
    return Section("Control rate", ["execution", "per chunk", "effect", "control rate", "gates"], rows, lines)


def _accuracy(report: dict[str, Any]) -> list[Section]:
    acc = report.get("accuracy")
    if not acc:
        return []
    src = f"measured on {acc.get('measured_on')}" if acc.get("measured_on") else "measured"
    rows = [
        ["NMSE vs teacher", fmt(acc["nmse_vs_teacher"]), "per-dimension MSE / teacher variance, averaged; 0 = identical, 1 = the teacher's mean"],
        ["cosine similarity", fmt(acc["cosine"]), "flattened chunks, mean over samples"],
        *([["worst-sample cosine", fmt(acc["worst_cosine"]), f"sample {acc.get('worst_cosine_sample')}; 5th percentile "
            f"{fmt(acc.get('cosine_p05'))}"]] if acc.get("worst_cosine") is not None else []),
        ["max abs error", fmt(acc["max_abs_error"]), f"physical units, action dimension {acc.get('max_abs_error_dim')}"],
    ]
    sc = acc.get("teacher_self_consistency")
    if sc:
        rows.append(["teacher vs itself (other noise)", fmt(sc["nmse"]), "NMSE between two teacher samples: the teacher's own spread"])
    for who in ("teacher", "student"):
        rec = acc.get(f"{who}_vs_recorded")
        if rec:
            rows.append([f"{who} vs recorded", f"NMSE {fmt(rec['nmse'])}, RMSE {fmt(rec['rmse'])}", "normalised by the demonstrations' variance"])
    sm = acc.get("smoothness") or {}
    if sm.get("teacher_jerk") is not None:
        text = f"teacher {fmt(sm['teacher_jerk'])}, student {fmt(sm['student_jerk'])}"
        if sm.get("recorded_jerk") is not None:
            text += f", recorded {fmt(sm['recorded_jerk'])}"
        rows.append(["mean squared jerk", text, f"student/teacher {fmt(sm.get('student_over_teacher'))}"])
    per_dim = [[str(d["dim"]), fmt(d["nmse"]), fmt(d["max_abs_error"]), fmt(d["rmse"])] for d in acc.get("per_dim", [])]
    return [
        Section("Accuracy", ["metric", "value", "meaning"], rows, [f"Teacher and student on the same observations and noise ({src})."]),
        Section("Accuracy per action dimension", ["dim", "NMSE", "max abs error", "RMSE"], per_dim),
    ]


def _roofline(report: dict[str, Any]) -> Section:
    roof = report.get("roofline") or {}
    rows, lines = [], []
    for name in ("teacher", "student"):
        r = roof.get(name)
        if not r:
            continue
        s2, s1 = r["system2"], r["system1"]
        ratio = r.get("measured_over_bound")
        rows.append([
            name,
            r["precision"],
            f"{fmt(s2['ms']['value'])} ({s2['bound']})",
            f"{fmt(s1['ms']['value'])} ({s1['steps']} steps, {s1['bound']})",
            f"≥ {fmt(r['total_ms']['value'])} {ESTIMATED}",
            f"{fmt(ratio)}x" if ratio else "–",
        ])
        if not lines:
            bw, peak = r["memory_bandwidth_gbs"], r["peak_tflops"]
            lines = [
                f"Lower bound per chunk: max(weight bytes / bandwidth, FLOPs / peak) per part; System 1 re-reads the expert at every flow step. Source: {r['source']}.",
                f"Memory bandwidth {fmt(bw['value'])} GB/s ({bw['source']}); peak {fmt(peak['value'])} TFLOPS {peak.get('precision', '')} ({peak['source']}).",
            ]
    return Section("Roofline (ms, lower bound)", ["model", "precision", "System 2", "System 1", "total", "measured p50 / bound"], rows, lines)


def _stages(report: dict[str, Any]) -> Section:
    rows = []
    for rec in report.get("stages") or []:
        metrics = [f"{k}={fmt(v)}" for k, v in rec.items() if k not in ("stage", "params", "seconds") and isinstance(v, (int, float, str, bool))]
        rows.append([str(rec.get("stage", "?")), fmt(rec.get("seconds")), ", ".join(metrics)])
    if report.get("verify_seconds") is not None:
        samples = report.get("samples") or {}
        rows.append(["verify", fmt(report["verify_seconds"]), f"samples={fmt(samples.get('count'))}, episodes={fmt(samples.get('episodes'))}"])
    lines = [f"Whole build: {fmt(report['seconds'])} s."] if report.get("seconds") is not None else []
    return Section("Stages", ["stage", "seconds", "metrics"], rows, lines)


def _artifact(report: dict[str, Any]) -> Section:
    art = report.get("artifact") or {}
    rows = [[f["path"], fmt(f.get("bytes")), f["sha256"]] for f in art.get("files", [])]
    lines = [f"Directory `{art['dir']}`."] if art.get("dir") else []
    return Section("Artifact files", ["file", "bytes", "sha256"], rows, lines)


def _closed_loop(report: dict[str, Any]) -> Section:
    cl = report.get("closed_loop")
    if not cl:
        return Section("Closed loop")
    t, s, cmp = cl["teacher"], cl["student"], cl["comparison"]
    paired = cmp.get("paired")  # reports before the paired statistics have none

    def interval(p: dict | None) -> str:
        return f"[{p['interval'][0]:+.3f}, {p['interval'][1]:+.3f}]" if p else ""

    rows = [["all tasks", fmt(t["success_rate"]), fmt(s["success_rate"]), fmt(cmp["drop"]), interval(paired),
             f"{paired['p_student_worse']:.3g}" if paired else ""]]
    for task, tt in t["tasks"].items():
        st, pt = s["tasks"][task], cmp["per_task"].get(task, {})
        rows.append([task, fmt(tt["success_rate"]), fmt(st["success_rate"]), fmt(tt["success_rate"] - st["success_rate"]),
                     interval(pt if "interval" in pt else None), f"{pt['p_student_worse']:.3g}" if "p_student_worse" in pt else ""])
    lines = [
        f"Suite **{cl['suite']}**: teacher and student each ran {cl['episodes']} episodes from the same seeds "
        f"(seed {cl['seed']}), executing {cl['actions_per_chunk']} actions of each chunk before re-planning."
    ]
    if paired:
        lines.append(
            f"Paired comparison ({paired['test']}): {paired['teacher_only']} episodes solved by the teacher only, "
            f"{paired['student_only']} by the student only; {paired['confidence']:.0%} interval on the drop "
            f"{interval(paired)}, p = {paired['p_student_worse']:.3g} that a coin gives a drop this large. Verdict: "
            f"**{paired['verdict']}** (limit {cmp['max_drop']:g}; a drop beyond it fails only when significant)."
            + (f" About {paired['episodes_to_detect_max_drop']} paired episodes would detect a drop of {cmp['max_drop']:g} "
               "(80% power, one-sided 0.05)." if paired.get("episodes_to_detect_max_drop") else ""))
    return Section("Closed loop (success rate)", ["task", "teacher", "student", "drop", "95% interval", "p (student worse)"],
                   rows, lines)


def sections(report: dict[str, Any]) -> list[Section]:
    out = [_overview(report), _gates(report), _latency(report), _control(report), *_accuracy(report), _closed_loop(report), _roofline(report), _stages(report), _artifact(report)]
    notes = report.get("notes") or []
    if notes:
        out.append(Section("Notes", lines=[f"- {n}" for n in notes]))
    return [s for s in out if s.rows or s.lines]


def _cell(text: str) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return f"_{text}_" if ESTIMATED in text else text


def render_markdown(report: dict[str, Any]) -> str:
    word, meaning = headline(report)
    icon = {"PASSED": "✅", "FAILED": "❌"}.get(word, "⚠️")
    out = [f"## {icon} vlacompile: {report.get('target')} — {word}", "", f"**{word}** ({meaning}).", ""]
    for sec in sections(report):
        out += [f"### {sec.title}", ""]
        if sec.lines:
            out += [*sec.lines, ""]
        if sec.rows:
            out.append("| " + " | ".join(sec.headers) + " |")
            out.append("|" + "---|" * len(sec.headers))
            out += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in sec.rows]
            out.append("")
    return "\n".join(out)
