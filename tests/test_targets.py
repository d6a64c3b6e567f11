"""Target profiles: the shipped ones, each way a target TOML can be wrong, and a parsing fuzz."""
from __future__ import annotations

import copy
import math
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlacompile.errors import ConfigError
from vlacompile.resources import TARGETS_DIR
from vlacompile.targets import PRECISIONS, TargetProfile, list_targets, load_target, parse_target

SHIPPED = ("jetson-orin", "jetson-orin-nano", "jetson-thor", "x86-cpu", "x86-gpu")


# ---------------------------------------------------------------------------------------------
# Shipped targets


def test_the_five_targets_ship():
    assert set(list_targets()) >= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_target_parses_and_validates(name):
    target = load_target(name)
    assert target.name == name
    assert target.path == str(TARGETS_DIR / f"{name}.toml")
    assert target.default_recipe
    assert target.device.sources, "every device figure says where it came from"
    assert set(target.device.precisions) <= set(PRECISIONS)
    assert set(target.device.peak_tflops) <= set(target.device.precisions)
    assert target.budget.control_hz > 0 and target.budget.p99_latency_ms > 0
    if target.budget.execution == "async":
        assert target.budget.p99_latency_ms <= target.budget.async_deadline_ms
    assert target.runs_on_host == (name == "x86-cpu")
    target.validate()
    # to_dict is the inverse of parsing (the CLI's `targets --json` relies on it).
    assert parse_target(target.to_dict(), target.path) == target
    # A path works as well as a name.
    assert load_target(TARGETS_DIR / f"{name}.toml") == target


def test_orin_has_no_fp8():
    # DESIGN.md: FP8 engines fail on Orin (no FP8 hardware); recipe legality depends on this.
    for name in ("jetson-orin", "jetson-orin-nano"):
        assert not load_target(name).supports("fp8")
    assert load_target("jetson-thor").supports("fp8")


def test_async_deadline():
    thor = load_target("jetson-thor")
    assert thor.budget.async_deadline_ms == pytest.approx(1000.0 * 16 / 50)


def test_unknown_target_name_lists_known_targets():
    with pytest.raises(ConfigError) as info:
        load_target("nope")
    err = info.value
    assert "nope" in err.message
    assert err.source == "--target"
    for name in SHIPPED:
        assert name in err.hint


def test_missing_target_file(tmp_path):
    path = tmp_path / "mine.toml"
    with pytest.raises(ConfigError) as info:
        load_target(path)
    assert info.value.source == str(path)
    assert "not found" in info.value.message


def test_target_not_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("name = 'x'\n[budget\ncontrol_hz = 30\n")
    with pytest.raises(ConfigError) as info:
        load_target(path)
    assert info.value.source == str(path)
    assert "TOML" in info.value.message
    assert info.value.hint


# ---------------------------------------------------------------------------------------------
# Bad target TOMLs: each a ConfigError naming the file and the key

