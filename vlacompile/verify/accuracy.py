"""Agreement of the student's action chunks with the teacher's (and of both with the demonstrations).

All arrays are action chunks ``[N, chunk, action_dim]`` in physical units. Errors are normalised per
action dimension, because dimensions live on different scales (metres, radians, a gripper in [0, 1]):
an unnormalised MSE would be dominated by whichever joint moves most.
"""
from __future__ import annotations

import numpy as np

# A dimension whose variance is this small relative to its own magnitude (its values agree to ~5
# significant digits, about 100x float32 rounding) is treated as constant, and so is one far below
# every other dimension: its variance is floored so the NMSE stays finite, and the report says so.
RELATIVE_FLOOR = 1e-10  # x the dimension's mean square
CROSS_DIM_FLOOR = 1e-12  # x the largest dimension's variance (std ratios up to 1e6 stay exact)


def _check(name: str, arr: np.ndarray, like: np.ndarray | None = None) -> np.ndarray:
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 3:
        raise ValueError(f"{name}: expected action chunks [N, chunk, action_dim], got shape {arr.shape}")
    if like is not None and arr.shape != like.shape:
        raise ValueError(f"{name}: shape {arr.shape} does not match the teacher's {like.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: no samples")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: holds NaN or infinite values")
    return arr


