"""A compiled policy on the robot: one call loads an artifact directory, then

    policy = vlacompile_runtime.load("build/x86-cpu")
    chunk = policy.predict_chunk(observation)    # float32 [chunk, action_dim], physical units
    action = policy.select_action(observation)   # float32 [action_dim], from its own chunk queue
    policy.reset()                               # a new episode: forget the queued actions

``observation`` is what a robot hands over, in LeRobot's keys: ``observation.images.<camera>``
uint8 [H, W, 3] at the policy's resolution (``policy.spec.cameras``), ``observation.state`` float
[state_dim] in physical units, ``task`` the instruction. Everything between it and the action is
data in the artifact run here in numpy (the family's preprocessor named by student_spec.json,
split.json's glue) or graph (normalisation, resizing, un-normalisation).
"""
from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlacompile_runtime.artifact import (
    MANIFEST_JSON,
    STUDENT_SPEC_JSON,
    TARGET_JSON,
    check_file,
    read_json_object,
    read_runtime_manifest,
    read_student_spec,
)
from vlacompile_runtime.errors import ArtifactError, ObservationError
from vlacompile_runtime.observation import check_observation, from_lerobot
from vlacompile_runtime.processors import make_preprocessor
from vlacompile_runtime.spec import PolicySpec
from vlacompile_runtime.split import SPLIT_JSON, SplitProgram, read_split_manifest

GRAPHS = ("auto", "single", "split")


def feed_rows(feeds: dict[str, np.ndarray]) -> int:
    """The batch size of a feed dict (every input is batch first)."""
    return int(len(next(iter(feeds.values()))))


def in_static_batches(batch: int, feeds: dict[str, np.ndarray], fn: Callable[[dict[str, np.ndarray]], np.ndarray]) -> np.ndarray:
    """``fn`` over ``feeds`` in slices of a graph's static ``batch``, the last slice padded with its last row."""
    n = feed_rows(feeds)
    outs = []
    for i in range(0, n, batch):
        part = {k: v[i : i + batch] for k, v in feeds.items()}
        m = feed_rows(part)
        if m < batch:
            part = {k: np.concatenate([v, np.repeat(v[-1:], batch - m, axis=0)]) for k, v in part.items()}
        outs.append(fn(part)[:m])
    return np.concatenate(outs)


class SingleGraph:
    """The single graph on ONNX Runtime: model inputs (batch first) -> actions [B, chunk, action_dim].
    Graphs with a static batch (TensorRT-style profiles) run in slices of that batch."""

    def __init__(self, path: Path, provider: str, threads: int | None):
        from vlacompile_runtime.onnxrt import make_session

        self.session = make_session(path, provider, threads)
        self.input_names = [i.name for i in self.session.get_inputs()]
        shape = self.session.get_inputs()[0].shape
        self.static_batch = shape[0] if isinstance(shape[0], int) else None

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.session.run(None, {k: feeds[k] for k in self.input_names})[0]

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        if self.static_batch and len(next(iter(feeds.values()))) != self.static_batch:
            return in_static_batches(self.static_batch, feeds, self._run)
        return self._run(feeds)


