"""Statistics that tell a regression from noise, in pure Python (no scipy).

Closed loop: teacher and student run the same seeded episodes, so their outcomes are paired. Only
the discordant pairs carry information: ``b`` episodes only the teacher solved, ``c`` only the
student. Under "no difference" each discordant pair goes either way with probability 1/2, so ``b``
is Binomial(b + c, 1/2): the exact McNemar test. The interval on the paired difference
``(b - c) / n`` is the exact (Clopper-Pearson) interval on ``b / (b + c)``, scaled by ``(b + c) / n``
(conditional on the number of discordant pairs; Fagerland et al. 2013 discuss the alternatives).

Latency: a percentile's interval from the bootstrap over the timed calls (seeded, so a report is
reproducible).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1)))


def _solve(f, lo: float = 0.0, hi: float = 1.0) -> float:
    """The root of a decreasing f on [lo, hi], by bisection."""
    for _ in range(80):
        mid = (lo + hi) / 2
        if f(mid) > 0:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact interval on a binomial proportion k / n."""
    if n == 0:
        return 0.0, 1.0
    a = (1 - confidence) / 2
    lower = 0.0 if k == 0 else _solve(lambda p: a - (1 - binom_cdf(k - 1, n, p)))  # P(X >= k) = a
    upper = 1.0 if k == n else _solve(lambda p: binom_cdf(k, n, p) - a)  # P(X <= k) = a
    return lower, upper


def mcnemar_exact(b: int, c: int) -> dict[str, float]:
    """Exact McNemar p-values for ``b`` teacher-only and ``c`` student-only successes.

    ``greater``: the one-sided p-value of "the student is worse" (b larger than chance gives);
    ``two_sided``: of "they differ".
    """
    m = b + c
    if m == 0:
        return {"greater": 1.0, "two_sided": 1.0}
    greater = 1 - binom_cdf(b - 1, m, 0.5)
    two = min(1.0, 2 * min(binom_cdf(b, m, 0.5), 1 - binom_cdf(b - 1, m, 0.5)))
    return {"greater": float(greater), "two_sided": float(two)}


def paired_drop(b: int, c: int, n: int, confidence: float = 0.95) -> dict[str, float]:
    """The student's success-rate drop ``(b - c) / n`` with its exact conditional interval."""
    m = b + c
    lo, hi = clopper_pearson(b, m, confidence) if m else (0.5, 0.5)
    scale = m / n if n else 0.0
    return {"drop": (b - c) / n if n else 0.0, "lower": scale * (2 * lo - 1), "upper": scale * (2 * hi - 1),
            "confidence": confidence}


def episodes_to_detect(drop: float, discordance: float, *, alpha: float = 0.05, power: float = 0.8) -> int | None:
    """Paired episodes a one-sided McNemar test at ``alpha`` needs to detect a ``drop`` with ``power``,
    when a fraction ``discordance`` of episodes is solved by only one of the two (Connor 1987)."""
    if not drop > 0:
        return None
    psi = max(discordance, drop)  # at least the drop itself is discordant
    za, zb = _z(1 - alpha), _z(power)
    return int(math.ceil((za * math.sqrt(psi) + zb * math.sqrt(max(psi - drop * drop, 0.0))) ** 2 / drop**2))


def _z(q: float) -> float:
    """The standard normal quantile (bisection on erf; a handful of calls per report)."""
    return _solve(lambda x: q - 0.5 * (1 + math.erf(x / math.sqrt(2))), -10.0, 10.0)


def bootstrap_percentile(samples_ms: Sequence[float], q: float, *, confidence: float = 0.95, draws: int = 2000,
                         seed: int = 0) -> tuple[float, float]:
    """A percentile-bootstrap interval on the ``q``-th percentile (0-100) of timed calls."""
    x = np.asarray(samples_ms, dtype=np.float64)
    if x.size < 2:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    stats = np.percentile(x[rng.integers(0, x.size, size=(draws, x.size))], q, axis=1)
    a = (1 - confidence) / 2
    return float(np.quantile(stats, a)), float(np.quantile(stats, 1 - a))


ALPHA = 0.05


def paired_closed_loop(b: int, c: int, n: int, max_drop: float, *, alpha: float = ALPHA) -> dict:
    """The closed-loop comparison of a student with its teacher on ``n`` paired episodes.

    verdict: "fail" when the drop exceeds ``max_drop`` AND the student is significantly worse than
    the teacher (one-sided exact McNemar p < ``alpha``): a difference a coin could produce never
    fails a build. "within noise" when the drop exceeds ``max_drop`` but is not significant (more
    episodes would tell: ``episodes_to_detect``). "pass" when the drop is within ``max_drop``.
    """
    iv = paired_drop(b, c, n, 1 - alpha)
    p = mcnemar_exact(b, c)
    drop = iv["drop"]
    significant = p["greater"] < alpha
    verdict = "pass" if drop <= max_drop + 1e-12 else ("fail" if significant else "within noise")
    needed = episodes_to_detect(max_drop, (b + c) / n if n else 0.0, alpha=alpha)
    return {
        "test": "exact McNemar (one-sided: the student is worse), exact conditional interval on the paired drop",
        "teacher_only": b, "student_only": c, "episodes": n,
        "drop": drop, "interval": [iv["lower"], iv["upper"]], "confidence": 1 - alpha,
        "p_student_worse": p["greater"], "p_two_sided": p["two_sided"], "significant": significant,
        "verdict": verdict, "max_drop": max_drop,
        "episodes_to_detect_max_drop": needed,
    }
