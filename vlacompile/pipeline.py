"""`vlacompile.build`: checkpoint -> stages -> ONNX -> verify -> report, written atomically.

Everything that can be wrong with the inputs (target, recipe, checkpoint, episodes, output path) is
checked before the first stage runs. The build writes into a temporary directory beside the output
and renames it into place only when it is complete, so a failed or killed build never leaves a
half-written artifact where a good one was.
"""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from vlacompile.cache import test_pause
from vlacompile.errors import (
    EXIT_GATE_FAILED,
    EXIT_OK,
    EXIT_UNVERIFIED,
    CheckpointError,
    ConfigError,
    EpisodeError,
    OutputError,
)
from vlacompile.artifact import REPORT_FILES, STUDENT_DIR, STUDENT_SPEC_JSON, read_student_spec, runtime_manifest, student_spec_dict
from vlacompile.resources import DEMO_EPISODES, DEMO_TEACHER

SCHEMA_VERSION = "1.0"
EXIT_CODES = {"passed": EXIT_OK, "failed": EXIT_GATE_FAILED, "unverified": EXIT_UNVERIFIED}


@dataclass
class BuildResult:
    out_dir: Path
    report: dict[str, Any]

    @property
    def status(self) -> str:
        return self.report["status"]

    @property
    def exit_code(self) -> int:
        return self.report["exit_code"]


