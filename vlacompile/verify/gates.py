"""Gates: the target's budgets and tolerances, judged against what verify measured or estimated.

Accuracy is always measured (teacher and student really ran here on held-out episodes). Latency and
memory are measured only when the target is this host; otherwise the gate carries the roofline
estimate and is "not_verified" - an estimate never passes a gate. A lower bound that already exceeds
a limit does fail: no implementation on that device can meet it.
"""
from __future__ import annotations

from typing import Any

from vlacompile.targets import host_device_string


def _compare(value: float, limit: float, comparison: str) -> bool:
    return value <= limit if comparison == "<=" else value >= limit


def _gate(name: str, value, limit, comparison: str, unit: str, source: str, *, estimated: bool, note: str | None = None) -> dict:
    if value is None:
        status = "not_verified"
        note = note or "no figure available"
    elif estimated:
        # A bound on the wrong side of the limit is conclusive; on the right side it proves nothing.
        if _compare(value, limit, comparison):
            status = "not_verified"
        else:
            status = "fail"
            why = "the estimate is a bound the device cannot beat, and it already misses the limit"
            note = f"{why}; {note}" if note else why
    else:
        status = "pass" if _compare(value, limit, comparison) else "fail"
    gate = {"name": name, "value": value, "limit": limit, "comparison": comparison, "unit": unit, "status": status,
            "source": source, "kind": "estimated" if estimated else "measured"}
    if note:
        gate["note"] = note
    return gate


def judge(
    accuracy: dict[str, Any],
    latency_student: dict[str, Any] | None,
    roofline: dict[str, Any] | None,
    target,
    *,
    measured: bool,
    memory_mb: float | None = None,
) -> dict[str, Any]:
    """Judge every gate of ``target``. ``measured``: whether the student's latency was measured on
    the target itself (the host); otherwise latency and memory gates use the ``roofline`` estimate.
    """
    tol, budget = target.accuracy, target.budget
    acc_source = f"measured on {accuracy.get('measured_on') or host_device_string()}"
    nmse_limit, cos_limit, note = tol.max_nmse, tol.min_cosine, None
    own = accuracy.get("teacher_self_consistency") or {}
    if accuracy.get("independent_noise") and own.get("nmse") is not None:
        # A student of another family samples its own noise: even an exact copy of the teacher would
        # differ from it by the teacher's own spread across draws. The tolerance is on top of that.
        nmse_limit = tol.max_nmse + own["nmse"]
        cos_limit = tol.min_cosine * max(0.0, own["cosine"])
        note = (f"independent noise draws: the limits add the tolerance to the teacher's own spread "
                f"(NMSE {own['nmse']:.3g}, cosine {own['cosine']:.3g} between two of its samples)")
    gates = [
        _gate("nmse_vs_teacher", accuracy["nmse_vs_teacher"], nmse_limit, "<=", "", acc_source, estimated=False, note=note),
        _gate("cosine", accuracy["cosine"], cos_limit, ">=", "", acc_source, estimated=False, note=note),
    ]
    if getattr(tol, "min_worst_cosine", None) is not None and accuracy.get("worst_cosine") is not None:
        gates.append(_gate("worst_sample_cosine", accuracy["worst_cosine"], tol.min_worst_cosine, ">=", "", acc_source,
                           estimated=False, note=f"held-out sample {accuracy.get('worst_cosine_sample')} of {accuracy.get('samples')}"))
    if tol.max_abs_error is not None:
        gates.append(_gate("max_abs_error", accuracy["max_abs_error"], tol.max_abs_error, "<=", "physical units", acc_source, estimated=False))

    if measured:
        p99 = latency_student["p99_ms"] if latency_student else None
        lat_source = f"measured on {(latency_student or {}).get('measured_on') or host_device_string()}"
        lat = latency_student or {}
        if memory_mb is not None:
            mem, mem_note = memory_mb, "peak resident memory, as measured by the caller"
        elif lat.get("process_memory"):
            mem, mem_note = lat["process_memory"]["peak_rss_mb"], f"peak resident memory of {lat['process_memory']['scope']}"
        else:
            mem = lat.get("peak_rss_mb")
            mem_note = "peak resident memory of the whole verify process (teacher included): an upper bound on the student's"
        mem_source = lat_source
    else:
        p99 = roofline["total_ms"]["value"] if roofline else None
        lat_source = f"estimated for {target.name}" + (" (roofline lower bound)" if roofline else "")
        mem = memory_mb if memory_mb is not None else (roofline or {}).get("weight_mb")
        mem_note = "weights only at the compiled precision: a lower bound on the process's memory"
        mem_source = f"estimated for {target.name} (weight bytes at the compiled precision)"
    estimated = not measured
    gates.append(_gate("p99_latency_ms", p99, budget.p99_latency_ms, "<=", "ms", lat_source, estimated=estimated))

    n, f = budget.actions_per_chunk, budget.control_hz
    if budget.execution == "async":
        gates.append(_gate("async_chunk_deadline_ms", p99, budget.async_deadline_ms, "<=", "ms", lat_source, estimated=estimated,
                           note=f"the next chunk is due after {n} actions at {f:g} Hz"))
    else:
        # The rate a synchronous robot keeps if each call takes the p99; the limit is that rate at the p99 limit.
        rate = None if p99 is None else n / (n / f + p99 / 1000.0)
        floor = n / (n / f + budget.p99_latency_ms / 1000.0)
        gates.append(_gate("sync_control_rate_hz", rate, floor, ">=", "Hz", lat_source, estimated=estimated,
                           note=f"the robot stops for every chunk: {n} actions at {f:g} Hz plus the p99"))
    if budget.memory_mb is not None:
        gates.append(_gate("memory_mb", mem, budget.memory_mb, "<=", "MB", mem_source, estimated=estimated, note=mem_note))

    return verdict(gates)


def verdict(gates: list[dict]) -> dict:
    """Any fail -> failed; else any not verified -> unverified; else passed."""
    statuses = [g["status"] for g in gates]
    status = "failed" if "fail" in statuses else "unverified" if "not_verified" in statuses else "passed"
    return {"status": status, "passed": status == "passed", "gates": gates}


def closed_loop_gate(comparison: dict, source: str) -> dict:
    """The student's closed-loop success-rate drop from the teacher's (measured: both ran here), as a
    paired test: it fails only when the drop exceeds the limit and is beyond chance (stats.paired_closed_loop)."""
    paired = comparison["paired"]
    gate = _gate("closed_loop_success_drop", comparison["drop"], comparison["max_drop"], "<=", "", source, estimated=False)
    lo, hi = paired["interval"]
    gate["interval"] = paired["interval"]
    gate["confidence"] = paired["confidence"]
    gate["p_student_worse"] = paired["p_student_worse"]
    note = (f"paired over {paired['episodes']} episodes: {paired['teacher_only']} solved by the teacher only, "
            f"{paired['student_only']} by the student only; drop {comparison['drop']:+.3f}, "
            f"{paired['confidence']:.0%} interval [{lo:+.3f}, {hi:+.3f}], exact McNemar p = {paired['p_student_worse']:.3g}")
    if paired["verdict"] == "within noise":
        gate["status"] = "pass"
        note += (f"; the drop exceeds {comparison['max_drop']:g} but a coin could produce it (p >= 0.05), so it does "
                 f"not fail the build; about {paired['episodes_to_detect_max_drop']} episodes would detect a drop of "
                 f"{comparison['max_drop']:g}")
    elif paired["verdict"] == "fail":
        note += "; significant at 0.05"
    gate["note"] = note
    gate["verdict"] = paired["verdict"]
    return gate
