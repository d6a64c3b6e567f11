"""The `vlacompile` command: a thin layer over the Python API (``vlacompile.build`` and friends)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vlacompile.errors import EXIT_INPUT_ERROR, VlaCompileError


def _fail(err: VlaCompileError) -> None:
    click.echo(f"error: {err.format()}", err=True)
    sys.exit(err.exit_code)


class _Main(click.Group):
    """The command group, with the safety net every verb shares: an input error raised anywhere
    (also outside a verb's own try) ends as `error: SOURCE: message` + `Hint:` and exit 2, and an
    operating-system error on a path (permission, a file where a directory belongs, a full disk)
    names that path instead of ending in a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except VlaCompileError as err:
            _fail(err)
        except OSError as err:
            where = err.filename if err.filename is not None else "file system"
            _fail(VlaCompileError(err.strerror or str(err), source=where,
                                  hint="check that path: it must exist and be readable (inputs) or writable, with free space (outputs)"))


def _camera_map(pairs: tuple[str, ...]) -> dict[str, str] | None:
    out = {}
    for pair in pairs:
        cam, sep, ds = pair.partition("=")
        if not sep or not cam.strip() or not ds.strip():
            raise click.BadParameter(f"{pair!r} is not POLICY_CAMERA=DATASET_CAMERA (e.g. wrist=observation.images.hand)",
                                     param_hint="--camera-map")
        out[cam.strip()] = ds.strip()
    return out or None


def _names(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vlacompile")
def main() -> None:
    """Compile a Vision-Language-Action policy for a robot's computer and verify it against its teacher.

    Exit codes: 0 all gates passed (measured); 1 a gate failed; 2 bad input (nothing was built, earlier
    output untouched); 3 built and accurate, but latency only estimated for a target that is not this
    machine (budget not verified).
    """


@main.command()
@click.option("--target", "-t", default="x86-cpu", show_default=True, help="Target profile name (see `vlacompile targets`) or path to a TOML file.")
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), help="Teacher checkpoint directory: vlacompile's own, or a policy saved by LeRobot (SmolVLA). Default: the shipped demo teacher.")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Local tokenizer directory for checkpoints that carry none (SmolVLA: the SmolVLM2 backbone directory). Default: the Hugging Face cache; never the network.")
@click.option("--allow-unnormalized", is_flag=True, help="Build a LeRobot checkpoint whose normaliser stats miss some of its features (LeRobot passes those through unnormalised).")
@click.option("--lerobot-version", help="SmolVLA: the lerobot release you run the policy with (0.4, 0.5, 0.6; e.g. 0.6.1), whose semantics the teacher follows. Default: what the checkpoint says (lerobot >= 0.6 writes pretrained_revision); where it says nothing and it matters, the build stops and asks.")
@click.option("--episodes", "-e", type=click.Path(path_type=Path), help="LeRobotDataset v3 episodes directory (image or video mode, or its Hugging Face cache folder). Default: the shipped demo episodes.")
@click.option("--camera-map", "camera_map", multiple=True, metavar="POLICY_CAM=DATASET_CAM",
              help="Feed a policy camera from a dataset camera of another name, e.g. wrist=observation.images.hand (repeatable).")