class SplitGraphs:
    """System 2 once, System 1 K times, glued by split.json (``meta``), on ONNX Runtime."""

    def __init__(self, directory: Path, meta: dict[str, Any], provider: str, threads: int | None):
        from vlacompile_runtime.onnxrt import make_session

        self.meta = meta
        self.program = SplitProgram(meta)
        self.batch = int(meta["batch_size"])
        self.system2 = make_session(directory / meta["system2"]["onnx"], provider, threads)
        self.system1 = make_session(directory / meta["system1"]["onnx"], provider, threads)

    def _run(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return self.program.run(feeds, lambda f: self.system2.run(None, f), lambda f: self.system1.run(None, f))

    def __call__(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        return in_static_batches(self.batch, feeds, self._run)


class CompiledPolicy:
    """A loaded artifact. ``spec``: cameras and resolutions, state and action names, chunk size,
    flow steps (``PolicySpec``); ``control_hz`` and ``actions_per_chunk``: the target's control
    rate and how many actions of each chunk ``select_action`` executes before it re-plans."""

    def __init__(self, directory: Path, spec: PolicySpec, run: Callable[[dict[str, np.ndarray]], np.ndarray], *,
                 graph: str, provider: str, control_hz: float, actions_per_chunk: int, seed: int | None = None):
        self.directory, self.spec, self._run = directory, spec, run
        self.graph, self.provider = graph, provider
        self.control_hz, self.actions_per_chunk = float(control_hz), int(actions_per_chunk)
        self.preprocess = make_preprocessor(spec, directory / STUDENT_SPEC_JSON)
        self._rng = np.random.default_rng(seed)
        self._queue: deque[np.ndarray] = deque()

    def __repr__(self) -> str:
        cams = ", ".join(f"{c.name} {c.height}x{c.width}" for c in self.spec.cameras)
        return (f"CompiledPolicy({str(self.directory)!r}, {self.spec.family}, {self.graph} graph on {self.provider}; cameras {cams}; "
                f"state {self.spec.state_dim}, actions {self.spec.action_dim} x {self.spec.chunk_size}, executes "
                f"{self.actions_per_chunk} per chunk at {self.control_hz:g} Hz)")

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        """A robot's observation (LeRobot's keys, or vlacompile's layout) checked against the spec."""
        if not isinstance(observation, dict):
            raise ObservationError(f"the observation is a {type(observation).__name__}, not a dict", source="observation")
        return check_observation(from_lerobot(observation, self.spec), self.spec)

    def _noise(self, noise: np.ndarray | None) -> np.ndarray:
        shape = tuple(self.spec.noise_shape)
        if noise is None:
            return self._rng.standard_normal(shape, dtype=np.float32)
        arr = np.asarray(noise)
        if not np.issubdtype(arr.dtype, np.floating):
            raise ObservationError(f"noise has dtype {arr.dtype}", source="noise", hint=f"pass float32 noise of shape {shape}, or None")
        if arr.shape != shape:
            raise ObservationError(f"noise has shape {arr.shape}, the {self.spec.family} policy takes {shape}", source="noise",
                                   hint="pass noise of shape spec.noise_shape (chunk, padded action dim), or None")
        if not np.isfinite(arr).all():
            raise ObservationError("noise holds non-finite values", source="noise", hint="draw it from N(0, 1), or pass None")
        return arr.astype(np.float32)

    def predict_chunk(self, observation: dict[str, Any], noise: np.ndarray | None = None) -> np.ndarray:
        """One observation -> the action chunk float32 [chunk, action_dim] in physical units.
        ``noise``: the initial flow sample of shape ``spec.noise_shape`` (drawn from N(0, 1) when None)."""
        obs = self.observation(observation)
        feeds = self.preprocess(obs, self._noise(noise))
        return np.asarray(self._run(feeds)[0], dtype=np.float32)

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        """The next action float32 [action_dim]: the first ``actions_per_chunk`` actions of a chunk are
        executed in turn, then the next call plans a new chunk from its observation."""
        if not self._queue:
            chunk = self.predict_chunk(observation)
            self._queue.extend(chunk[: self.actions_per_chunk])
        return self._queue.popleft()

    def reset(self) -> None:
        """Forget the queued actions (call at the start of every episode)."""
        self._queue.clear()


def load(directory: str | Path, provider: str = "cpu", threads: int | None = None, *, graph: str = "auto",
         seed: int | None = None, check_hashes: bool = True) -> CompiledPolicy:
    """The policy in an artifact directory ``vlacompile build`` wrote.

    ``provider``: "cpu", "cuda" or "tensorrt" (ONNX Runtime's execution providers); ``threads``:
    intra-op threads (default: every core this process may use); ``graph``: "single" (the one
    graph), "split" (System 2 + K System 1 steps, split.json), or "auto" (the single graph when the
    artifact has one); ``seed``: of the noise drawn when ``predict_chunk`` gets none. Every file
    read is checked against manifest.json's sha256 (``check_hashes``)."""
    directory = Path(directory)
    if graph not in GRAPHS:
        raise ArtifactError(f"graph={graph!r}", source="graph", hint=f"pass one of {GRAPHS}")
    if not directory.is_dir():
        raise ArtifactError("is not a directory" if directory.exists() else "does not exist", source=directory,
                            hint="pass the directory `vlacompile build` wrote (e.g. build/x86-cpu)")
    manifest = read_runtime_manifest(directory)
    check = (lambda name: check_file(directory, name, manifest)) if check_hashes else (lambda name: directory / name)
    spec_path = check(STUDENT_SPEC_JSON)
    try:
        spec = PolicySpec.from_dict(read_student_spec(spec_path))
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(f"{STUDENT_SPEC_JSON} is not a policy spec ({e!r})", source=spec_path,
                            hint="rebuild the artifact: the file is truncated or was edited") from None
    onnx = manifest.get("onnx")
    has_split = (directory / SPLIT_JSON).is_file() or SPLIT_JSON in manifest["runtime_files"]
    if graph == "auto":
        graph = "single" if onnx else "split"
    if graph == "single":
        if not onnx:
            raise ArtifactError("names no single graph (onnx)", source=directory / MANIFEST_JSON,
                                hint="load it with graph=\"split\"" if has_split else "rebuild the artifact")
        paths = [onnx] + ([f"{onnx}.data"] if f"{onnx}.data" in manifest["runtime_files"] else [])
        for name in paths:
            check(name)
        run = SingleGraph(directory / onnx, provider, threads)
    else:
        if not has_split:
            raise ArtifactError("has no split.json: it holds no System 2 / System 1 graphs", source=directory,
                                hint="load the single graph (graph=\"single\"), or build with export.split = true")
        check(SPLIT_JSON)
        meta = read_split_manifest(directory)
        for part in ("system2", "system1"):
            name = meta[part]["onnx"]
            for n in [name] + ([f"{name}.data"] if f"{name}.data" in manifest["runtime_files"] else []):
                check(n)
        run = SplitGraphs(directory, meta, provider, threads)
    tok = spec.processor_settings.get("tokenizer_dir")  # resolved against the artifact when it is inside it
    if tok:
        for name in manifest["runtime_files"]:
            if (directory / name).parent == Path(tok):  # the tokenizer files the artifact carries
                check(name)
        if not (Path(tok) / "tokenizer.json").is_file():
            raise ArtifactError("the artifact has no tokenizer.json where student_spec.json says", source=Path(tok) / "tokenizer.json",
                                hint="copy the whole artifact directory `vlacompile build` wrote")
    control_hz, per_chunk = spec.control_hz, spec.chunk_size
    if (directory / TARGET_JSON).is_file():
        budget = read_json_object(directory / TARGET_JSON).get("budget") or {}
        control_hz = float(budget.get("control_hz", control_hz))
        per_chunk = min(int(budget.get("actions_per_chunk", per_chunk)), spec.chunk_size)
    return CompiledPolicy(directory, spec, run, graph=graph, provider=provider, control_hz=control_hz, actions_per_chunk=per_chunk,
                          seed=seed)
