"""The full-size SmolVLA through vlacompile: build for x86-cpu and for Jetson Thor, then the teacher
(torch eager) against the compiled student (ONNX Runtime) per chunk, interleaved in one run.

    /work/side/venv/bin/python bench/make_full_smolvla.py /work/bench-assets/smolvla-full   # once, with lerobot
    python bench/bench_smolvla.py /work/bench-assets/smolvla-full [--calls 20] [--skip-builds]

Prints a Markdown table and writes ASSETS/bench.json: build wall times, the student's NMSE and
cosine vs the teacher (the build's held-out check), p50 / p90 per chunk of both on this host and
their ratio (A/B alternating calls, so a drifting machine slows both alike), and Thor's roofline
per part from the Thor build (an estimate, never a measurement). The distillations are short enough
for 2 CPU cores (bench/recipes/: x86 80 steps of 4 on 32 observations; Thor 60 steps of 6 on every
training frame with two noise draws each): the figures are the architecture's, not a well-trained
student's. `--only x86|thor` rebuilds one; `--skip-builds` re-reads both builds' report.json and only
re-times and re-checks parity.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
LEROBOT = "0.4"  # make_full_smolvla.py runs lerobot 0.4.4 (the side environment's venv): its semantics


def build(assets: Path, target: str, recipe: str, out: str, calls: int) -> tuple[dict, float]:
    import vlacompile

    t0 = time.perf_counter()
    result = vlacompile.build(target, checkpoint=assets / "policy", tokenizer=assets / "vlm", lerobot_version=LEROBOT,
                              episodes=assets / "episodes",
                              recipe=ROOT / "recipes" / recipe, out=assets / out, calls=calls, cache_dir=assets / "cache")
    return result.report, time.perf_counter() - t0


def interleaved(assets: Path, out: str, calls: int) -> dict:
    """Teacher and student on the same observations, calls alternating (A/B/A/B), warm."""
    import torch

    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.torch_eager import TorchRunner
    from vlacompile.checkpoint import load_policy
    from vlacompile.data import read_episodes, split_episodes
    from vlacompile.verify import held_out_inputs
    from vlacompile.verify.latency import measure_interleaved

    teacher = load_policy(assets / "policy", tokenizer=assets / "vlm", lerobot_version=LEROBOT)
    student = load_policy(assets / out / "student")
    _, _, held = split_episodes(read_episodes(assets / "episodes"), seed=0)
    data = held_out_inputs(held, teacher.spec, max_samples=8, seed=0)
    runners = {"teacher": TorchRunner(teacher), "student": OrtRunner(assets / out / "student.onnx", student.spec)}
    timed = measure_interleaved(runners, data.observations, data.noises, calls=calls, warmup=1)
    out_ = {k: {m: v[m] for m in ("p50_ms", "p90_ms", "p99_ms", "intervals")} for k, v in timed.items()}
    out_["ratio_p50"] = out_["teacher"]["p50_ms"] / out_["student"]["p50_ms"]
    out_["threads"] = torch.get_num_threads()
    out_["calls"] = calls
    return out_


def parity(assets: Path) -> dict:
    """vlacompile's full-size teacher against the chunk lerobot computed (make_full_smolvla.py) for one observation."""
    from safetensors.numpy import load_file

    from vlacompile.checkpoint import load_policy

    case = load_file(str(assets / "parity.safetensors"))
    teacher = load_policy(assets / "policy", tokenizer=assets / "vlm", lerobot_version=LEROBOT)
    got = teacher.predict_chunk({"observation.images.top": case["image.top"], "observation.state": case["state"],
                                 "task": "pick up the red cube"}, noise=case["noise"])
    return {"max_abs_diff": float(np.abs(got - case["actions"]).max()), "max_abs_action": float(np.abs(case["actions"]).max())}


BUILDS = (("x86", "x86-cpu", "smolvla-full-x86.toml", "build-x86"),
          ("thor", "jetson-thor", "smolvla-full-thor.toml", "build-thor"),
          ("thor-int8", "jetson-thor", "smolvla-full-thor-int8.toml", "build-thor-int8"))  # the teacher, INT8, no distillation