@click.option("--state-names", help="Comma-separated names of the dataset's observation.state dimensions the policy reads, in its order.")
@click.option("--action-names", help="Comma-separated names of the dataset's action dimensions the policy outputs, in its order.")
@click.option("--recipe", "-r", help="Recipe name or TOML path. Default: the target's default recipe.")
@click.option("--out", "-o", type=click.Path(path_type=Path), help="Output directory. Default: build/<target>.")
@click.option("--seed", type=int, help="Override the recipe's seed.")
@click.option("--calls", type=click.IntRange(min=20), default=200, show_default=True, help="get_action calls per latency measurement.")
@click.option("--allow-pickle", is_flag=True, help="Load pickle weights (.bin/.pt/.ckpt) with torch.load(weights_only=True). Only for checkpoints you trust.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="VLACOMPILE_CACHE", help="Stage cache directory (env VLACOMPILE_CACHE). Default: ~/.cache/vlacompile.")
@click.option("--no-cache", is_flag=True, help="Run every stage; neither read nor write the stage cache.")
@click.option("--no-closed-loop", is_flag=True, help="Skip the recipe's closed-loop evaluation in a simulator (the report then has none).")
@click.option("--baseline", type=click.Path(path_type=Path), help="An earlier build (directory or report.json): fail (exit 1) when a gate metric is worse beyond noise.")
@click.option("--junit", type=click.Path(path_type=Path), help="Also write the gates as JUnit XML to this file (one test case per gate).")
def build(target, checkpoint, tokenizer, allow_unnormalized, lerobot_version, episodes, camera_map, state_names, action_names, recipe, out, seed, calls, allow_pickle, quiet, cache_dir,
          no_cache, no_closed_loop, baseline, junit) -> None:
    """Distill, prune, quantise, export and verify a policy for TARGET; write build/<target>/."""
    from vlacompile.pipeline import build as run_build
    from vlacompile.report import summarize

    try:
        result = run_build(
            target,
            checkpoint=checkpoint,
            tokenizer=tokenizer,
            allow_unnormalized=allow_unnormalized,
            lerobot_version=lerobot_version,
            episodes=episodes,
            camera_map=_camera_map(camera_map),
            baseline=baseline,
            junit=junit,
            state_names=_names(state_names),
            action_names=_names(action_names),
            recipe=recipe,
            out=out,
            seed=seed,
            allow_pickle=allow_pickle,
            calls=calls,
            progress=not quiet,
            cache_dir=cache_dir,
            use_cache=not no_cache,
            closed_loop=not no_closed_loop,
        )
    except VlaCompileError as err:
        _fail(err)
    click.echo(summarize(result.report))
    click.echo(f"artifact: {result.out_dir}/ (report.json, report.md, report.html)")
    sys.exit(result.exit_code)


@main.command()
@click.option("--target", "-t", default="x86-cpu", show_default=True, help="Target profile (its default recipe, unless --recipe).")
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), help="Teacher checkpoint directory (as for build).")
@click.option("--tokenizer", type=click.Path(path_type=Path), help="Local tokenizer directory (as for build).")
@click.option("--lerobot-version", help="SmolVLA: the lerobot release that runs the policy (as for build).")
@click.option("--episodes", "-e", type=click.Path(path_type=Path), help="LeRobotDataset v3 episodes directory (as for build).")
@click.option("--recipe", "-r", help="Recipe name or TOML path.")
@click.option("--seed", type=int, help="Override the recipe's seed.")
@click.option("--allow-pickle", is_flag=True, help="Load pickle weights with torch.load(weights_only=True).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="VLACOMPILE_CACHE", help="Stage cache directory (env VLACOMPILE_CACHE).")
def distill(target, checkpoint, tokenizer, lerobot_version, episodes, recipe, seed, allow_pickle, quiet, cache_dir) -> None:
    """Run the recipe's stages up to distill into the stage cache, on one process or many.

    Under torchrun every process runs the same stages (the distillation shares its batches, and
    with distill.parallel = "fsdp" shards student and teacher); the first writes the cache. A
    `vlacompile build` with the same arguments then reuses the distilled student:

        torchrun --nproc_per_node 2 $(which vlacompile) distill --target jetson-thor -c my_pi0/ -e my_dataset/
        vlacompile build --target jetson-thor -c my_pi0/ -e my_dataset/
    """
    import os

    from vlacompile.pipeline import build as run_build

    try:
        result = run_build(target, checkpoint=checkpoint, tokenizer=tokenizer, lerobot_version=lerobot_version, episodes=episodes,
                           recipe=recipe, seed=seed,
                           allow_pickle=allow_pickle, progress=not quiet, cache_dir=cache_dir, stop_after="distill")
    except VlaCompileError as err:
        _fail(err)
    r = result.report
    if int(os.environ.get("RANK", "0")) == 0:
        st = r["stage"]
        click.echo(f"distill: cached under {r['cache_key'][:12]} ({st.get('processes', 1)} process(es), "
                   f"{st.get('parallel', 'none')}; final loss {st.get('final_loss')}); `vlacompile build` with the same "
                   "arguments reuses it")
    sys.exit(0)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--runtime", type=click.Choice(["ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt"]), default="ort-cpu", show_default=True,
              help="Runtime for the student: ONNX Runtime (CPU, CUDA or TensorRT execution provider) or the TensorRT plans of `vlacompile engine`.")
