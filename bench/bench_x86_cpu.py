"""What vlacompile buys on this CPU, against what a user would try first. One process, one run:

    teacher   torch eager, FP32                          (how the policy runs in its training code)
    teacher   exported to ONNX Runtime, FP32             (the obvious first step)
    teacher   ONNX Runtime dynamic INT8, one line        (quantize_dynamic(model, out, QInt8))
    student   vlacompile's compiled student              (build/x86-cpu, built first if missing)

Each is timed on the whole get_action path (pre-processing included), warm, over --calls calls,
and compared with the teacher on the same held-out observations and the same flow-matching noise.
Ratios matter more than absolute times on a shared machine: all rows come from the same run.

    python bench/bench_x86_cpu.py [--artifact build/x86-cpu] [--calls 300] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, default=ROOT / "build" / "x86-cpu", help="a `vlacompile build --target x86-cpu` output")
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--samples", type=int, default=256, help="held-out samples for the accuracy comparison")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from vlacompile.backends.onnxrt import OrtRunner
    from vlacompile.backends.torch_eager import TorchRunner
    from vlacompile.checkpoint import load_policy
    from vlacompile.data import read_episodes, split_episodes
    from vlacompile.resources import DEMO_EPISODES, DEMO_TEACHER
    from vlacompile.stages.export import export_policy
    from vlacompile.targets import host_device_string
    from vlacompile.verify import held_out_inputs
    from vlacompile.verify.accuracy import action_agreement
    from vlacompile.verify.latency import measure_latency

    if not (args.artifact / "report.json").is_file():
        import vlacompile

        print(f"no build at {args.artifact}: building it first (vlacompile build --target x86-cpu)", flush=True)
        vlacompile.build("x86-cpu", out=args.artifact, progress=False)
    report = json.loads((args.artifact / "report.json").read_text())
    student_onnx = args.artifact / report["student"]["onnx"]
    student = load_policy(args.artifact / "student")

    teacher = load_policy(DEMO_TEACHER)
    # The same held-out split as the build (same seed), so nothing here was trained on.
    _, _, held_out = split_episodes(read_episodes(DEMO_EPISODES), seed=report.get("seed", 0))
    data = held_out_inputs(held_out, teacher.spec, max_samples=args.samples, seed=0)

    work = Path(tempfile.mkdtemp(prefix="vlacompile-bench-"))
    teacher_onnx = export_policy(teacher, work / "teacher.onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(teacher_onnx), str(work / "teacher.int8.onnx"), weight_type=QuantType.QInt8)

    rows = [
        ("teacher torch eager FP32", TorchRunner(teacher)),
        ("teacher ONNX Runtime FP32", OrtRunner(teacher_onnx, teacher.spec)),
        ("teacher ONNX Runtime dynamic INT8", OrtRunner(work / "teacher.int8.onnx", teacher.spec)),
        (f"vlacompile student ({report['student']['precision']}, {student.spec.flow_steps} flow step(s))", OrtRunner(student_onnx, student.spec)),
    ]
    reference = rows[0][1].run_batched(data.inputs)
    results = []
    for name, runner in rows:
        actions = reference if runner is rows[0][1] else runner.run_batched(data.inputs)
        acc = action_agreement(reference, actions, data.samples.actions)
        lat = measure_latency(runner, data.observations, data.noises, calls=args.calls, warmup=30, progress=False)
        results.append(
            {
                "name": name,
                "p50_ms": lat["p50_ms"],
                "p99_ms": lat["p99_ms"],
                "nmse_vs_teacher": acc["nmse_vs_teacher"],
                "nmse_vs_recorded": acc["student_vs_recorded"]["nmse"],
            }
        )
        print(f"  measured {name}: p50 {lat['p50_ms']:.2f} ms", flush=True)

    base = results[0]["p50_ms"]
    device = host_device_string()
    print(f"\nvlacompile bench on {device}: {args.calls} warm get_action calls each, {len(data.samples)} held-out samples\n")
    print(f"{'runtime':<46} {'p50 ms':>8} {'p99 ms':>8} {'speed-up':>9} {'NMSE vs teacher':>16} {'NMSE vs recorded':>17}")
    for r in results:
        r["speedup_vs_eager"] = base / r["p50_ms"]
        print(
            f"{r['name']:<46} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['speedup_vs_eager']:>8.1f}x "
            f"{r['nmse_vs_teacher']:>16.4f} {r['nmse_vs_recorded']:>17.4f}"
        )
    int8, ours = results[2], results[3]
    faster = int8["p50_ms"] / ours["p50_ms"]
    vs_teacher = ours["nmse_vs_teacher"] <= int8["nmse_vs_teacher"]
    vs_recorded = ours["nmse_vs_recorded"] <= int8["nmse_vs_recorded"]
    verdict = ours["p50_ms"] < int8["p50_ms"] and vs_teacher
    print(f"\nvlacompile student vs ORT dynamic INT8 of the teacher: {faster:.1f}x faster (p50)")
    print(
        f"  NMSE vs teacher:  {ours['nmse_vs_teacher']:.4f} vs {int8['nmse_vs_teacher']:.4f} "
        f"({'lower or equal' if vs_teacher else 'HIGHER: the student is a different, smaller network; INT8 of the same network is not'})"
    )
    print(
        f"  NMSE vs recorded: {ours['nmse_vs_recorded']:.4f} vs {int8['nmse_vs_recorded']:.4f} "
        f"({'lower or equal' if vs_recorded else 'higher'})"
    )
    if args.json:
        args.json.write_text(json.dumps({"device": device, "calls": args.calls, "rows": results}, indent=2) + "\n")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
