"""Train the shipped demo teacher and write the shipped demo episodes.

    python demo/train_teacher.py                 # ~10 min on an idle 2-core CPU; resumable (re-run to continue)

1. Generates synthetic language-conditioned reaching episodes (vlacompile.data.synthetic) for
   training, and a second, disjoint set (other seed) that ships in calibration/demo/ as the
   episodes `vlacompile build` distils on, calibrates on and verifies on.
2. Trains the reference VLA (2 cameras, 6+6+6 layers, 10 flow steps) with the flow-matching loss,
   deterministic under --seed, with a progress bar, saving a resumable training state every
   --save-every steps.
3. Writes demo/teacher/ (config.json + model.safetensors) and prints how well the teacher's sampled
   chunks match the recorded actions on the shipped episodes.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vlacompile.checkpoint import new_policy, save_policy  # noqa: E402
from vlacompile.data import make_synthetic_episodes, write_episodes  # noqa: E402
from vlacompile.data.sampling import make_samples  # noqa: E402
from vlacompile.families.reference import ReferenceConfig  # noqa: E402
from vlacompile.tokenizer import ByteTokenizer  # noqa: E402

CAMERAS = ("front", "wrist")


def teacher_config() -> ReferenceConfig:
    six = (4,) * 6
    return ReferenceConfig(
        cameras=CAMERAS,
        image_size=64,
        patch_size=16,
        state_dim=6,
        action_dim=4,
        chunk_size=16,
        flow_steps=10,
        max_tokens=32,
        control_hz=10.0,
        vision_heads=six,
        vision_mlp=(512,) * 6,
        backbone_heads=six,
        backbone_mlp=(512,) * 6,
        expert_heads=six,
        expert_mlp=(512,) * 6,
    )


def to_tensors(samples, tokenizer):
    return (
        torch.from_numpy(samples.images),
        torch.from_numpy(samples.state),
        torch.from_numpy(tokenizer.encode_batch(samples.tasks)),
        torch.from_numpy(samples.actions),
    )


@torch.inference_mode()
def evaluate(model, tensors, seed: int, batch: int = 64) -> dict:
    images, state, tokens, actions = tensors
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(actions.shape, generator=g)
    preds = torch.cat([model(images[i : i + batch], state[i : i + batch], tokens[i : i + batch], noise[i : i + batch]) for i in range(0, len(state), batch)])
    var = actions.reshape(-1, actions.shape[-1]).var(0).clamp_min(1e-8)
    nmse = (((preds - actions) ** 2).reshape(-1, actions.shape[-1]).mean(0) / var).mean()
    first = (((preds[:, 0] - actions[:, 0]) ** 2).mean(0) / var).mean()
    return {"nmse_vs_recorded": float(nmse), "nmse_first_action": float(first)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-episodes", type=int, default=240)
    ap.add_argument("--ship-episodes", type=int, default=60)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-every", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    ap.add_argument("--work", type=Path, default=ROOT / "demo" / ".train", help="resumable training state")
    ap.add_argument("--teacher-out", type=Path, default=ROOT / "demo" / "teacher")
    ap.add_argument("--episodes-out", type=Path, default=ROOT / "calibration" / "demo")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = teacher_config()
    t0 = time.time()
    train_es = make_synthetic_episodes(args.train_episodes, image_size=cfg.image_size, cameras=CAMERAS, seed=args.seed)
    ship_es = make_synthetic_episodes(args.ship_episodes, image_size=cfg.image_size, cameras=CAMERAS, seed=args.seed + 10_000)
    print(f"episodes generated in {time.time() - t0:.1f} s: {len(train_es.episodes)} train, {len(ship_es.episodes)} shipped", flush=True)

    tok = ByteTokenizer(cfg.max_tokens)
    train = to_tensors(make_samples(train_es, chunk_size=cfg.chunk_size), tok)
    ship = to_tensors(make_samples(ship_es, chunk_size=cfg.chunk_size, stride=4), tok)

    policy = new_policy(cfg)
    model = policy.module
    stats = train_es.stats()
    model.set_stats(
        stats["observation.state"]["mean"], stats["observation.state"]["std"], stats["action"]["mean"], stats["action"]["std"]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    start = 0
    args.work.mkdir(parents=True, exist_ok=True)
    state_path = args.work / "state.pt"
    if state_path.is_file():  # resume: our own file, still loaded without unpickling code
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = int(state["step"])
        print(f"resuming at step {start}", flush=True)

    from tqdm import tqdm

    n = len(train[1])
    model.train()
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc="train teacher", mininterval=5)
    running = None
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
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1}, state_path)
    model.eval()

    metrics = evaluate(model, ship, seed=args.seed)
    print(f"teacher on the shipped episodes: {json.dumps(metrics)}", flush=True)

    tmp = args.teacher_out.with_name(args.teacher_out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_policy(policy, tmp)
    (tmp / "training.json").write_text(
        json.dumps({**vars(args), "work": None, "teacher_out": None, "episodes_out": None, "metrics": metrics}, indent=2, default=str) + "\n"
    )
    shutil.rmtree(args.teacher_out, ignore_errors=True)
    tmp.rename(args.teacher_out)
    shutil.rmtree(args.episodes_out, ignore_errors=True)
    write_episodes(args.episodes_out, ship_es, fps=cfg.control_hz)
    print(f"wrote {args.teacher_out} and {args.episodes_out} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