def tool_versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for dist in ("vlacompile", "torch", "onnx", "onnxruntime", "nvidia-modelopt", "accelerate", "polygraphy", "numpy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def check_output_dir(out: Path, inputs=()) -> None:
    """Fail before any work if the output cannot be written (read-only path, a file in the way) or
    must not be (an input, inside one or holding one, the working directory: ``vlacompile.outputs``)."""
    from vlacompile.outputs import check_output_dir as check_paths

    check_paths(out, inputs=inputs)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output's parent directory ({e.strerror})", source=parent, hint="pass --out on a writable path") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError("is not writable", source=parent, hint="pass --out on a writable path")


@contextmanager
def output_lock(out: Path):
    """One build per output directory at a time: a second one refuses instead of interleaving."""
    lock_path = out.parent / f".{out.name}.lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(
                "another vlacompile build is writing this output directory",
                source=out,
                hint="wait for it to finish, or pass a different --out",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished build into place; the previous output survives until the new one is there."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError:
        if old.exists():
            os.rename(old, out)
        raise
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


def recover_output(out: Path, log: Callable[[str], None]) -> None:
    """Clean up after a build that was killed (SIGKILL, power loss) writing ``out``. Called under the
    output lock, so no live build owns these: a killed build's partial directory is deleted, and if
    it died between moving the old output aside and the new one in, the old output is put back."""
    olds = sorted(out.parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists():
        os.rename(olds[-1], out)
        log(f"restored {out} from an interrupted build")
    for p in [*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")]:
        shutil.rmtree(p, ignore_errors=True)


def episodes_format(es, selection: dict[str, Any]) -> dict[str, Any]:
    """What the report says about the dataset it read: how each camera is stored, and what was selected."""
    out: dict[str, Any] = {"format": "LeRobotDataset v3"}
    if es.camera_storage:
        out["cameras"] = {cam: {"feature": (es.camera_keys or {}).get(cam), "storage": es.camera_storage[cam],
                                "height": es.image_shapes[cam][0], "width": es.image_shapes[cam][1]}
                          for cam in es.camera_names}
    out.update({k: (dict(v) if isinstance(v, dict) else list(v)) for k, v in selection.items()})
    return out


def _decode_note(before) -> str:
    """', decoding N video frames in X s' for a stage that read video-mode episodes (else '')."""
    from vlacompile.data.video import decode_stats

    d = decode_stats().since(before)
    return f" ({d.describe()})" if d.frames else ""


def check_episodes_match(es, spec, source: Path) -> None:
    """The episodes must carry what the policy reads: its cameras at their resolutions, state and action dims."""
    cams = [c.name for c in spec.cameras]
    missing = [c for c in cams if c not in es.camera_names]
    if missing:
        raise EpisodeError(
            f"the policy reads cameras {cams} but the episodes have {list(es.camera_names)} (missing {missing})",
            source=source,
            hint="record the episodes with the policy's cameras (feature observation.images.<camera>), or map "
                 "dataset cameras to them: --camera-map POLICY_CAMERA=DATASET_CAMERA",
        )
    for cam in spec.cameras:
        have = tuple(es.image_shapes[cam.name])
        if have != (cam.height, cam.width):
            raise EpisodeError(
                f"camera {cam.name!r} has {have[0]}x{have[1]} images but the policy takes {cam.height}x{cam.width}",
                source=source,
                hint="resize the episodes' images to the policy's resolution, or map another camera to it (--camera-map)",
            )
    for name, have, need in (("observation.state", es.state_dim, spec.state_dim), ("action", es.action_dim, spec.action_dim)):
        if have != need:
            raise EpisodeError(
                f"{name} has {have} dimensions but the policy expects {need}",
                source=source,
                hint="use episodes recorded on the robot this policy was trained for",
            )


def _file_entries(root: Path, exclude: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    from vlacompile.checkpoint import sha256_file

    entries = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name not in exclude:
            entries.append({"path": p.relative_to(root).as_posix(), "sha256": sha256_file(p), "bytes": p.stat().st_size})
    return entries


def build(
    target: str | Path = "x86-cpu",
    *,
    checkpoint: str | Path | None = None,
    episodes: str | Path | None = None,
    recipe: str | Path | None = None,
    out: str | Path | None = None,
    seed: int | None = None,
    allow_pickle: bool = False,
    calls: int = 200,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    closed_loop: bool = True,
    tokenizer: str | Path | None = None,
    allow_unnormalized: bool = False,
    lerobot_version: str | None = None,
    camera_map: dict[str, str] | None = None,
    state_names: list[str] | None = None,
    action_names: list[str] | None = None,
    baseline: str | Path | None = None,
    junit: str | Path | None = None,
    stop_after: str | None = None,
) -> BuildResult:
    """Compile a VLA checkpoint for a target and verify it. See the README for the exit codes.

    ``closed_loop=False`` skips the recipe's closed-loop evaluation (the report then has none).
    ``tokenizer``: a local tokenizer directory for checkpoints that do not carry one (SmolVLA: the
    SmolVLM2 directory; default: the Hugging Face cache, never the network). ``allow_unnormalized``:
    build a LeRobot checkpoint whose normaliser stats miss some features (see ``load_policy``).
    ``lerobot_version``: for LeRobot SmolVLA checkpoints, the lerobot release that runs the policy
    ("0.4", "0.6.1", ...), whose semantics the teacher follows (see ``load_policy``).
    ``camera_map``: policy camera name -> the dataset camera that feeds it (``{"wrist": "observation.images.hand"}``).
    ``state_names`` / ``action_names``: the dataset's state / action dimensions the policy uses, by name, in its order.
    ``baseline``: an earlier build (its directory or report.json); a gate metric worse than it beyond
    noise fails the build (``vlacompile.report.diff``). ``junit``: also write the gates as JUnit XML there.
    ``stop_after``: run the recipe's stages up to this one, store them in the cache and stop (no
    artifact, no verify): ``vlacompile distill`` under torchrun, every process running the same
    stages, the first one writing the cache, so a later build reuses the distilled student.

    Stage outputs are cached under ``cache_dir`` (default ``$VLACOMPILE_CACHE`` or
    ``~/.cache/vlacompile``; see ``vlacompile.cache``) unless ``use_cache`` is False.
    """
    from vlacompile.recipes import check_recipe, check_recipe_teacher, load_recipe
    from vlacompile.targets import load_target

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t_start = time.perf_counter()

    # 1. Everything the user gave is checked before any work.
    tgt = load_target(target)
    rcp = load_recipe(recipe or tgt.default_recipe)
    check_recipe(rcp, tgt)
    if not closed_loop and rcp.closed_loop is not None:
        log(f"vlacompile: closed-loop evaluation in {rcp.closed_loop.suite} skipped (--no-closed-loop)")
        rcp = replace(rcp, closed_loop=None)
    skipped_closed_loop = None
    out_dir = Path(out) if out is not None else Path("build") / tgt.name
    ckpt = (Path(checkpoint) if checkpoint is not None else DEMO_TEACHER).absolute()
    ep_dir = (Path(episodes) if episodes is not None else DEMO_EPISODES).absolute()
    # Every path written is checked against every input before anything is read: a build replaces
    # its output directory as a whole, so an --out over an input would delete it.
    inputs = [("teacher checkpoint", ckpt), ("tokenizer", tokenizer), ("episodes directory", ep_dir), ("baseline", baseline),
              ("recipe", rcp.path or None), ("target profile", tgt.path or None)]
    _check_build_paths(out_dir if stop_after is None else None, junit, cache_dir if use_cache else None, inputs)
    baseline_report = load_report(baseline, for_baseline=True) if baseline is not None else None

    from vlacompile.checkpoint import load_policy
    from vlacompile.data import read_episodes, split_episodes

    teacher = load_policy(ckpt, allow_pickle=allow_pickle, tokenizer=tokenizer, allow_unnormalized=allow_unnormalized,
                          lerobot_version=lerobot_version)
    check_recipe_teacher(rcp, teacher)
    if tgt.budget.actions_per_chunk > teacher.spec.chunk_size:
        raise ConfigError(
            f"budget.actions_per_chunk={tgt.budget.actions_per_chunk} exceeds the policy's chunk size {teacher.spec.chunk_size}: "
            "no chunk can supply that many actions",
            source=tgt.path,
            hint="lower actions_per_chunk in the target profile or use a policy with longer chunks",
        )
    selection = {k: v for k, v in (("camera_map", camera_map), ("state_names", state_names), ("action_names", action_names)) if v}
    es = read_episodes(ep_dir, **selection)
    check_episodes_match(es, teacher.spec, ep_dir)
    if rcp.closed_loop is not None and rcp.closed_loop.families and teacher.family not in rcp.closed_loop.families:
        skipped_closed_loop = (f"closed loop in {rcp.closed_loop.suite} skipped: {rcp.path or rcp.name} [closed_loop] is for "
                               f"{list(rcp.closed_loop.families)} teachers, this one is {teacher.family}")
        log(f"vlacompile: {skipped_closed_loop}")
        rcp = replace(rcp, closed_loop=None)
    if rcp.closed_loop is not None:
        _check_closed_loop(rcp, teacher.spec)
    run_seed = rcp.seed if seed is None else seed
    train, calib, held_out = split_episodes(es, seed=run_seed)
    inputs = _build_inputs(teacher, ckpt, ep_dir, run_seed, selection)
    cache = _open_cache(cache_dir, use_cache, log)
    log(
        f"vlacompile: target {tgt.name}, recipe {rcp.name}, teacher {ckpt} "
        f"({_family_label(teacher)}, {teacher.num_parameters() / 1e6:.2f}M params, {teacher.spec.flow_steps} flow steps), "
        f"episodes {ep_dir} ({len(train.episodes)} train / {len(calib.episodes)} calibration / {len(held_out.episodes)} held-out)"
    )

    if stop_after is not None:
        return _run_stages_only(tgt, rcp, teacher, train, calib, held_out, run_seed, calls, progress, log, inputs, cache, stop_after)

    # 2. Stages run in a temporary directory beside the output.
    with output_lock(out_dir):
        recover_output(out_dir, log)
        tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            report = _run_build(tgt, rcp, teacher, train, calib, held_out, tmp, run_seed, calls, progress, log, inputs, cache)
            report["teacher"].update({"checkpoint": str(ckpt)})
            if skipped_closed_loop:
                report["notes"].append(skipped_closed_loop)
            report["episodes"] = {"path": str(ep_dir), "train": len(train.episodes), "calibration": len(calib.episodes), "held_out": len(held_out.episodes),
                                  **episodes_format(es, selection)}
            report["seconds"] = round(time.perf_counter() - t_start, 1)
            if baseline_report is not None:
                _judge_against_baseline(report, baseline_report, Path(baseline), log)
            from vlacompile.report import write_reports

            report["artifact"] = {"dir": str(out_dir), "files": _file_entries(tmp, exclude=REPORT_FILES)}
            write_reports(report, tmp)
            test_pause("report")
            replace_dir(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    if junit is not None:
        from vlacompile.report.junit import write_junit

        write_junit(report, junit)
    return BuildResult(out_dir=out_dir, report=report)


def _check_build_paths(out_dir: Path | None, junit, cache_dir, inputs: list) -> None:
    """The build's outputs (its directory, the JUnit file, the stage cache) against its inputs, before any work."""
    from vlacompile.outputs import check_cache_dir, check_output_file

    if out_dir is not None:  # nor over the stage cache, which replacing the output would delete
        check_output_dir(out_dir, [*inputs, ("stage cache", cache_dir)])
    if junit is not None:
        check_output_file(junit, inputs=inputs, option="--junit", example="gates.xml")
        if out_dir is not None and Path(junit).expanduser().resolve() == out_dir.expanduser().resolve():
            raise OutputError("is the output directory", source=junit, hint="pass --junit with a file path, e.g. gates.xml")
    if cache_dir is not None:
        check_cache_dir(cache_dir, inputs=inputs)


def load_report(path: str | Path, *, for_baseline: bool = False) -> dict[str, Any]:
    """A build's report.json, from its directory or the file itself, with every section a summary
    reads; a clear error otherwise. ``for_baseline``: what the baseline gates compare (a baseline
    that gates nothing would pass every build)."""
    from vlacompile.artifact import COMPARE_REPORT_KEYS, SUMMARY_REPORT_KEYS, read_report

    return read_report(path, COMPARE_REPORT_KEYS if for_baseline else SUMMARY_REPORT_KEYS)


def _judge_against_baseline(report: dict[str, Any], baseline: dict[str, Any], source: Path, log) -> None:
    """Add one gate per gate metric against the baseline build; a regression beyond noise fails the build."""
    from vlacompile.report.diff import baseline_gates, diff_reports
    from vlacompile.verify.gates import verdict

    diff = diff_reports(baseline, report)
    gates = baseline_gates(diff, f"against the baseline {source}")
    report["baseline"] = {"path": str(source), "beyond_noise": diff["beyond_noise"], "gates": [g["name"] for g in gates]}
    merged = verdict(report["gates"]["gates"] + gates)
    status = merged["status"]
    report.update({"gates": merged, "status": status, "passed": merged["passed"]})
    if status in EXIT_CODES:
        report["exit_code"] = EXIT_CODES[status]
    worse = [g for g in gates if g["status"] == "fail"]
    log(f"baseline: {len(gates)} gate metrics against {source}: "
        + ("; ".join(f"{g['name']} {g['note']}" for g in worse) if worse else "no regression beyond noise"))


def _family_label(policy) -> str:
    from vlacompile.families import get_family

    info = get_family(policy.family).format_info(policy)
    return f"{info['label']}, {info['format']}"


def _check_closed_loop(rcp, spec) -> None:
    """Before any work: the recipe's suite is installed and fits the teacher."""
    from vlacompile.errors import VlaCompileError
    from vlacompile.sim import suite_for
    from vlacompile.sim.rollout import check_compatible

    cfg = rcp.closed_loop
    where = f"{rcp.path or rcp.name} [closed_loop]"
    try:
        suite = suite_for(cfg.suite, spec)
        check_compatible(spec, suite, list(cfg.tasks) or None)
    except VlaCompileError as err:
        raise type(err)(
            err.message, source=where, hint=f"{err.hint + '; or ' if err.hint else ''}build with --no-closed-loop to skip the simulator"
        ) from err
    except (TypeError, ValueError) as err:  # the suite rejected the teacher's cameras or image size
        raise ConfigError(f"suite {cfg.suite!r} cannot run this teacher: {err}", source=where,
                          hint="choose the suite the teacher was trained in, or build with --no-closed-loop") from err


def _build_inputs(teacher, ckpt: Path, ep_dir: Path, seed: int, selection: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the build's result depends on besides the recipe and target: hashes for the manifest
    and the root of the cache keys."""
    from vlacompile.cache import episodes_hash

    config = ckpt / "config.json"
    # Besides its weights, what decides the teacher's function: config.json, and for LeRobot
    # checkpoints the processor pipelines, their normaliser stats and the tokenizer.
    definition = teacher.meta.get("definition_sha256", "").encode()
    return {
        "teacher_weights_sha256": teacher.meta.get("weights_sha256"),
        "teacher_config": (config.read_bytes() if config.is_file() else b"") + definition,
        "episodes_sha256": episodes_hash(ep_dir),
        "seed": seed,
        **({"episodes_selection": json.dumps(selection, sort_keys=True)} if selection else {}),
    }


def _open_cache(cache_dir: str | Path | None, use_cache: bool, log):
    """The stage cache, or None (disabled, or its directory cannot be written: the build goes on)."""
    if not use_cache:
        return None
    from vlacompile.cache import StageCache, default_cache_dir

    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log(f"cache: {root} cannot be created ({e.strerror}); building without the cache")
        return None
    if not os.access(root, os.W_OK | os.X_OK):
        log(f"cache: {root} is not writable; building without the cache")
        return None
    return StageCache(root)


def _reuse_from_cache(cache, keys: list[str], produces: list[str], tmp: Path):
    """The latest cached stage output whose chain can be restored: (index after it, artifact).

    The ONNX files of earlier cached stages are copied into ``tmp`` too, so the output directory
    holds the same files as after a build that ran every stage."""
    for j in range(len(keys) - 1, -1, -1):
        if not cache.has(keys[j]):
            continue
        earlier = [m for m in range(j) if produces[m] == "onnx"]
        if not all(cache.is_onnx(keys[m]) for m in earlier):
            continue
        if not all(cache.restore_onnx(keys[m], tmp) for m in earlier):
            continue
        artifact = cache.load(keys[j], tmp)
        if artifact is not None:
            return j + 1, artifact
    return 0, None


class _Stopped(Exception):
    def __init__(self, stage: str, key: str, record: dict):
        super().__init__(stage)
        self.stage, self.key, self.record = stage, key, record


def _run_stages_only(tgt, rcp, teacher, train, calib, held_out, seed, calls, progress, log, inputs, cache, stop_after: str) -> BuildResult:
    """The stages up to ``stop_after`` into the cache, in a private temporary directory (each process
    of a torchrun run its own); nothing is written to the output directory."""
    import tempfile

    names = [s.name for s in rcp.stages]
    if stop_after not in names:
        raise ConfigError(f"the recipe has no {stop_after!r} stage (it has {names})", source=f"recipe {rcp.name}")
    rank = int(os.environ.get("RANK", "0"))
    if cache is not None and rank != 0:
        cache.read_only = True
    elif cache is None:
        log("vlacompile: the stage cache is off, so what these stages compute is not kept for a later build")
    with tempfile.TemporaryDirectory(prefix="vlacompile-stages-") as tmp:
        try:
            _run_build(tgt, rcp, teacher, train, calib, held_out, Path(tmp), seed, calls, progress, log, inputs, cache,
                       stop_after=stop_after)
        except _Stopped as done:
            report = {"status": "STAGES_DONE", "exit_code": 0, "passed": True, "stopped_after": done.stage,
                      "cache_key": done.key, "stage": done.record, "rank": rank}
            return BuildResult(out_dir=Path(tmp), report=report)
    raise AssertionError("unreachable: the stage loop stops at stop_after")


def _run_build(tgt, rcp, teacher, train, calib, held_out, tmp: Path, seed: int, calls: int, progress: bool, log, inputs: dict[str, Any], cache,
               stop_after: str | None = None) -> dict:
    import copy

    import torch

    from vlacompile.cache import key_versions, root_key, stage_keys
    from vlacompile.checkpoint import save_policy
    from vlacompile.stages import STAGES, Artifact, BuildContext
    from vlacompile.verify import verify

    ctx = BuildContext(target=tgt, workdir=tmp, teacher=teacher, train=train, calibration=calib, seed=seed, progress=progress, log=log,
                       cache=cache)
    # A selection from the episodes (camera map, state/action names) is part of what the stages read.
    episodes_key = inputs["episodes_sha256"] + (f":{inputs['episodes_selection']}" if inputs.get("episodes_selection") else "")
    root = root_key(inputs["teacher_weights_sha256"] or "", inputs["teacher_config"], episodes_key, seed)
    keys = stage_keys(root, rcp.stages, tgt, key_versions())
    produces = [STAGES[s.name].load().kinds(s.params, tgt)[1] for s in rcp.stages]
    n = len(rcp.stages)

    artifact = Artifact(policy=teacher)
    start = 0
    canonical: list[dict] = []  # the records as the stages wrote them: what the cache stores
    if cache is not None:
        t0 = time.perf_counter()
        start, cached = _reuse_from_cache(cache, keys, produces, tmp)
        if cached is not None:
            canonical = copy.deepcopy(cached.records)
            for rec in cached.records:
                rec.update(reused=True, original_seconds=rec.get("seconds"), seconds=0.0)
            cached.records[-1]["seconds"] = round(time.perf_counter() - t0, 2)
            artifact = cached
            log(f"cache: reusing {', '.join(s.name for s in rcp.stages[:start])} from {cache.root} (key {keys[start - 1][:12]})")
    stop = None if stop_after is None else [s.name for s in rcp.stages].index(stop_after)
    last = n if stop is None else stop + 1
    for i in range(start, last):
        stage = rcp.stages[i]
        test_pause(f"stage:{stage.name}")
        log(f"[{i + 1}/{n}] {stage.name} ...")
        t0 = time.perf_counter()
        from vlacompile.data.video import decode_stats

        decoded = decode_stats()
        # Seeded per stage, so a stage resumed after cached ones sees the RNG a full build gives it.
        torch.manual_seed(seed)
        artifact = STAGES[stage.name].load().run(artifact, stage.params, ctx)
        log(f"[{i + 1}/{n}] {stage.name} done in {time.perf_counter() - t0:.1f} s" + _decode_note(decoded))
        canonical.append(copy.deepcopy(artifact.records[-1]))
        artifact.records[-1]["reused"] = False
        if cache is not None:
            try:
                stored = replace(artifact, records=canonical)
                if not cache.put(keys[i], stage.name, stored):
                    log(f"cache: {stage.name} output is a modelopt fake-quant torch model; not cached (the export after it is)")
            except OSError as e:
                log(f"cache: cannot write {cache.root} ({e.strerror}); building on without the cache")
                cache = None
        if i == stop:
            raise _Stopped(stage.name, keys[i], canonical[-1])
    if stop is not None:  # every stage up to it came from the cache
        raise _Stopped(stop_after, keys[stop], canonical[stop])

    student = artifact.policy
    save_notes: list[str] = []
    if not artifact.quantized_torch:
        save_policy(student, tmp / STUDENT_DIR)
        save_notes = _student_save_notes(student, log)
    # What the compiled graphs read and write, for verify on the device and for runtimes.
    (tmp / STUDENT_SPEC_JSON).write_text(json.dumps(student_spec_dict(student.spec, tmp), indent=2, sort_keys=True) + "\n")
    (tmp / "target.json").write_text(json.dumps(tgt.to_dict(), indent=2, sort_keys=True) + "\n")
    (tmp / "recipe.json").write_text(json.dumps(rcp.to_dict(), indent=2, sort_keys=True) + "\n")

    log(f"verify: teacher vs compiled student on {len(held_out.episodes)} held-out episodes ...")
    from vlacompile.data.video import decode_stats

    decoded = decode_stats()
    result = verify(
        teacher,
        artifact.onnx_path,
        held_out,
        tgt,
        student_policy=student,
        student_precision=artifact.precision,
        calls=calls,
        seed=seed,
        progress=progress,
        log=log,
        cache=cache,
        flow_trained=_flow_trained(artifact.records),
    )
    if _decode_note(decoded):
        log("verify: held-out episodes" + _decode_note(decoded))
    extra_gates, readiness = _post_verify_checks(tgt, rcp, teacher, student, artifact, result, tmp, calls, progress, log, held_out,
                                                 cache)
    if extra_gates:
        from vlacompile.verify.gates import verdict

        result["gates"] = verdict(result["gates"]["gates"] + extra_gates)
        result["status"], result["passed"] = result["gates"]["status"], result["gates"]["passed"]
    status = result["status"]
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "target": tgt.name,
        "recipe": rcp.to_dict(),
        "seed": seed,
        "inputs": {
            "teacher_weights_sha256": teacher.meta.get("weights_sha256"),
            "teacher": teacher.meta.get("source"),
            **({"tokenizer": teacher.meta["tokenizer"]} if teacher.meta.get("tokenizer") else {}),
            **({"allow_unnormalized": True} if teacher.meta.get("allow_unnormalized") else {}),
            **({"lerobot_version": teacher.meta["lerobot_version"]} if teacher.meta.get("lerobot_version") else {}),
            "episodes_sha256": inputs["episodes_sha256"],
        },
        "cache_keys": [{"stage": s.name, "key": k} for s, k in zip(rcp.stages, keys)],
        "onnx": artifact.onnx_path.name,
        "precision": artifact.precision,
        "runtime": tgt.device.runtime,
        "engine": None
        if tgt.runs_on_host
        else f"not built: TensorRT plans are built on a {tgt.device.name}; run `vlacompile engine` there",
        "tool_versions": tool_versions(),
        "tensorrt_readiness": readiness,
        # What vlacompile-runtime checks when it loads the artifact: the format, the graph, the files' sha256.
        **runtime_manifest(tmp, artifact.onnx_path.name),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    notes = []
    if not tgt.runs_on_host:
        notes.append(
            f"Latency for {tgt.name} is ESTIMATED from its data-sheet figures (roofline lower bound); the budget is "
            f"NOT VERIFIED. The bound counts weight traffic and arithmetic only: kernel launches and "
            f"pre-processing come on top, and dominate for small models. Build the engine on the device "
            "(`vlacompile engine <artifact dir>`) to measure it."
        )
    from vlacompile import __version__

    return {
        "schema_version": SCHEMA_VERSION,
        "vlacompile_version": __version__,
        "target": tgt.name,
        "recipe": rcp.name,
        "status": status,
        "passed": status == "passed",
        "exit_code": EXIT_CODES[status],
        "seed": seed,
        "teacher": {
            "family": teacher.family,
            **{k: v for k, v in _format_info(teacher).items() if k != "family"},
            "params": teacher.num_parameters(),
            "flow_steps": teacher.spec.flow_steps,
            "weights_sha256": teacher.meta.get("weights_sha256"),
        },
        "student": {
            "family": student.family,
            "params": student.num_parameters(),
            "flow_steps": student.spec.flow_steps,
            "precision": artifact.precision,
            "onnx": artifact.onnx_path.name,
            "config": student.config.to_dict(),
            **{k: v for k, v in _format_info(student).items() if k in ("format", "lerobot_version", "lerobot_semantics")},
        },
        **{k: v for k, v in result.items() if k not in ("status", "passed")},
        "stages": artifact.records,
        "tensorrt_readiness": readiness,
        "cache": {
            "dir": str(cache.root) if cache is not None else None,
            "keys": [{"stage": s.name, "key": k, "reused": i < start} for i, (s, k) in enumerate(zip(rcp.stages, keys))],
        },
        "tool_versions": manifest["tool_versions"],
        "notes": notes + save_notes + result.get("notes", []),
    }


def _student_save_notes(student, log) -> list[str]:
    """What the student's checkpoint cannot say in its family's own (e.g. lerobot's) files: logged
    as warnings and put in the report's notes."""
    from vlacompile.families import get_family

    gaps = getattr(get_family(student.family), "lerobot_gaps", None)
    notes = []
    for gap in (gaps(student) if gaps is not None else []):
        notes.append(f"student/: lerobot cannot load this student as it is: {gap} (vlacompile loads it; vlacompile.json has "
                     "the per-layer sizes)")
        log(f"warning: {notes[-1]}")
    return notes


def _flow_trained(records) -> bool:
    """Whether a stage trained the student by flow matching on the teacher's chunks (its own head)."""
    return any(isinstance(r, dict) and r.get("objective") == "flow" for r in records or [])


def _format_info(policy) -> dict[str, Any]:
    from vlacompile.families import get_family

    return get_family(policy.family).format_info(policy)


def _post_verify_checks(tgt, rcp, teacher, student, artifact, result: dict, tmp: Path, calls: int, progress: bool, log,
                        held_out=None, cache=None):
    """Checks beside the accuracy/latency gates: closed-loop success (when the recipe configures a
    simulator), TensorRT readiness of every graph (TensorRT targets), per-part latency (split graphs).
    Adds sections to ``result`` and returns (extra gates, readiness report)."""
    gates: list[dict] = []
    if rcp.closed_loop is not None:
        from vlacompile.verify.closed_loop import closed_loop

        section, gate = closed_loop(teacher, artifact.onnx_path, student.spec, tgt, rcp.closed_loop, progress=progress, log=log,
                                    cache=cache)
        if section.get("reused"):
            result["notes"].append("the closed-loop rollouts were reused from the stage cache (same teacher, student graph, "
                                   "suite, seeds and episodes); latency was measured again")
        elif section.get("reused_runs"):
            result["notes"].append("the teacher's closed-loop rollouts were reused from the stage cache (same teacher, suite, "
                                   "seeds and episodes); the student's were run")
        result["closed_loop"] = section
        gates.append(gate)

    from vlacompile.artifact import SPLIT_JSON, read_split_manifest
    from vlacompile.stages.export import unsupported_domains

    has_split = (tmp / SPLIT_JSON).is_file()
    split_graphs = [tmp / read_split_manifest(tmp)[p]["onnx"] for p in ("system2", "system1")] if has_split else []
    if has_split and any(unsupported_domains(g) for g in split_graphs):
        result["notes"].append("per-part latency not measured here: the split graphs use TensorRT-only ops")
    elif has_split:
        from vlacompile.backends.split import time_parts
        from vlacompile.quantizers import sample_inputs

        batch = int(read_split_manifest(tmp)["batch_size"])
        feeds = sample_inputs(student.spec, held_out, batch, seed=0) if held_out is not None else None
        parts = time_parts(tmp, calls=calls, feeds=feeds)  # labelled measured on this host by time_parts itself
        result["latency"]["parts"] = {**parts, "note": "System 2 and one System 1 step timed alone with ONNX Runtime on this host"}

    readiness = None
    if tgt.device.runtime == "tensorrt":
        from vlacompile.trt.readiness import readiness_report

        graphs = [artifact.onnx_path, *split_graphs]
        readiness = {p.name: readiness_report(p, tgt) for p in graphs}
        problems = [f"{name}: {pr['message']} ({', '.join(pr['nodes'][:5])})" for name, rep in readiness.items() for pr in rep["problems"]]
        log(f"tensorrt readiness ({tgt.device.tensorrt}): " + ("ready" if not problems else f"{len(problems)} problem(s)"))
        gates.append({
            "name": "tensorrt_readiness", "value": len(problems), "limit": 0, "comparison": "<=", "unit": " problems",
            "status": "fail" if problems else "pass", "kind": "measured",
            "source": f"static check of {len(graphs)} graph(s) against TensorRT {tgt.device.tensorrt}",
            **({"note": "; ".join(problems)} if problems else {}),
        })
    return gates, readiness


RUNTIMES = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")


def _student_runner_for(runtime: str, out_dir: Path, onnx_path: Path, spec, tgt, log) -> tuple[Any, str | None]:
    """(runner, device label if this run measures the target's hardware, else None). For ort-cpu the
    runner is None: verify picks it, falling back to the torch student for TensorRT-only graphs."""
    from vlacompile.backends.onnxrt import OrtRunner

    if runtime == "ort-cpu":
        return None, None
    if runtime == "tensorrt":
        from vlacompile.backends.tensorrt import TrtRunner
        from vlacompile.trt.engine import device_info

        device = device_info()  # first: on a machine without TensorRT, that is what the user must hear
        plan = out_dir / "student.plan"
        if not plan.is_file():
            raise OutputError("no student.plan", source=out_dir, hint=f"build the plans on this device first: vlacompile engine {out_dir}")
        runner = TrtRunner(plan, spec)
    else:
        provider = runtime.removeprefix("ort-")
        runner = OrtRunner(onnx_path, spec, provider=provider)
        import torch  # the CUDA device ONNX Runtime runs on, for the label and the architecture check

        props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
        device = {"gpu": props.name, "compute_capability": f"{props.major}.{props.minor}"} if props else {"gpu": "CUDA GPU", "compute_capability": None}
    label = f"{device['gpu']} (sm {device['compute_capability']}, {runner.name})"
    want = tgt.device.compute_capability
    if want and device.get("compute_capability") != want:
        # A measurement on another GPU does not stand for the target's.
        log(f"verify: {label} is not {tgt.device.name} (compute capability {want}): latency stays estimated")
        return runner, None
    return runner, label


def verify_artifact(
    out_dir: str | Path,
    *,
    runtime: str = "ort-cpu",
    checkpoint: str | Path | None = None,
    episodes: str | Path | None = None,
    calls: int = 200,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    lerobot_version: str | None = None,
) -> BuildResult:
    """Verify a built artifact again with ``runtime``; on the target's device this replaces the latency
    estimate with measurements. The teacher and episodes must be the ones the artifact was built from
    (checked by hash); the reports are rewritten in place, atomically. ``lerobot_version``: the
    SmolVLA teacher's lerobot semantics (default: those the build recorded in manifest.json)."""
    import dataclasses

    from vlacompile.cache import episodes_hash
    from vlacompile.checkpoint import load_policy
    from vlacompile.data import read_episodes, split_episodes
    from vlacompile.report import write_reports
    from vlacompile.targets import parse_target
    from vlacompile.verify import verify
    from vlacompile.verify.gates import verdict

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    from vlacompile.artifact import TARGET_JSON, VERIFY_REPORT_KEYS, read_json_object, read_manifest, read_report
    from vlacompile.errors import ArtifactError
    from vlacompile.outputs import check_output_dir as check_paths

    if runtime not in RUNTIMES:
        raise OutputError(f"unknown runtime {runtime!r}", source="--runtime", hint=f"choose one of {', '.join(RUNTIMES)}")
    if not Path(out_dir).is_dir():
        raise ArtifactError("is not a directory" if Path(out_dir).exists() else "no such artifact directory", source=out_dir,
                            hint="pass the output directory of `vlacompile build`")
    # Resolved: `verify .` inside the artifact writes its temporary files and lock beside it, not in it.
    out = Path(out_dir).resolve()
    manifest = read_manifest(out)
    report = read_report(out, VERIFY_REPORT_KEYS)
    tgt = parse_target({k: v for k, v in read_json_object(out / TARGET_JSON).items() if k != "path"}, out / TARGET_JSON)
    ckpt = Path(checkpoint) if checkpoint is not None else Path(manifest["inputs"]["teacher"])
    ep_dir = Path(episodes) if episodes is not None else Path(report["episodes"]["path"])
    # verify rewrites the reports inside the artifact: it must not be (or lie inside) the teacher or the episodes.
    check_paths(out, inputs=[("teacher checkpoint", ckpt), ("episodes directory", ep_dir)], option="ARTIFACT", replaced=False,
                hint="verify rewrites the artifact's reports: pass --checkpoint and --episodes with the teacher and episodes "
                     "the artifact was built from, in directories of their own")
    onnx_path = out / str(report["student"]["onnx"])
    if not onnx_path.is_file():
        raise ArtifactError(f"report.json names the student graph {onnx_path.name}, which is missing", source=out,
                            hint="the artifact is incomplete: rebuild it with `vlacompile build`")

    teacher = load_policy(ckpt, tokenizer=manifest["inputs"].get("tokenizer"), allow_unnormalized=bool(manifest["inputs"].get("allow_unnormalized")),
                          lerobot_version=lerobot_version or manifest["inputs"].get("lerobot_version"))
    if teacher.meta["weights_sha256"] != manifest["inputs"]["teacher_weights_sha256"]:
        raise CheckpointError(
            "is not the teacher this artifact was built from (weights sha256 differs)",
            source=ckpt,
            hint=f"pass --checkpoint with the teacher whose model.safetensors has sha256 {manifest['inputs']['teacher_weights_sha256'][:16]}...",
        )
    if episodes_hash(ep_dir) != manifest["inputs"]["episodes_sha256"]:
        raise EpisodeError(
            "are not the episodes this artifact was built from (content hash differs)",
            source=ep_dir,
            hint="pass --episodes with the dataset used for the build: its held-out split is what verify runs on",
        )
    recorded = report.get("episodes", {})
    selection = {k: recorded[k] for k in ("camera_map", "state_names", "action_names") if recorded.get(k)}
    _, _, held_out = split_episodes(read_episodes(ep_dir, **selection), seed=manifest["seed"])
    spec_path = out / STUDENT_SPEC_JSON
    if spec_path.is_file():
        from vlacompile.policy import PolicySpec

        try:
            spec = PolicySpec.from_dict(read_student_spec(spec_path))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{STUDENT_SPEC_JSON} is not a policy spec ({e!r})", source=spec_path,
                                hint="the file was edited or truncated: rebuild the artifact") from None
    else:  # artifacts built before student_spec.json: the teacher's spec with the student's flow steps
        spec = dataclasses.replace(teacher.spec, flow_steps=report["student"]["flow_steps"], head=None)
    student_dir = out / STUDENT_DIR
    student = load_policy(student_dir) if student_dir.is_dir() else None
    runner, device = _student_runner_for(runtime, out, onnx_path, spec, tgt, log)

    with output_lock(out):
        result = verify(
            teacher, onnx_path, held_out, tgt, student_policy=student,
            student_precision=report["student"]["precision"], calls=calls, seed=manifest["seed"],
            progress=progress, log=log, student_runner=runner, on_device=device,
            flow_trained=_flow_trained(report.get("stages")),
        )
        # Gates from the build that verify does not recompute (static readiness, closed loop) still count.
        kept = [g for g in report["gates"]["gates"] if g["name"] in ("tensorrt_readiness", "closed_loop_success_drop")]
        gates = verdict(result["gates"]["gates"] + kept)
        report.update({k: v for k, v in result.items() if k not in ("status", "passed", "gates")})
        report.update({"gates": gates, "status": gates["status"], "passed": gates["passed"], "exit_code": EXIT_CODES[gates["status"]]})
        report["verified_with"] = {"runtime": runtime, "device": device, "on_target": device is not None}
        tmp = out.parent / f".{out.name}.report-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            write_reports(report, tmp)
            for name in REPORT_FILES:
                os.replace(tmp / name, out / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return BuildResult(out_dir=out, report=report)