def _variance(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Per-dimension variance over samples and chunk steps, floored for (nearly) constant dimensions."""
    var = flat.var(axis=0)
    floor = np.maximum(RELATIVE_FLOOR * np.mean(flat**2, axis=0), CROSS_DIM_FLOOR * float(var.max()))
    floor = np.maximum(floor, 1e-30)  # every dimension all zeros
    degenerate = [int(d) for d in np.flatnonzero(var < floor)]
    return np.maximum(var, floor), floor, degenerate


def _nmse_per_dim(reference: np.ndarray, other: np.ndarray) -> tuple[np.ndarray, float, list[int]]:
    ref = reference.reshape(-1, reference.shape[-1])
    err = other.reshape(ref.shape) - ref
    var, floor, degenerate = _variance(ref)
    return (err**2).mean(axis=0) / var, floor, degenerate


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over samples of the cosine similarity of the flattened chunks."""
    return float(_cosines(a, b).mean())


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per sample: the cosine similarity of the flattened chunks."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / (na * nb)
    # Two all-zero chunks agree perfectly; one zero chunk against a non-zero one does not.
    cos = np.where((na == 0) & (nb == 0), 1.0, np.where((na == 0) | (nb == 0), 0.0, cos))
    return np.clip(cos, -1.0, 1.0)


def _jerk(chunks: np.ndarray) -> float | None:
    """Mean squared third difference along the chunk (physical units per step^3); None if chunk < 4."""
    if chunks.shape[1] < 4:
        return None
    return float(np.mean(np.diff(chunks, n=3, axis=1) ** 2))


def _vs_recorded(pred: np.ndarray, recorded: np.ndarray) -> dict:
    nmse, _, _ = _nmse_per_dim(recorded, pred)
    rmse = np.sqrt(((pred - recorded) ** 2).reshape(-1, pred.shape[-1]).mean(axis=0))
    return {
        "nmse": float(nmse.mean()),
        "rmse": float(np.sqrt(np.mean((pred - recorded) ** 2))),
        "per_dim_nmse": [float(v) for v in nmse],
        "per_dim_rmse": [float(v) for v in rmse],
    }


def action_agreement(teacher: np.ndarray, student: np.ndarray, recorded: np.ndarray | None = None) -> dict:
    """How closely the student's chunks follow the teacher's (same observations, same noise).

    - ``nmse_vs_teacher``: mean over action dimensions of MSE_d / Var_d(teacher), the variance taken
      over all samples and chunk steps. 0 is identical; 1 is no better than always predicting the
      teacher's mean action. Dimensions where the teacher is (nearly) constant get a variance floor
      (``RELATIVE_FLOOR``, ``CROSS_DIM_FLOOR``) and are listed in ``degenerate_dims``.
    - ``max_abs_error``: the worst absolute error of any action, physical units, and its dimension.
    - ``cosine``: mean cosine similarity of the flattened chunks; ``worst_cosine``: the lowest sample's
      (and which), ``cosine_p05`` its 5th percentile.
    - with ``recorded``: teacher and student against the demonstrations (NMSE normalised by the
      recorded actions' per-dimension variance).
    - ``smoothness``: mean squared jerk of the chunks; compression can keep the error low and still
      make motions jerkier.
    """
    t = _check("teacher", teacher)
    s = _check("student", student, t)
    nmse, floor, degenerate = _nmse_per_dim(t, s)
    abs_err = np.abs(s - t).reshape(-1, t.shape[-1])
    max_abs = abs_err.max(axis=0)
    rmse = np.sqrt((abs_err**2).mean(axis=0))
    worst = int(np.argmax(max_abs))
    cos = _cosines(t, s)
    # Each sample's share of the NMSE (same normalisation): their spread gives the estimate's standard
    # error over the held-out samples, the noise band a comparison of two builds needs.
    nmse_var = _variance(t.reshape(-1, t.shape[-1]))[0]
    per_sample = (((s - t) ** 2).mean(axis=1) / nmse_var).mean(axis=1)
    out: dict = {
        "nmse_vs_teacher": float(nmse.mean()),
        "nmse_standard_error": float(per_sample.std(ddof=1) / np.sqrt(len(per_sample))) if len(per_sample) > 1 else None,
        "max_abs_error": float(max_abs[worst]),
        "max_abs_error_dim": worst,
        "cosine": float(cos.mean()),
        # A mean hides the one observation where the student does something else: the worst one is gated too.
        "worst_cosine": float(cos.min()),
        "worst_cosine_sample": int(np.argmin(cos)),
        "cosine_p05": float(np.percentile(cos, 5)),
        "per_dim": [
            {"dim": d, "nmse": float(nmse[d]), "max_abs_error": float(max_abs[d]), "rmse": float(rmse[d])}
            for d in range(t.shape[-1])
        ],
        "variance_floor": [float(f) for f in floor],
        "degenerate_dims": degenerate,
        "samples": int(t.shape[0]),
        "chunk_size": int(t.shape[1]),
        "action_dim": int(t.shape[2]),
    }
    if degenerate:
        out["notes"] = [
            f"action dimension(s) {degenerate} are (nearly) constant in the teacher's chunks: their variance was "
            f"floored (at {', '.join(f'{floor[d]:.3g}' for d in degenerate)}) so their NMSE stays finite; "
            "any student motion there shows as a large NMSE, judge those dimensions by max_abs_error"
        ]
    smooth = {"teacher_jerk": _jerk(t), "student_jerk": _jerk(s)}
    if recorded is not None:
        r = _check("recorded", recorded, t)
        out["teacher_vs_recorded"] = _vs_recorded(t, r)
        out["student_vs_recorded"] = _vs_recorded(s, r)
        smooth["recorded_jerk"] = _jerk(r)
    if smooth["teacher_jerk"]:
        smooth["student_over_teacher"] = smooth["student_jerk"] / smooth["teacher_jerk"]
    smooth["unit"] = "mean squared third difference along the chunk (physical units per step^3)"
    out["smoothness"] = smooth
    return out


def self_consistency(a1: np.ndarray, a2: np.ndarray) -> dict:
    """The teacher against itself with a different noise draw: its own sample-to-sample spread.

    A flow-matching policy is stochastic; this NMSE says how much two of its own samples disagree,
    which puts the student-vs-teacher tolerance (same noise) in context.
    """
    first = _check("teacher sample 1", a1)
    second = _check("teacher sample 2", a2, first)
    nmse, _, _ = _nmse_per_dim(first, second)
    return {
        "nmse": float(nmse.mean()),
        "cosine": _cosine(first, second),
        "max_abs_error": float(np.abs(second - first).max()),
        "per_dim_nmse": [float(v) for v in nmse],
    }
