"""The closed-loop gate's statistics: exact, and they never call a coin's difference a regression."""
from __future__ import annotations

import numpy as np
import pytest

from vlacompile.verify.gates import closed_loop_gate
from vlacompile.verify.stats import (bootstrap_percentile, clopper_pearson, episodes_to_detect, mcnemar_exact,
                                     paired_closed_loop, paired_drop)


def test_clopper_pearson_matches_published_values():
    # Clopper & Pearson's exact interval: the beta quantiles (scipy.stats.beta.ppf(a/2, k, n-k+1), ...)
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 0.3084971078), abs=1e-8)
    assert clopper_pearson(5, 10) == pytest.approx((0.1870860284, 0.8129139716), abs=1e-8)
    assert clopper_pearson(95, 100) == pytest.approx((0.8871650889, 0.9835681208), abs=1e-8)


def test_mcnemar_exact_p_values():
    assert mcnemar_exact(8, 2)["two_sided"] == pytest.approx(0.109375)  # 2 * P(X <= 2 | 10, 1/2)
    assert mcnemar_exact(4, 0)["greater"] == pytest.approx(1 / 16)
    assert mcnemar_exact(0, 0) == {"greater": 1.0, "two_sided": 1.0}
    assert mcnemar_exact(0, 5)["greater"] == pytest.approx(1.0)


def test_paired_drop_interval_holds_the_estimate():
    iv = paired_drop(5, 3, 100)
    assert iv["drop"] == pytest.approx(0.02) and iv["lower"] < iv["drop"] < iv["upper"]
    assert iv["lower"] < 0 < iv["upper"]  # 5 vs 3 discordant: no evidence either way


def test_a_coin_never_fails_the_gate_more_often_than_alpha():
    """Teacher and student with the same 90% success, drawn independently per episode: whatever the
    observed drop, the gate may fail at most ~5% of builds (it is an exact, conservative test)."""
    rng = np.random.default_rng(0)
    fails, n = 0, 100
    for _ in range(2000):
        t, s = rng.random(n) < 0.9, rng.random(n) < 0.9
        b, c = int((t & ~s).sum()), int((s & ~t).sum())
        fails += paired_closed_loop(b, c, n, max_drop=0.0)["verdict"] == "fail"
    assert fails / 2000 <= 0.05


def test_episodes_needed_to_see_a_five_point_drop():
    # With 8% of episodes discordant, a 5-point drop needs a few hundred paired episodes, not 20.
    need = episodes_to_detect(0.05, 0.08)
    assert 150 < need < 400
    assert episodes_to_detect(0.0, 0.1) is None


def test_the_gate_states_its_interval_and_passes_a_noisy_drop():
    from vlacompile.sim.rollout import compare

    def result(wins):
        runs = [{"task": "t", "episode": i, "success": w} for i, w in enumerate(wins)]
        rate = sum(wins) / len(wins)
        return {"suite": "s", "seed": 0, "episodes_per_task": len(runs), "actions_per_chunk": 8, "max_steps": 40,
                "success_rate": rate, "tasks": {"t": {"success_rate": rate}}, "runs": runs}

    cmp = compare(result([True] * 20), result([True] * 17 + [False] * 3), max_drop=0.05)  # drop 0.15 on 20 episodes
    gate = closed_loop_gate(cmp, "measured here")
    assert gate["status"] == "pass" and gate["verdict"] == "within noise"
    assert gate["interval"][0] < 0.05 < gate["interval"][1] and "a coin could produce it" in gate["note"]
    assert "episodes would detect" in gate["note"]


def test_bootstrap_interval_brackets_the_percentile():
    x = np.random.default_rng(1).lognormal(1.0, 0.3, 500)
    lo, hi = bootstrap_percentile(x, 99)
    assert lo <= np.percentile(x, 99) <= hi and hi - lo > 0
    assert bootstrap_percentile(x, 99) == (lo, hi)  # seeded


def test_interleaved_timing_alternates_and_declares_its_harness():
    from vlacompile.verify.latency import measure_interleaved

    calls = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def get_action(self, obs, noise):
            calls.append(self.name)

    out = measure_interleaved({"teacher": Fake("t"), "student": Fake("s")}, [object()], [np.zeros(1)], calls=6, warmup=2)
    assert calls[4:] == ["t", "s", "s", "t", "t", "s", "s", "t", "t", "s", "s", "t"]  # after 2 warm-up rounds
    for name, r in out.items():
        assert r["calls"] == 6 and len(r["samples_ms"]) == 6
        lo, hi = r["intervals"]["p99_ms"]
        assert lo <= r["p99_ms"] <= hi or np.isclose(hi, r["p99_ms"])
        assert r["harness"]["timed_calls"] == 6 and r["harness"]["warmup_calls"] == 2
        assert r["harness"]["interleaved_with"] == [n for n in out if n != name] and "perf_counter_ns" in r["harness"]["clock"]
