"""pi0 at its published size (random weights) exported for Jetson Thor and Orin as split graphs.

    python bench/bench_pi0_full.py OUT [--dtype float16] [--depth-fraction 1.0]

The architecture is lerobot's default pi0 (``get_gemma_config``: PaliGemma's SigLIP So400m/14 at
224 px, Gemma 2B (18 x 2048, MLP 16384, 8 heads, 1 K/V head of 256, 257,152 tokens) and the Gemma
300M expert (18 x 1024, MLP 4096)), three 224x224 cameras (base, left wrist, right wrist), ALOHA's
14-dim state and action, 48 prompt tokens, chunks of 50, 10 flow steps: 3.3B parameters. It is
built here from vlacompile's pi0 module (the one the parity fixtures check against lerobot), not
loaded: lerobot would need its 13 GB of FP32 weights written and read back to say nothing more.

For each target the script reports what the roofline says per part (System 2 once, System 1 per
step and for the 10 steps) against the target's budgets, the weight memory per precision, and then
exports System 2 and System 1 as ONNX with external data (TensorRT builds FP16/FP8/INT8 engines
from it), checks both graphs with the static TensorRT readiness check, and
records peak memory and time. The module computes in float32 (its images, state and time enter
as float32), so the export runs in FP32: about 2 x 13 GB for the full model, more than this
machine's 24 GB; ``--depth-fraction`` keeps that fraction of the layers, the largest size that
fits (0.5 here). A distilled student shape (half the vision and
backbone layers, 2 flow steps) is reported beside it. Writes OUT/bench.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch


def config(depth_fraction: float = 1.0):
    from vlacompile.families.pi0.configuration import Pi0Config
    from vlacompile.lerobot.policy_dir import Camera

    d = max(1, round(18 * depth_fraction))
    v = max(1, round(27 * depth_fraction))
    cams = tuple(Camera(f"observation.images.{n}", n, 224, 224) for n in ("base", "left_wrist", "right_wrist"))
    return Pi0Config(
        variant="pi0", cameras=cams, state_key="observation.state", state_name="observation.state", state_dim=14, action_dim=14,
        empty_cameras=0, chunk_size=50, num_steps=10, max_state_dim=32, max_action_dim=32, min_period=4e-3, max_period=4.0,
        resolution=224, tokenizer_max_length=48, padding_side="right", truncation=True, append_newline=True,
        vision_hidden=1152, vision_head_dim=72, vision_heads=(16,) * v, vision_mlp=(4304,) * v, patch_size=14,
        width=2048, num_kv_heads=1, head_dim=256, vocab_size=257152, text_mlp=(16384,) * d,
        expert_width=1024, expert_mlp=(4096,) * d, state_norm="MEAN_STD", action_norm="MEAN_STD", visual_norm="IDENTITY",
        source={"tokenizer_dir": ""},
    )


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="float32", choices=("float16", "float32"))
    ap.add_argument("--depth-fraction", type=float, default=1.0)
    ap.add_argument("--skip-export", action="store_true")
    args = ap.parse_args()
    from vlacompile.families import get_family
    from vlacompile.policy import Policy
    from vlacompile.targets import load_target
    from vlacompile.verify.roofline import estimate

    fam = get_family("pi0")
    out: dict = {"dtype": args.dtype, "depth_fraction": args.depth_fraction, "targets": {}}
    args.out.mkdir(parents=True, exist_ok=True)
    teacher_cfg = config(args.depth_fraction)
    student_cfg = fam.student_config(teacher_cfg, {"vision": list(range(0, teacher_cfg.vision_layers, 2)),
                                                   "backbone": list(range(0, teacher_cfg.depth, 2))}, {}, 2)
    t0 = time.perf_counter()
    torch.manual_seed(0)
    torch.set_default_dtype(getattr(torch, args.dtype))  # built in the export dtype: half the memory in FP16
    module = fam.build(teacher_cfg).eval()
    torch.set_default_dtype(torch.float32)
    policy = Policy(module=module, config=teacher_cfg, spec=fam.spec_of(module, tokenizer_dir=Path(".")), family="pi0")
    out["params"] = policy.num_parameters()
    out["build_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"pi0: {out['params'] / 1e9:.2f}B parameters ({args.dtype}) built in {out['build_seconds']} s, peak RSS {rss_gb():.1f} GB", flush=True)

    from vlacompile.verify.roofline import policy_weight_bytes

    for name in ("jetson-thor", "jetson-orin"):
        tgt = load_target(name)
        rows = {}
        for who, cfg, pol in (("teacher", teacher_cfg, policy), ("student", student_cfg, None)):
            if pol is None:
                with torch.device("meta"):
                    pol = Policy(module=fam.build(cfg), config=cfg, spec=policy.spec, family="pi0")
            weights = policy_weight_bytes(pol)
            for precision in ("fp16", "int8", "fp8"):
                if precision not in tgt.device.peak_tflops:
                    continue
                est = estimate(fam.flops(cfg), weights, tgt, precision)
                rows[f"{who}/{precision}"] = {
                    "system2_ms": est["system2"]["ms"]["value"], "system1_step_ms": est["system1"]["ms"]["value"] / cfg.num_steps,
                    "system1_ms": est["system1"]["ms"]["value"], "total_ms": est["total_ms"]["value"],
                    "weights_gb": est["weight_mb"] / 1024,
                    "params": sum(weights.values()) / 4, "flow_steps": cfg.num_steps,
                }
        out["targets"][name] = {"roofline": rows, "budget": {"p99_ms": tgt.budget.p99_latency_ms, "memory_mb": tgt.budget.memory_mb,
                                                              "execution": tgt.budget.execution, "control_hz": tgt.budget.control_hz,
                                                              "async_deadline_ms": tgt.budget.async_deadline_ms,
                                                              "actions_per_chunk": tgt.budget.actions_per_chunk},
                                "device_memory_gb": tgt.device.memory_gb}
    print(json.dumps(out["targets"], indent=1)[:3000], flush=True)
    (args.out / "bench.json").write_text(json.dumps(out, indent=2))
    if args.skip_export:
        return

    from vlacompile.stages.export import export_split
    from vlacompile.trt.readiness import readiness_report

    t1 = time.perf_counter()
    export_split(policy, args.out / "thor", external_data_threshold_mb=0)
    out["export_seconds"] = round(time.perf_counter() - t1, 1)
    out["export_peak_rss_gb"] = round(rss_gb(), 1)
    files = sorted((args.out / "thor").iterdir())
    out["files"] = {f.name: round(f.stat().st_size / 1e9, 3) for f in files}
    for name in ("jetson-thor", "jetson-orin"):
        tgt = load_target(name)
        out["targets"][name]["readiness"] = {part: readiness_report(args.out / "thor" / f"{part}.onnx", tgt)["ready"]
                                              for part in ("system2", "system1")}
    (args.out / "bench.json").write_text(json.dumps(out, indent=2))
    print(f"exported in {out['export_seconds']} s, peak RSS {out['export_peak_rss_gb']} GB: {out['files']}; "
          f"readiness {[(n, t['readiness']) for n, t in out['targets'].items()]}", flush=True)


if __name__ == "__main__":
    main()
