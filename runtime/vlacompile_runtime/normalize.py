"""LeRobot's normalisation modes in numpy, in LeRobot's float32 op order
(``lerobot/processor/normalize_processor.py``, ``_NormalizationMixin._apply_transform``, eps 1e-8):

    MEAN_STD     (x - mean) / (std + eps)
    MIN_MAX      2 (x - min) / d - 1, d = max - min
    QUANTILES    2 (x - q01) / d - 1, d = q99 - q01
    QUANTILE10   as QUANTILES with q10 / q90
    IDENTITY     x

where a zero ``d`` is replaced by eps. Each step is one float32 operation, rounded as torch rounds it
on the CPU, so the results are bit-identical to the compiler's torch module
(``vlacompile.lerobot.normalize``, which exports the same modes into graphs): pi0.5 digitises the
normalised state into prompt bins, where one ulp on a bin edge changes a token.
"""
from __future__ import annotations

from typing import Any

import numpy as np

MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")
STATS_FOR = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}
EPS = 1e-8


class Normalize:
    """One feature's normalisation; ``stats`` holds the two statistics its mode needs (zeros when None)."""

    def __init__(self, mode: str, shape: tuple[int, ...], eps: float = EPS, stats: dict[str, Any] | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; LeRobot has {MODES}")
        self.mode, self.eps = mode, np.float32(eps)
        self.stats: dict[str, np.ndarray] = {}
        if mode != "IDENTITY":
            for name in STATS_FOR[mode]:
                value = np.zeros(shape, np.float32) if stats is None else np.asarray(stats[name], dtype=np.float32).reshape(shape)
                self.stats[name] = value.copy()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.mode == "IDENTITY":
            return x
        one, two = np.float32(1), np.float32(2)
        if self.mode == "MEAN_STD":
            return (x - self.stats["mean"]) / (self.stats["std"] + self.eps)
        lo_name, hi_name = STATS_FOR[self.mode]
        lo, hi = self.stats[lo_name], self.stats[hi_name]
        d = hi - lo
        d = np.where(d == 0, self.eps, d).astype(np.float32)
        return two * (x - lo) / d - one
