"""LeRobot's normalisation modes as torch modules, in LeRobot's float32 op order
(``lerobot/processor/normalize_processor.py``, ``_NormalizationMixin._apply_transform``, eps 1e-8):

    MEAN_STD     (x - mean) / (std + eps)             inverse  x * std + mean
    MIN_MAX      2 (x - min) / d - 1, d = max - min   inverse  (x + 1) / 2 * d + min
    QUANTILES    2 (x - q01) / d - 1, d = q99 - q01   inverse  (x + 1) * d / 2 + q01
    QUANTILE10   as QUANTILES with q10 / q90
    IDENTITY     x

where a zero ``d`` is replaced by eps. Statistics are buffers, so the modes export into the graph.
"""
from __future__ import annotations

import torch
from torch import nn

MODES = ("IDENTITY", "MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10")
STATS_FOR = {"MEAN_STD": ("mean", "std"), "MIN_MAX": ("min", "max"), "QUANTILES": ("q01", "q99"), "QUANTILE10": ("q10", "q90")}
EPS = 1e-8


class Normalize(nn.Module):
    """One feature's (un)normalisation; ``stats`` holds the two statistics its mode needs."""

    def __init__(self, mode: str, shape: tuple[int, ...], eps: float = EPS, stats: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown normalisation mode {mode!r}; LeRobot has {MODES}")
        self.mode, self.eps = mode, eps
        if mode != "IDENTITY":
            for name in STATS_FOR[mode]:
                value = torch.zeros(shape) if stats is None else torch.as_tensor(stats[name], dtype=torch.float32).reshape(shape)
                self.register_buffer(name, value.clone())

    def _lo_d(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo_name, hi_name = STATS_FOR[self.mode]
        lo, hi = getattr(self, lo_name), getattr(self, hi_name)
        d = hi - lo
        return lo, torch.where(d == 0, torch.full_like(d, self.eps), d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "IDENTITY":
            return x
        if self.mode == "MEAN_STD":
            return (x - self.mean) / (self.std + self.eps)
        lo, d = self._lo_d()
        return 2 * (x - lo) / d - 1 if self.mode == "MIN_MAX" else 2.0 * (x - lo) / d - 1.0

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "IDENTITY":
            return x
        if self.mode == "MEAN_STD":
            return x * self.std + self.mean
        lo, d = self._lo_d()
        if self.mode == "MIN_MAX":
            return (x + 1) / 2 * d + lo
        return (x + 1.0) * d / 2.0 + lo

    def inverse_ops(self) -> list[dict]:
        """``inverse`` as the split runner's elementwise ops (``vlacompile.families.base.SplitPlan``)."""
        f32 = lambda t: [float(v) for v in t.detach().cpu().float().reshape(-1)]
        if self.mode == "IDENTITY":
            return []
        if self.mode == "MEAN_STD":
            return [{"op": "mul", "value": f32(self.std)}, {"op": "add", "value": f32(self.mean)}]
        lo, d = self._lo_d()
        if self.mode == "MIN_MAX":
            return [{"op": "add", "value": 1.0}, {"op": "div", "value": 2.0}, {"op": "mul", "value": f32(d)}, {"op": "add", "value": f32(lo)}]
        return [{"op": "add", "value": 1.0}, {"op": "mul", "value": f32(d)}, {"op": "div", "value": 2.0}, {"op": "add", "value": f32(lo)}]

    def scale(self) -> torch.Tensor:
        """The physical size of one normalised unit, per dimension (ones for IDENTITY)."""
        if self.mode == "IDENTITY":
            return torch.ones(())
        if self.mode == "MEAN_STD":
            return self.std.detach().clone()
        return self._lo_d()[1].detach() / 2

    def extra_repr(self) -> str:
        return self.mode