@click.option("--checkpoint", "-c", type=click.Path(path_type=Path), help="The teacher (default: the one recorded in manifest.json; checked by hash).")
@click.option("--episodes", "-e", type=click.Path(path_type=Path), help="The episodes (default: those recorded in report.json; checked by hash).")
@click.option("--calls", type=click.IntRange(min=20), default=200, show_default=True, help="get_action calls per latency measurement.")
@click.option("--lerobot-version", help="SmolVLA: the teacher's lerobot semantics (default: the build's, from manifest.json).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def verify(artifact, runtime, checkpoint, episodes, calls, lerobot_version, quiet) -> None:
    """Verify a built ARTIFACT again with RUNTIME. On the target's device (its GPU architecture),
    measurements replace the latency estimate; the reports are rewritten in place."""
    from vlacompile.pipeline import verify_artifact
    from vlacompile.report import summarize

    try:
        result = verify_artifact(artifact, runtime=runtime, checkpoint=checkpoint, episodes=episodes, calls=calls, progress=not quiet,
                                 lerobot_version=lerobot_version)
    except VlaCompileError as err:
        _fail(err)
    click.echo(summarize(result.report))
    sys.exit(result.exit_code)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def targets(as_json: bool) -> None:
    """List the target profiles with their budgets."""
    from vlacompile.targets import list_targets, load_target

    try:
        profiles = [load_target(name) for name in list_targets()]
    except VlaCompileError as err:
        _fail(err)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in profiles], indent=2))
        return
    header = f"{'target':<18} {'runtime':<12} {'precisions':<34} {'control':>8} {'n/chunk':>7} {'exec':>5} {'p99 limit':>10} {'NMSE tol':>8}"
    click.echo(header)
    click.echo("-" * len(header))
    for p in profiles:
        b = p.budget
        click.echo(
            f"{p.name:<18} {p.device.runtime:<12} {','.join(p.device.precisions):<34} {b.control_hz:>6g}Hz {b.actions_per_chunk:>7} "
            f"{b.execution:>5} {b.p99_latency_ms:>8g}ms {p.accuracy.max_nmse:>8g}"
        )
    click.echo("\nLatency is measured on targets whose hardware is this machine (x86-cpu); for the others it is estimated.")


@main.command()
@click.argument("args", nargs=-1, required=True, metavar="ARTIFACT | diff OLD NEW")
@click.option("--json", "as_json", is_flag=True, help="Print report.json (with diff: the diff as JSON).")
@click.option("--out", "diff_out", type=click.Path(path_type=Path), help="diff: also write the Markdown to this file (and PATH.json).")
def report(args: tuple[str, ...], as_json: bool, diff_out: Path | None) -> None:
    """Print the summary of a built ARTIFACT directory (exit code: the build's), or
    `report diff OLD NEW`: what changed between two builds, each change within or beyond its noise band
    (Markdown for a pull-request comment; exit 1 when a gate metric got worse beyond noise)."""
    if args[0] == "diff":
        if len(args) != 3:
            raise click.UsageError("usage: vlacompile report diff OLD NEW")
        return _report_diff(Path(args[1]), Path(args[2]), as_json, diff_out)
    if len(args) != 1:
        raise click.UsageError("usage: vlacompile report ARTIFACT  (or: vlacompile report diff OLD NEW)")
    artifact = Path(args[0])
    from vlacompile.pipeline import load_report
    from vlacompile.report import summarize

    try:
        data = load_report(artifact)
    except VlaCompileError as err:
        _fail(err)
    click.echo(json.dumps(data, indent=2) if as_json else summarize(data))
    code = data.get("exit_code", 0)
    sys.exit(code if isinstance(code, int) and code in (0, 1, 3) else 1)


