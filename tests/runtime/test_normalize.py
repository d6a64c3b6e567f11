"""pi0.5's state prompt runs in numpy on the robot: the runtime's normalisation gives the same float32
bits as lerobot's torch op order (``vlacompile.lerobot.normalize``, which the graphs export), so
every state lands in lerobot's bin, on bin edges included."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vlacompile.lerobot.normalize import STATS_FOR
from vlacompile.lerobot.normalize import Normalize as TorchNormalize
from vlacompile_runtime.normalize import Normalize
from vlacompile_runtime.processors import STATE_BINS, digitize_state

EDGES = np.linspace(-1, 1, STATE_BINS + 1)[:-1]


def states_on_edges(mode: str, lo: np.ndarray, hi: np.ndarray, rng, n: int) -> np.ndarray:
    """States whose normalised value is (about) a bin edge, and one float32 ulp either side."""
    e = rng.choice(EDGES, (n, lo.size)).astype(np.float32)
    if mode == "MEAN_STD":
        x = e * hi + lo
    elif mode == "IDENTITY":
        x = e
    else:
        x = (e + 1) / 2 * (hi - lo) + lo
    x = x.astype(np.float32)
    return np.concatenate([x, np.nextafter(x, np.float32(np.inf)), np.nextafter(x, np.float32(-np.inf))])


@pytest.mark.parametrize("mode", ["MEAN_STD", "MIN_MAX", "QUANTILES", "QUANTILE10", "IDENTITY"])
def test_numpy_normalisation_is_bit_identical_to_lerobots_torch_order(mode):
    rng = np.random.default_rng(0)
    on_edges = 0
    for trial in range(20):
        d = 7
        scale = rng.choice([1e-3, 1.0, 100.0])
        lo = (rng.standard_normal(d) * scale).astype(np.float32)
        hi = (lo + np.abs(rng.standard_normal(d)) * rng.choice([1e-3, 1.0, 50.0])).astype(np.float32)
        hi[0] = lo[0]  # a zero range: lerobot divides by eps
        names = STATS_FOR.get(mode, ())
        stats = dict(zip(names, (lo.tolist(), np.abs(hi).tolist()))) if names else None
        ours = Normalize(mode, (d,), stats=stats)
        theirs = TorchNormalize(mode, (d,), stats={k: torch.tensor(v) for k, v in stats.items()} if stats else None)
        x = rng.standard_normal((1000, d)).astype(np.float32) * np.float32(rng.choice([0.01, 1.0, 100.0]))
        x = np.concatenate([x, states_on_edges(mode, lo, np.abs(hi), rng, 1000)])
        with torch.no_grad():
            want = theirs(torch.from_numpy(x)).numpy()
        got = ours(x)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
        np.testing.assert_array_equal(digitize_state(got), digitize_state(want))
        on_edges += int(np.isin(got.astype(np.float64), EDGES).sum())
    assert on_edges > 1000  # the edges were really hit
