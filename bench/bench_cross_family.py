"""A pi0 teacher distilled into a reference-family student (another family, another head), measured.

    /work/side/venv061/bin/python bench/make_pi0.py ASSETS          # lerobot makes the (untrained) pi0
    python bench/bench_cross_family.py ASSETS [--fit-steps 600] [--distill-steps 1500]

1. Trains lerobot's pi0 on the demo's Meta-World episodes (the training split a build uses) with
   flow matching on the recorded chunks, through the pi0 family's split plan (vlacompile's
   ``training._FlowObjective``: the same objective a cross-family student learns with), and saves
   it in lerobot's layout (ASSETS/teacher). An untrained pi0's chunks are noise; a teacher has to be one.
2. ``vlacompile build --target x86-cpu`` with ``bench/recipes/pi0-to-reference.toml``: a 2+2+2-layer
   reference student (its own noise, time convention and normalisation) learns from the teacher's
   chunks (4 noise draws per observation) and is verified against it on held-out episodes, teacher
   (torch eager) and student (ONNX Runtime) timed in the same run.

Writes ASSETS/bench.json: the fit's loss, the build's exit code, NMSE / cosine vs the teacher, the
teacher's own spread across noise draws, both p50s and their ratio, and how long each part took.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
EPISODES = ROOT / "calibration" / "demo"


def fit(policy, train, steps: int, batch: int, lr: float, seed: int = 0) -> list[list[float]]:
    """Flow matching on the recorded action chunks (behaviour cloning through the family's own head)."""
    from vlacompile.data import make_samples
    from vlacompile.training import _FlowObjective, model_inputs

    samples = make_samples(train, chunk_size=policy.spec.chunk_size)
    inputs = model_inputs(policy, samples)
    actions = torch.from_numpy(samples.actions.astype(np.float32))
    objective = _FlowObjective(policy, policy.module, list(range(policy.spec.action_dim)))
    objective.train()
    opt = torch.optim.AdamW(policy.module.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=max(0.05, 2.0 / steps))
    g = torch.Generator().manual_seed(seed)
    curve = []
    t0 = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(samples), (batch,), generator=g)
        x = {k: v[idx] for k, v in inputs.items()}
        x["noise"] = torch.randn((batch, *policy.spec.noise_shape), generator=g)
        loss = objective(target=actions[idx], flow_u=torch.rand(batch, generator=g), **x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.module.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 20) == 0:
            curve.append([step + 1, float(loss)])
            print(f"fit: step {step + 1}/{steps} loss {float(loss):.4f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    policy.module.eval()
    return curve


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("assets", type=Path)
    ap.add_argument("--fit-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--calls", type=int, default=100)
    args = ap.parse_args()
    from vlacompile.checkpoint import load_policy
    from vlacompile.data import read_episodes, split_episodes
    from vlacompile.families import get_family

    a = args.assets
    out: dict = {"device": None, "assets": str(a)}
    teacher_dir = a / "teacher"
    t0 = time.perf_counter()
    if not (teacher_dir / "model.safetensors").is_file():
        policy = load_policy(a / "policy", tokenizer=a / "tokenizer")
        train, _, _ = split_episodes(read_episodes(EPISODES), seed=0)  # the build's split: held-out stays unseen
        torch.manual_seed(0)
        curve = fit(policy, train, args.fit_steps, args.batch, args.lr)
        teacher_dir.mkdir(parents=True, exist_ok=True)
        get_family(policy.family).save(policy, teacher_dir)
        out["fit"] = {"steps": args.fit_steps, "batch": args.batch, "lr": args.lr, "loss_curve": curve,
                      "seconds": round(time.perf_counter() - t0, 1), "params": policy.num_parameters()}
        (a / "fit.json").write_text(json.dumps(out["fit"], indent=2))
    else:
        out["fit"] = json.loads((a / "fit.json").read_text())

    t1 = time.perf_counter()
    cmd = [sys.executable, "-m", "vlacompile.cli", "build", "--target", "x86-cpu", "--checkpoint", str(teacher_dir),
           "--tokenizer", str(a / "tokenizer"), "--episodes", str(EPISODES), "--recipe", str(ROOT / "bench" / "recipes" / "pi0-to-reference.toml"),
           "--out", str(a / "build-reference"), "--no-cache", "--calls", str(args.calls), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    report = json.loads((a / "build-reference" / "report.json").read_text())
    lat, acc = report["latency"], report["accuracy"]
    st = report["stages"][0]
    out["build"] = {
        "exit_code": proc.returncode, "seconds": round(time.perf_counter() - t1, 1),
        "teacher": {"family": report["teacher"]["family"], "params": report["teacher"]["params"], "flow_steps": report["teacher"]["flow_steps"]},
        "student": {"family": report["student"]["family"], "params": report["student"]["params"], "flow_steps": report["student"]["flow_steps"]},
        "distill": {k: st.get(k) for k in ("objective", "initial_loss", "final_loss", "target_seconds", "train_seconds", "num_samples")},
        "nmse_vs_teacher": acc["nmse_vs_teacher"], "nmse_standard_error": acc.get("nmse_standard_error"), "cosine": acc["cosine"],
        "teacher_self_consistency_nmse": acc["teacher_self_consistency"]["nmse"],
        "teacher_vs_recorded_nmse": (acc.get("teacher_vs_recorded") or {}).get("nmse"),
        "student_vs_recorded_nmse": (acc.get("student_vs_recorded") or {}).get("nmse"),
        "teacher_p50_ms": lat["teacher"]["p50_ms"], "student_p50_ms": lat["student"]["p50_ms"],
        "teacher_runtime": lat["teacher"]["runtime"], "student_runtime": lat["student"]["runtime"],
        "p50_ratio": lat["teacher"]["p50_ms"] / lat["student"]["p50_ms"], "measured_on": lat["teacher"]["measured_on"],
        "gates": {g["name"]: g["status"] for g in report["gates"]["gates"]},
    }
    out["device"] = lat["teacher"]["measured_on"]
    (a / "bench.json").write_text(json.dumps(out, indent=2))
    b = out["build"]
    print(f"pi0 teacher ({b['teacher']['params'] / 1e6:.1f}M, {b['teacher']['flow_steps']} steps) -> reference student "
          f"({b['student']['params'] / 1e6:.2f}M, {b['student']['flow_steps']} steps): NMSE {b['nmse_vs_teacher']:.3f} "
          f"(teacher vs itself {b['teacher_self_consistency_nmse']:.3f}), p50 {b['teacher_p50_ms']:.1f} ms vs {b['student_p50_ms']:.2f} ms "
          f"= {b['p50_ratio']:.1f}x, exit {b['exit_code']}")


if __name__ == "__main__":
    main()