def _report_diff(old: Path, new: Path, as_json: bool, out: Path | None) -> None:
    from vlacompile.report.diff import baseline_gates, diff_builds, render_diff_markdown

    try:
        diff = diff_builds(old, new, out=out)
    except VlaCompileError as err:
        _fail(err)
    text = json.dumps(diff, indent=2) if as_json else render_diff_markdown(diff)
    click.echo(text)
    sys.exit(1 if any(g["status"] == "fail" for g in baseline_gates(diff, str(old))) else 0)


@main.group()
def cache() -> None:
    """List or delete cached stage outputs (--cache-dir / VLACOMPILE_CACHE, default ~/.cache/vlacompile)."""


def _stage_cache(cache_dir: Path | None):
    from vlacompile.cache import StageCache, check_cache_root, default_cache_dir

    root = cache_dir if cache_dir is not None else default_cache_dir()
    check_cache_root(root, option="--cache-dir" if cache_dir is not None else "VLACOMPILE_CACHE / ~/.cache/vlacompile")
    return StageCache(root)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


@cache.command("ls")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="VLACOMPILE_CACHE", help="Cache directory.")
def cache_ls(cache_dir: Path | None) -> None:
    """List cache entries: key prefix, stage, size, time since last use."""
    import time

    store = _stage_cache(cache_dir)
    entries = store.entries()
    click.echo(f"{'key':<14} {'stage':<12} {'MB':>8} {'unused':>8}")
    now = time.time()
    for e in entries:
        click.echo(f"{e.key[:12]:<14} {e.stage:<12} {e.bytes / 2**20:>8.2f} {_age(now - e.last_used):>8}")
    click.echo(f"{len(entries)} entries, {sum(e.bytes for e in entries) / 2**20:.1f} MB in {store.root}")


@cache.command("prune")
@click.option("--cache-dir", type=click.Path(path_type=Path), envvar="VLACOMPILE_CACHE", help="Cache directory.")
@click.option("--all", "prune_all", is_flag=True, help="Delete every entry.")
@click.option("--older-than", type=click.FloatRange(min=0), help="Delete entries unused for more than DAYS days.", metavar="DAYS")
def cache_prune(cache_dir: Path | None, prune_all: bool, older_than: float | None) -> None:
    """Delete cache entries: --all, or those unused for --older-than DAYS."""
    if prune_all == (older_than is not None):
        click.echo("error: pass exactly one of --all or --older-than DAYS\nHint: `vlacompile cache prune --older-than 30`", err=True)
        sys.exit(EXIT_INPUT_ERROR)
    store = _stage_cache(cache_dir)
    removed = store.prune(older_than_s=None if prune_all else older_than * 86400)
    click.echo(f"deleted {len(removed)} entries, {sum(e.bytes for e in removed) / 2**20:.1f} MB from {store.root}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--workspace-mb", type=click.IntRange(min=64), default=4096, show_default=True, help="TensorRT builder workspace limit.")
@click.option("--timing-cache", type=click.Path(path_type=Path), help="Timing cache file: reused (never rewritten) when it exists, written otherwise.")
def engine(artifact: Path, workspace_mb: int, timing_cache: Path | None) -> None:
    """Build TensorRT plans for a built ARTIFACT's ONNX graphs, on this machine's GPU (writes *.plan and engine.json)."""
    from vlacompile.trt.engine import build_artifact_engines

    try:
        built = build_artifact_engines(artifact, workspace_mb=workspace_mb, timing_cache=timing_cache, log=lambda m: click.echo(m, err=True))
    except VlaCompileError as err:
        _fail(err)
    for name, entry in built.items():
        click.echo(f"{artifact / name}: {entry['precision']}, {entry['bytes'] / 2**20:.1f} MB, sha256 {entry['sha256'][:12]}")


if __name__ == "__main__":
    main()
