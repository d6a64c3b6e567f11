"""One process of the FSDP distillation test: a tiny pi0 (the lerobot-made fixture) distilled into
a pi0 student with ``parallel = "fsdp"`` (student and teacher sharded with FSDP2 over gloo).

    python tests/stages/fsdp_worker.py OUT_DIR STEPS

Rank, world size and rendezvous come from the environment (torchrun / ``accelerate launch`` set
them; without them it runs alone). Writes OUT_DIR/rank<R>.safetensors (the student's weights and
its actions on fixed held-out inputs) and rank<R>.json (the stage record).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

FX = Path(__file__).resolve().parent.parent / "families" / "pi0" / "fixtures" / "pi0_two_cams"
SEED = 0


def params(steps: int):
    from vlacompile.stages import distill

    return distill.Params(layers={"vision": (1,), "backbone": (0, 2)}, flow_steps=2, steps=steps, batch_size=8,
                          num_samples=32, noises_per_sample=2, parallel="fsdp")


def main(out_dir: str, steps: int) -> None:
    from safetensors.torch import save_file

    from vlacompile.checkpoint import load_policy
    from vlacompile.data import draw_stratified, read_episodes, split_episodes
    from vlacompile.stages import Artifact, BuildContext, distill
    from vlacompile.training import model_inputs, seeded_noise

    torch.set_num_threads(1)
    train, calib, held_out = split_episodes(read_episodes(FX / "episodes"), seed=SEED)
    teacher = load_policy(FX / "policy", tokenizer=FX / "tokenizer")
    ctx = BuildContext(target=None, workdir=Path(out_dir), teacher=teacher, train=train, calibration=calib, seed=SEED,
                       progress=False, log=lambda m: None)
    art = distill.run(Artifact(policy=teacher), params(steps), ctx)
    student = art.policy
    samples = draw_stratified(held_out, 8, chunk_size=student.spec.chunk_size, seed=123)
    x = model_inputs(student, samples)
    x["noise"] = seeded_noise((len(samples), *student.spec.noise_shape), 123)
    with torch.inference_mode():
        actions = student(**x)
    rank = int(os.environ.get("RANK", "0"))
    tensors = {k: v.contiguous() for k, v in student.module.state_dict().items() if not k.startswith("normalize.")}
    tensors["__actions__"] = actions.contiguous()
    save_file(tensors, str(Path(out_dir) / f"rank{rank}.safetensors"))
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(art.records[-1]))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
