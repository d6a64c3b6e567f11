"""Every registered family meets the seam's contract (lerobot's tests/policies/test_policies.py, for
vlacompile's hooks): load/save round trip, spec vs preprocessor, split graphs equal the single
graph, a keep-all student is the teacher, prune groups slice as zeroing would, FLOPs agree with
torch's counter. A new family adds its tiny policy to POLICIES and passes these as they are."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_config, make_tiny_episode_set, make_tiny_policy
from torch.utils.flop_counter import FlopCounterMode

from vlacompile.checkpoint import load_policy, save_policy
from vlacompile.families import get_family, known_families, make_preprocessor
from vlacompile.observation import ObservationBatch
from vlacompile.stages.prune import top_k

SMOLVLA = Path(__file__).parent / "smolvla" / "fixtures"
PI0 = Path(__file__).parent / "pi0" / "fixtures"


def _smolvla(name: str = "two_cams_every3"):
    return load_policy(SMOLVLA / name / "policy", tokenizer=SMOLVLA / name / "vlm", lerobot_version="0.4")  # made by lerobot 0.4.4


def _pi0(name: str):
    return lambda: load_policy(PI0 / name / "policy", tokenizer=PI0 / name / "tokenizer")


# "family" or "family:variant" -> a small policy of it
POLICIES = {
    "vlacompile-reference": lambda: make_tiny_policy(make_tiny_config(), make_tiny_episode_set()),
    "smolvla": _smolvla,
    "pi0": _pi0("pi0_two_cams"),
    "pi0:pi05": _pi0("pi05_two_cams"),
}

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_registered_family_is_covered():
    # onnx-policy is opaque (a graph run as it is, no module to slice): tests/families/test_onnx_policy.py
    assert sorted({k.split(":")[0] for k in POLICIES} | {"onnx-policy"}) == known_families()


@pytest.fixture(scope="module", params=sorted(POLICIES))
def policy(request):
    return POLICIES[request.param]()


def run(policy, feeds: dict) -> np.ndarray:
    return policy.run_feeds(feeds).numpy()


def feeds_for(policy, seed: int = 0, batch: int = 2) -> dict[str, np.ndarray]:
    """Real preprocessor output for random observations, plus seeded noise."""
    spec = policy.spec
    rng = np.random.default_rng(seed)
    obs = ObservationBatch(
        images={c.name: rng.integers(0, 256, (batch, c.height, c.width, 3), dtype=np.uint8) for c in spec.cameras},
        state=rng.standard_normal((batch, spec.state_dim)).astype(np.float32),
        tasks=[("pick up the red cube", "open the top drawer", "push")[i % 3] for i in range(batch)],
    )
    feeds = make_preprocessor(spec).batch(obs)
    noise = next(i.name for i in spec.inputs if i.role == "noise")
    feeds[noise] = rng.standard_normal((batch, *spec.noise_shape)).astype(np.float32)
    return feeds


def test_save_load_round_trip(policy, tmp_path):
    save_policy(policy, tmp_path / "a")
    again = load_policy(tmp_path / "a")
    assert again.family == policy.family and again.spec.inputs == policy.spec.inputs and again.spec.head == policy.spec.head
    x = feeds_for(policy)
    np.testing.assert_array_equal(run(again, x), run(policy, x))
    save_policy(again, tmp_path / "b")  # deterministic bytes
    for f in sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_spec_matches_what_the_preprocessor_makes(policy):
    spec = policy.spec
    feeds = feeds_for(policy, batch=3)
    assert set(feeds) == set(spec.input_names)
    for i in spec.inputs:
        assert feeds[i.name].shape == (3, *i.shape), i.name
        assert feeds[i.name].dtype == np.dtype(i.dtype), i.name
    out = run(policy, feeds)
    assert out.shape == (3, spec.chunk_size, spec.action_dim) and np.isfinite(out).all()


def test_split_graphs_equal_the_single_graph(policy, tmp_path):
    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.split import SplitRunner
    from vlacompile.stages.export import export_policy, export_split

    export_policy(policy, tmp_path / "student.onnx")
    export_split(policy, tmp_path)
    x = feeds_for(policy, batch=1)
    want = run(policy, x)
    single = OrtRunner(tmp_path / "student.onnx", policy.spec, threads=1).run(x)
    split = SplitRunner(tmp_path, policy.spec, threads=1).run(x)
    scale = np.maximum(1.0, np.abs(want))
    assert (np.abs(single - want) / scale).max() < 1e-5
    assert (np.abs(split - want) / scale).max() < 1e-5
    assert (np.abs(split - single) / scale).max() < 1e-5


def test_keep_all_student_is_the_teacher(policy):
    family = get_family(policy.family)
    cfg = policy.config
    layers = family.resolve_layers(cfg, {}, source="test")
    assert layers == {p: list(range(d)) for p, d in family.depths(cfg).items()}
    student_cfg = family.student_config(cfg, layers, family.mlp_widths(cfg), None)
    student = family.restructure(policy, student_cfg, layers=layers, keep={})
    x = feeds_for(policy)
    np.testing.assert_array_equal(run(student, x), run(policy, x))
    assert student.spec == policy.spec


def _zeroing(policy, removed: dict):
    """The policy with the removed units' activations zeroed at the family's own probes."""
    m = copy.deepcopy(policy.module)
    handles = []
    for probe, idx in removed.items():
        target = m.get_submodule(probe.module)

        def zero(t, probe=probe, idx=idx):
            t = t.clone()
            if probe.stat == "head_norm":
                view = t.view(*t.shape[:-1], probe.heads, probe.head_dim)
                view[..., idx, :] = 0
            else:
                t[..., idx] = 0
            return t

        if probe.hook == "output":
            handles.append(target.register_forward_hook(lambda mod, a, out, zero=zero: zero(out)))
        else:
            handles.append(target.register_forward_pre_hook(lambda mod, args, zero=zero: (zero(args[0]), *args[1:])))
    return m


def test_prune_groups_slice_as_zeroing_would(policy):
    """Cutting half the units of every MLP and head group equals zeroing them where the family ranks them."""
    family = get_family(policy.family)
    groups = [g for g in family.prune_groups(policy, family.parts, ("mlp", "heads")) if g.units > 1]
    assert groups, "a family offers something to prune"
    g0 = torch.Generator().manual_seed(0)
    keep, removed, heads, mlp = {}, {}, {}, {}
    depths = family.depths(policy.config)
    for g in groups:
        kept = top_k(torch.rand(g.units, generator=g0), g.units // 2)
        for probe in g.probes:
            keep.setdefault((g.part, g.layer), {})[probe.member] = kept
            removed[probe] = sorted(set(range(g.units)) - set(kept.tolist()))
    layers = {p: list(range(d)) for p, d in depths.items()}
    for p, d in depths.items():
        heads[p] = [None] * d
        mlp[p] = [None] * d
    for g in groups:
        (heads if g.kind == "heads" else mlp)[g.part][g.layer] = g.units // 2
    cfg = family.pruned_config(policy.config, layers, heads, mlp)
    pruned = family.restructure(policy, cfg, layers=layers, keep=keep)
    assert pruned.num_parameters() < policy.num_parameters()
    x = feeds_for(policy)
    zeroed = _zeroing(policy, removed)
    with torch.no_grad():
        want = zeroed(*[torch.from_numpy(x[n]) for n in policy.spec.input_names]).numpy()
    np.testing.assert_allclose(run(pruned, x), want, rtol=1e-4, atol=1e-5)


def test_flops_agree_with_torchs_counter(policy):
    """The roofline's FLOPs per part against torch's count of System 2 and of one System 1 step."""
    family = get_family(policy.family)
    plan = family.split_plan(policy)
    x = {k: torch.from_numpy(v) for k, v in feeds_for(policy, batch=1).items()}
    from vlacompile.families.base import apply_ops

    values = dict(x)
    for d in plan.derived:
        values[d["output"]] = apply_ops(values[d["input"]], d["ops"])
    with torch.no_grad(), FlopCounterMode(display=False) as s2:
        carry = plan.system2(*[values[n] for n in plan.system2_inputs])
    values.update(zip(plan.system2_outputs, carry if isinstance(carry, tuple) else (carry,)))
    values[plan.integrator["x"]] = values[plan.integrator["init"]]
    values[plan.integrator["t"]] = torch.full((1,), float(plan.integrator["times"][0]))
    with torch.no_grad(), FlopCounterMode(display=False) as s1:
        plan.system1(*[values[n] for n in plan.system1_inputs])
    f = family.flops(policy.config)
    assert f["system2"] == pytest.approx(s2.get_total_flops(), rel=0.05)
    assert f["system1_per_step"] == pytest.approx(s1.get_total_flops(), rel=0.05)
    assert f["system1"] == pytest.approx(f["system1_per_step"] * policy.spec.flow_steps)


def test_predict_chunk_takes_lerobot_keys(policy):
    """One observation in LeRobot's batch keys -> the chunk the module computes on the preprocessed inputs."""
    spec = policy.spec
    rng = np.random.default_rng(3)
    frames = {c.name: rng.integers(0, 256, (c.height, c.width, 3), dtype=np.uint8) for c in spec.cameras}
    state = rng.standard_normal(spec.state_dim).astype(np.float32)
    noise = rng.standard_normal(spec.noise_shape).astype(np.float32)
    obs = {**{f"observation.images.{c}": f for c, f in frames.items()}, "observation.state": state, "task": "open the top drawer"}
    chunk = policy.predict_chunk(obs, noise=noise)
    assert chunk.shape == (spec.chunk_size, spec.action_dim)
    feeds = make_preprocessor(spec)({"images": frames, "state": state, "task": "open the top drawer"}, noise)
    np.testing.assert_array_equal(chunk, run(policy, feeds)[0])
    from vlacompile.errors import ConfigError

    with pytest.raises(ConfigError, match="noise has shape"):
        policy.predict_chunk(obs, noise=noise[:, :1])
    with pytest.raises(ConfigError, match="lacks"):
        policy.predict_chunk({"observation.state": state, "task": "x"})
    assert policy.predict_chunk(obs).shape == chunk.shape  # noise drawn when not given