CASES = {
    # case: (base target, text to replace, replacement, words the message must hold, hint wanted)
    "unknown-key": ("x86-cpu", "p99_latency_ms = 10", "p99_latency_ms = 10\nlatency_p99 = 5", ["latency_p99", "budget"], True),
    "unknown-top-level-table": ("x86-cpu", "[accuracy]", "[latency]\np99 = 3\n\n[accuracy]", ["latency"], True),
    "wrong-type-number": ("x86-cpu", "control_hz = 30", 'control_hz = "30"', ["budget.control_hz", "number"], False),
    "wrong-type-list": ("x86-cpu", 'precisions = ["fp32", "int8", "int4"]', 'precisions = "fp32"', ["device.precisions", "list"], False),
    "wrong-type-int": ("x86-cpu", "actions_per_chunk = 8", "actions_per_chunk = 8.5", ["budget.actions_per_chunk", "integer"], False),
    "negative-p99": ("x86-cpu", "p99_latency_ms = 10", "p99_latency_ms = -5", ["budget.p99_latency_ms", "-5"], True),
    "nan-p99": ("x86-cpu", "p99_latency_ms = 10", "p99_latency_ms = nan", ["budget.p99_latency_ms"], True),
    "zero-control-hz": ("x86-cpu", "control_hz = 30", "control_hz = 0", ["budget.control_hz"], False),
    "inf-control-hz": ("x86-cpu", "control_hz = 30", "control_hz = inf", ["budget.control_hz"], False),
    "zero-actions-per-chunk": ("x86-cpu", "actions_per_chunk = 8", "actions_per_chunk = 0", ["budget.actions_per_chunk"], False),
    "zero-max-nmse": ("x86-cpu", "max_nmse = 0.05", "max_nmse = 0", ["accuracy.max_nmse"], False),
    "cosine-above-one": ("x86-cpu", "min_cosine = 0.95", "min_cosine = 1.5", ["accuracy.min_cosine"], False),
    "negative-memory": ("x86-cpu", "memory_mb = 2000", "memory_mb = -1", ["budget.memory_mb"], False),
    "unknown-precision": ("x86-cpu", 'precisions = ["fp32", "int8", "int4"]', 'precisions = ["fp32", "int3"]', ["int3", "device.precisions"], True),
    "unknown-execution": ("x86-cpu", 'execution = "sync"', 'execution = "sometimes"', ["budget.execution", "sometimes"], False),
    "unknown-runtime": ("x86-cpu", 'runtime = "onnxruntime"', 'runtime = "tvm"', ["device.runtime", "tvm"], False),
    "missing-key": ("x86-cpu", "control_hz = 30\n", "", ["budget.control_hz", "missing"], False),
    "missing-table": ("x86-cpu", "[accuracy]", "[not_accuracy]", ["not_accuracy"], True),
    "p99-above-async-deadline": ("jetson-thor", "p99_latency_ms = 50", "p99_latency_ms = 500", ["budget.p99_latency_ms", "320.0"], True),
    "peak-for-unknown-precision": ("jetson-thor", "fp32 = 129 }", "fp32 = 129, fp64 = 1 }", ["device.peak_tflops.fp64"], False),
    "negative-bandwidth": ("jetson-thor", "memory_bandwidth_gbs = 273", "memory_bandwidth_gbs = -273", ["device.memory_bandwidth_gbs"], False),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_target_toml(tmp_path, case):
    base, old, new, words, want_hint = CASES[case]
    text = (TARGETS_DIR / f"{base}.toml").read_text()
    assert text.count(old) == 1, f"case {case!r} no longer matches {base}.toml"
    path = tmp_path / f"{case}.toml"
    path.write_text(text.replace(old, new))
    with pytest.raises(ConfigError) as info:
        load_target(path)
    err = info.value
    assert err.source == str(path)
    assert str(path) in str(err)
    for word in words:
        assert word in err.message, (word, err.message)
    if want_hint:
        assert err.hint


def test_sync_target_may_exceed_async_deadline(tmp_path):
    # The deadline rule gates only asynchronous execution.
    text = (TARGETS_DIR / "x86-cpu.toml").read_text().replace("p99_latency_ms = 10", "p99_latency_ms = 5000")
    path = tmp_path / "slow-sync.toml"
    path.write_text(text)
    assert load_target(path).budget.p99_latency_ms == 5000


# ---------------------------------------------------------------------------------------------
# Fuzz: parse_target on mutated dicts either returns a valid profile or raises ConfigError

BASES = {name: tomllib.loads((TARGETS_DIR / f"{name}.toml").read_text()) for name in ("jetson-thor", "x86-cpu")}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(PRECISIONS + ("async", "sync", "cpu", "gpu", "onnxruntime", "tensorrt")),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
# Numbers at the edges, where validation bugs hide (TOML has nan and inf; Python dicts have big ints).
edge_numbers = st.sampled_from([0, -1, 0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1e308, 2**63, 2**70]) | st.floats() | st.integers()
values = json_values | edge_numbers


def _paths(node, prefix=()) -> list[tuple]:
    """Every key path (dict keys and list positions) inside a parsed TOML document."""
    out = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out.extend(_paths(child, (*prefix, key)))
    return out


def _apply(doc: dict, path: tuple, action: str, value) -> None:
    parent = doc
    for key in path[:-1]:
        if not isinstance(parent, (dict, list)):
            return
        try:
            parent = parent[key]
        except (KeyError, IndexError, TypeError):
            return  # an earlier mutation removed or replaced this branch
    key = path[-1]
    if isinstance(parent, dict) and key in parent:
        if action == "drop":
            del parent[key]
        else:
            parent[key] = value
    elif isinstance(parent, list) and isinstance(key, int) and key < len(parent):
        if action == "drop":
            del parent[key]
        else:
            parent[key] = value


@st.composite
def mutated_targets(draw) -> dict:
    doc = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    paths = _paths(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["drop", "replace", "replace"]))
        _apply(doc, path, action, draw(values) if action == "replace" else None)
    if draw(st.integers(0, 4)) == 0:  # now and then an extra key somewhere
        table = draw(st.sampled_from([doc, *[v for v in doc.values() if isinstance(v, dict)]]))
        table[draw(st.text(min_size=1, max_size=6))] = draw(json_values)
    return doc


def _check_valid(t: TargetProfile) -> None:
    b, a, d = t.budget, t.accuracy, t.device
    assert set(d.precisions) <= set(PRECISIONS)
    assert math.isfinite(b.control_hz) and b.control_hz > 0
    assert isinstance(b.actions_per_chunk, int) and b.actions_per_chunk >= 1
    assert math.isfinite(b.p99_latency_ms) and b.p99_latency_ms > 0
    if b.execution == "async":
        assert b.p99_latency_ms <= b.async_deadline_ms
    assert b.execution in ("async", "sync") and d.runtime in ("onnxruntime", "tensorrt")
    assert math.isfinite(a.max_nmse) and a.max_nmse > 0
    assert -1 <= a.min_cosine <= 1
    for v in (b.memory_mb, a.max_abs_error, d.memory_gb, d.memory_bandwidth_gbs, *d.peak_tflops.values()):
        assert v is None or (math.isfinite(v) and v > 0)
    assert isinstance(t.name, str) and isinstance(t.description, str)
    assert all(isinstance(s, str) for s in d.sources)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=mutated_targets())
def test_fuzz_parse_target(doc):
    try:
        target = parse_target(doc, "fuzz.toml")
    except ConfigError as err:
        assert err.source == "fuzz.toml"
        assert err.message
        return
    _check_valid(target)


def test_fuzz_reaches_both_outcomes():
    # Guard against a fuzz that only ever fails (or only ever passes): count both outcomes.
    outcomes = {"ok": 0, "error": 0}

    @settings(max_examples=200, deadline=None, database=None)
    @given(doc=mutated_targets())
    def run(doc):
        try:
            parse_target(doc, "fuzz.toml")
            outcomes["ok"] += 1
        except ConfigError:
            outcomes["error"] += 1

    run()
    assert outcomes["ok"] > 0 and outcomes["error"] > 0, outcomes
