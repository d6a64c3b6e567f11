"""Train the shipped demo teacher on recorded Meta-World MT10 demonstrations.

    # 1. record (README "The demo teacher" splits the first command over two processes: ~6 min)
    python demo/record_metaworld.py --episodes-per-task 50 --seed 0 --out demo/.mt10-train/all
    python demo/record_metaworld.py --episodes-per-task 5 --seed 1 --out calibration/demo
    # 2. train (~31 min idle; resumable: re-run the same command to continue), then closed loop
    python demo/train_teacher.py --episodes demo/.mt10-train/all --held-out calibration/demo

The teacher's cameras, image size, state and action sizes and control rate come from the recorded
episodes; its architecture (6+6+6 layers, width 128, 10 flow steps, chunks of 16) is fixed here so
that the shipped recipes' layer selections apply. Training is deterministic under --seed: the batch
and flow-matching noise of step s depend only on (seed, s), so a resumed run equals an unbroken
one. At the end it writes demo/teacher/ (config.json + model.safetensors + training.json), reports
the teacher's sampled chunks against the held-out demonstrations, and (unless
--closed-loop-episodes 0) its closed-loop success on held-out scenes with the x86-cpu target's
action chunking.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlacompile.checkpoint import load_policy, new_policy, save_policy  # noqa: E402
from vlacompile.data import read_episodes  # noqa: E402
from vlacompile.data.episodes import EpisodeSet  # noqa: E402
from vlacompile.data.sampling import make_samples  # noqa: E402
from vlacompile.families.reference import ReferenceConfig  # noqa: E402
from vlacompile.families.reference.processor import ByteTokenizer  # noqa: E402

# Positions in Meta-World's state are in metres and some (a second object's pose in one-object
# tasks) barely move; without a floor their normalised values would be noise blown up 1e4-fold.
MIN_STATE_STD = 1e-2


def teacher_config(es: EpisodeSet) -> ReferenceConfig:
    six = (4,) * 6
    h, w = es.image_shape
    if h != w:
        raise SystemExit(f"the reference family takes square images; the episodes are {h}x{w}")
    return ReferenceConfig(
        cameras=tuple(es.camera_names),
        image_size=h,
        patch_size=16 if h % 16 == 0 else 8,
        state_dim=es.state_dim,
        action_dim=es.action_dim,
        chunk_size=16,
        flow_steps=10,
        max_tokens=32,
        control_hz=float(es.fps),
        vision_heads=six,
        vision_mlp=(512,) * 6,
        backbone_heads=six,
        backbone_mlp=(512,) * 6,
        expert_heads=six,
        expert_mlp=(512,) * 6,
    )


def merge(sets: list[EpisodeSet]) -> EpisodeSet:
    """One EpisodeSet from several recordings of the same robot (episodes re-indexed in order)."""
    first = sets[0]
    keys = ("fps", "camera_names", "image_shape", "state_dim", "action_dim")
    for other in sets[1:]:
        differ = [k for k in keys if getattr(other, k) != getattr(first, k)]
        if differ:
            raise SystemExit(f"{other.root} differs from {first.root} in {differ}: record both with the same settings")
    episodes = [replace(ep, index=i) for i, ep in enumerate(ep for s in sets for ep in s.episodes)]
    return replace(first, episodes=episodes)


def to_tensors(samples, tokenizer):
    images = np.stack([samples.images[c].transpose(0, 3, 1, 2) for c in samples.camera_names], axis=1)
    return (
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(samples.state),
        torch.from_numpy(tokenizer.encode_batch(samples.tasks)),
        torch.from_numpy(samples.actions),
    )


@torch.inference_mode()
def open_loop(model, tensors, seed: int, batch: int = 64) -> dict:
    images, state, tokens, actions = tensors
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(actions.shape, generator=g)
    preds = torch.cat([model(images[i : i + batch], state[i : i + batch], tokens[i : i + batch], noise[i : i + batch]) for i in range(0, len(state), batch)])
    var = actions.reshape(-1, actions.shape[-1]).var(0).clamp_min(1e-8)
    nmse = (((preds - actions) ** 2).reshape(-1, actions.shape[-1]).mean(0) / var).mean()
    first = (((preds[:, 0] - actions[:, 0]) ** 2).mean(0) / var).mean()
    return {"nmse_vs_recorded": float(nmse), "nmse_first_action": float(first)}


def closed_loop(policy, episodes_per_task: int, seed: int) -> dict:
    from vlacompile.backends.torch_eager import TorchRunner
    from vlacompile.sim import suite_for
    from vlacompile.sim.rollout import evaluate
    from vlacompile.targets import load_target

    spec = policy.spec
    suite = suite_for("metaworld-mt10", spec)
    r = evaluate(
        TorchRunner(policy), suite, episodes_per_task=episodes_per_task, seed=seed,
        actions_per_chunk=load_target("x86-cpu").budget.actions_per_chunk,
    )
    return {
        "success_rate": r["success_rate"],
        "episodes": r["episodes"],
        "seed": seed,
        "per_task": {t: v["success_rate"] for t, v in r["tasks"].items()},
        "seconds": r["seconds"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=Path, nargs="+", required=True, help="recorded training episodes (one or more datasets)")
    ap.add_argument("--held-out", type=Path, required=True, help="held-out episodes (the set `vlacompile build` uses)")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--closed-loop-episodes", type=int, default=10, help="per MT10 task, on evaluation scenes (0: skip)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --teacher-out instead of training")
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--work", type=Path, default=ROOT / "demo" / ".train", help="resumable training state")
    ap.add_argument("--teacher-out", type=Path, default=ROOT / "demo" / "teacher")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    held = read_episodes(args.held_out)
    if args.eval_only:
        policy = load_policy(args.teacher_out)
        tok = ByteTokenizer(policy.config.max_tokens)
        policy.module.eval()
        metrics = open_loop(policy.module, to_tensors(make_samples(held, chunk_size=policy.config.chunk_size, stride=4), tok), seed=args.seed)
        if args.closed_loop_episodes:
            metrics["closed_loop"] = closed_loop(policy, args.closed_loop_episodes, seed=args.seed)
        print(json.dumps(metrics, indent=2))
        return

    train_es = merge([read_episodes(p) for p in args.episodes])
    cfg = teacher_config(train_es)
    if merge([train_es, held]) is None:  # raises (exits) when the held-out set was recorded differently
        return
    print(f"episodes read in {time.time() - t0:.1f} s: {len(train_es)} train ({train_es.num_frames} frames, "
          f"{len(train_es.tasks)} tasks), {len(held)} held out", flush=True)

    tok = ByteTokenizer(cfg.max_tokens)
    train = to_tensors(make_samples(train_es, chunk_size=cfg.chunk_size), tok)
    held_t = to_tensors(make_samples(held, chunk_size=cfg.chunk_size, stride=4), tok)

    policy = new_policy(cfg)
    model = policy.module
    stats = train_es.stats()
    state_std = np.maximum(stats["observation.state"]["std"], MIN_STATE_STD)
    model.set_stats(stats["observation.state"]["mean"], state_std, stats["action"]["mean"], stats["action"]["std"])
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = 200

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    start, trained_seconds = 0, 0.0
    args.work.mkdir(parents=True, exist_ok=True)
    state_path = args.work / "state.pt"
    if state_path.is_file():  # resume: our own file, still loaded without unpickling code
        saved = torch.load(state_path, weights_only=True)
        if saved.get("config") != cfg.to_dict() or saved.get("steps") != args.steps:
            raise SystemExit(f"{state_path} is from another configuration or --steps; delete {args.work} to start over")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        start = int(saved["step"])
        trained_seconds = float(saved.get("train_seconds", 0.0))
        print(f"resuming at step {start}", flush=True)

    from tqdm import tqdm

    n = len(train[1])
    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train teacher", mininterval=5)
    running = None
    t_train = time.time()
    for step in bar:
        # The data order and flow-matching noise of step s depend only on (seed, s): resuming is exact.
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (args.batch_size,), generator=g)
        images, state, tokens, actions = (t[idx] for t in train)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model.flow_matching_loss(images, state, tokens, actions, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            tmp = state_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1, "steps": args.steps,
                        "config": cfg.to_dict(), "train_seconds": trained_seconds + time.time() - t_train}, tmp)
            tmp.replace(state_path)
    model.eval()
    if start < args.steps:
        trained_seconds += time.time() - t_train  # over all resumed runs: the time the steps took

    metrics = open_loop(model, held_t, seed=args.seed)
    print(f"teacher on the held-out episodes: {json.dumps(metrics)}", flush=True)
    if args.closed_loop_episodes:
        metrics["closed_loop"] = closed_loop(policy, args.closed_loop_episodes, seed=args.seed)
        print(f"teacher in closed loop: {json.dumps(metrics['closed_loop'])}", flush=True)

    tmp = args.teacher_out.with_name(args.teacher_out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tmp)
    record = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ("work", "teacher_out", "eval_only")}
    record.update(train_frames=train_es.num_frames, train_episodes=len(train_es), train_seconds=round(trained_seconds), metrics=metrics)
    (tmp / "training.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    shutil.rmtree(args.teacher_out, ignore_errors=True)
    tmp.rename(args.teacher_out)
    print(f"wrote {args.teacher_out} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