def summary(report: dict, seconds: float) -> dict:
    """The figures bench.json keeps from one build's report."""
    return {
        "exit_code": report["exit_code"], "build_seconds": round(seconds, 1),
        "stages": {s["stage"]: s.get("seconds") for s in report["stages"]},
        "reused": [s["stage"] for s in report["stages"] if s.get("reused")],
        "teacher_params": report["teacher"]["params"], "student_params": report["student"]["params"],
        "nmse_vs_teacher": report["accuracy"]["nmse_vs_teacher"], "cosine": report["accuracy"]["cosine"],
        "teacher_self_consistency": report["accuracy"]["teacher_self_consistency"]["nmse"],
        "latency": {k: {m: report["latency"][k].get(m) for m in ("kind", "p50_ms", "p99_ms")} for k in ("teacher", "student")},
        "roofline": {p: report["roofline"]["student"][p]["ms"]["value"] for p in ("system2", "system1")}
        | {"total_ms": report["roofline"]["student"]["total_ms"]["value"],
           "system1_steps": report["roofline"]["student"]["system1"]["steps"]},
        "readiness": {g: r["ready"] for g, r in (report.get("tensorrt_readiness") or {}).items()},
        "parts": report["latency"].get("parts"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("assets", type=Path)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--skip-builds", action="store_true", help="take the builds' figures from ASSETS/build-*/report.json")
    ap.add_argument("--only", choices=["x86", "thor", "thor-int8"], help="build only this one (the others' figures stay from an earlier run)")
    args = ap.parse_args()
    from vlacompile.targets import host_device_string

    results_path = args.assets / "bench.json"
    res = json.loads(results_path.read_text()) if (args.skip_builds or args.only) and results_path.is_file() else {}
    if not args.skip_builds:
        # A fresh cache: every build is cold (the recipes distil differently: see bench/recipes/).
        shutil.rmtree(args.assets / "cache", ignore_errors=True)
        for key, target, recipe, out in BUILDS:
            if args.only and key != args.only:
                continue
            report, seconds = build(args.assets, target, recipe, out, args.calls)
            res[key] = summary(report, seconds)
            print(f"{target}: exit {report['exit_code']} in {seconds:.0f} s", flush=True)
    else:  # the figures of the builds on disk
        for key, _, _, out in BUILDS:
            path = args.assets / out / "report.json"
            if path.is_file():
                report = json.loads(path.read_text())
                res[key] = summary(report, report["seconds"])
    res["parity_vs_lerobot"] = parity(args.assets)
    res["interleaved"] = interleaved(args.assets, "build-x86", args.calls)
    res["device"] = host_device_string()
    results_path.write_text(json.dumps(res, indent=2) + "\n")
    x, t, il = res["x86"], res["thor"], res["interleaved"]
    print(f"\nfull-size SmolVLA on {res['device']} (one run, {il['calls']} calls each, alternating)\n")
    print("| | params | p50 per chunk | p90 | NMSE vs teacher |")
    print("|---|---|---|---|---|")
    print(f"| teacher, torch eager FP32, 10 flow steps | {x['teacher_params'] / 1e6:.0f}M | {il['teacher']['p50_ms']:.0f} ms | {il['teacher']['p90_ms']:.0f} ms | - |")
    print(f"| student, ONNX Runtime FP32, 2 flow steps | {x['student_params'] / 1e6:.0f}M | {il['student']['p50_ms']:.0f} ms | {il['student']['p90_ms']:.0f} ms | {x['nmse_vs_teacher']:.3f} |")
    print(f"\nfull-size teacher vs lerobot on one observation: max |diff| {res['parity_vs_lerobot']['max_abs_diff']:.2g}")
    print(f"ratio p50 {il['ratio_p50']:.2f}x; x86-cpu build {x['build_seconds']:.0f} s (exit {x['exit_code']}), "
          f"jetson-thor build {t['build_seconds']:.0f} s (exit {t['exit_code']}, reused {t.get('reused')})")
    print(f"Thor roofline (estimated, INT8): System 2 {t['roofline']['system2']:.2f} ms + System 1 {t['roofline']['system1']:.2f} ms "
          f"({t['roofline']['system1_steps']} steps) = {t['roofline']['total_ms']:.2f} ms; readiness {t['readiness']}")


if __name__ == "__main__":
    sys.exit(main())
