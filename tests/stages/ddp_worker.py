"""Tiny fixtures shared by the stage tests, and a distillation worker for the multi-process test.

As a script it is one process of a distributed run (rank, world size and rendezvous come from the
environment, as torchrun / ``accelerate launch`` set them; without them it runs alone):

    python tests/stages/ddp_worker.py TEACHER_DIR OUT_DIR STEPS

It distils the saved teacher on the tiny synthetic episodes and writes, per rank, the student's
weights and its actions on fixed inputs to OUT_DIR/rank<R>.safetensors.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, also when run as a script
from conftest import make_tiny_config  # noqa: E402

from vlacompile.checkpoint import new_policy
from vlacompile.families.reference import ReferenceConfig

SEED = 0


def tiny_config(**overrides) -> ReferenceConfig:
    return make_tiny_config(**overrides)


def tiny_episodes():
    """(train, calibration, held_out) synthetic episodes matching tiny_config()."""
    from vlacompile.data import make_synthetic_episodes, split_episodes

    es = make_synthetic_episodes(40, image_size=32, cameras=("front",), episode_length=24, seed=SEED)
    return split_episodes(es, seed=SEED)


def tiny_teacher(train, steps: int = 150, config: ReferenceConfig | None = None):
    """A tiny reference policy trained briefly with flow matching, so its actions depend on the inputs."""
    from vlacompile.data import make_samples
    from vlacompile.training import model_inputs

    torch.manual_seed(SEED)
    policy = new_policy(config or tiny_config())
    m = policy.module
    stats = train.stats()
    m.set_stats(stats["observation.state"]["mean"], stats["observation.state"]["std"], stats["action"]["mean"], stats["action"]["std"])
    samples = make_samples(train, chunk_size=policy.spec.chunk_size)
    x = model_inputs(policy, samples)
    actions = torch.from_numpy(samples.actions)
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(SEED)
    m.train()
    for _ in range(steps):
        idx = torch.randint(0, len(samples), (32,), generator=g)
        loss = m.flow_matching_loss(x["images"][idx], x["state"][idx], x["tokens"][idx], actions[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    from vlacompile.families import get_family

    policy.spec = get_family(policy.family).spec_of(m)
    return policy


def probe_inputs(policy, episodes, n: int = 32, seed: int = 123) -> dict[str, torch.Tensor]:
    """Fixed held-out model inputs (with noise) for comparing policies."""
    from vlacompile.data import draw_stratified
    from vlacompile.training import model_inputs, seeded_noise

    samples = draw_stratified(episodes, n, chunk_size=policy.spec.chunk_size, seed=seed)
    x = model_inputs(policy, samples)
    x["noise"] = seeded_noise((len(samples), policy.spec.chunk_size, policy.spec.action_dim), seed)
    return x


def nmse(student_actions: torch.Tensor, teacher_actions: torch.Tensor) -> float:
    """Mean over action dimensions of MSE / variance of the teacher's actions."""
    a = student_actions.reshape(-1, student_actions.shape[-1])
    t = teacher_actions.reshape(-1, teacher_actions.shape[-1])
    return float((((a - t) ** 2).mean(0) / t.var(0).clamp_min(1e-12)).mean())


def worker_params(steps: int):
    from vlacompile.stages import distill

    return distill.Params(
        layers={"vision": (1,), "backbone": (0,), "expert": (0, 1)}, mlp_ratio=0.75, flow_steps=1,
        steps=steps, batch_size=16, num_samples=96, noises_per_sample=2, feature_loss_weight=0.1,
    )


def main(teacher_dir: str, out_dir: str, steps: int) -> None:
    from safetensors.torch import save_file

    from vlacompile.checkpoint import load_policy
    from vlacompile.stages import Artifact, BuildContext, distill

    train, calib, held_out = tiny_episodes()
    teacher = load_policy(teacher_dir)
    ctx = BuildContext(target=None, workdir=Path(out_dir), teacher=teacher, train=train, calibration=calib, seed=SEED, progress=False, log=lambda m: None)
    art = distill.run(Artifact(policy=teacher), worker_params(steps), ctx)
    student = art.policy
    with torch.inference_mode():
        actions = student(**probe_inputs(student, held_out))
    rank = int(os.environ.get("RANK", "0"))
    tensors = {k: v.contiguous() for k, v in student.module.state_dict().items()}
    tensors["__actions__"] = actions.contiguous()
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(art.records[-1]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
