"""A pi0 made BY LEROBOT 0.6.1 (side environment) for the demo's Meta-World episodes, untrained.

    /work/side/venv061/bin/python bench/make_pi0.py OUT            # ~1 min

lerobot builds pi0 only at the published sizes; as the parity fixtures do
(``tests/families/pi0/make_fixtures.py``), this swaps lerobot's size table for SIZES below before
building, so the model is lerobot's code at a size two CPU cores can train in minutes: a 3-layer
SigLIP (192 wide) at 64 px, a 4-layer Gemma backbone (384 wide, 1 K/V head of 48) and a 4-layer
expert (192 wide), chunks of 16, 10 flow steps; about 12M parameters. The policy reads the demo
dataset's features (one 64x64 camera, the 39-dim Meta-World state, 4 actions) and is normalised
with its statistics (``calibration/demo/meta/stats.json``). Writes OUT/policy and OUT/tokenizer.
``bench/bench_cross_family.py`` then trains it on the episodes and distils it.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "families" / "pi0"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIZES = dict(
    type="pi0", vlm=dict(width=384, depth=4, mlp=1536, kv_heads=1, head_dim=48),
    expert=dict(width=192, mlp=768, kv_heads=1, head_dim=48),
    vision=dict(hidden=192, layers=3, mlp=768, patch=8), resolution=64, vocab=320,
)
EPISODES = ROOT / "calibration" / "demo"


def main(out: Path) -> None:
    import make_fixtures as fx
    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy
    from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors

    out.mkdir(parents=True, exist_ok=True)
    fx.make_tokenizer(out / "tokenizer")
    fx.shrink_lerobot(SIZES)
    fx.local_tokenizer_steps(out / "tokenizer")
    torch.manual_seed(0)
    raw = json.loads((EPISODES / "meta" / "stats.json").read_text())
    stats = {k: {s: torch.tensor(np.asarray(v, dtype=np.float32)) for s, v in d.items() if s in ("mean", "std", "min", "max")}
             for k, d in raw.items() if k in ("observation.state", "action")}
    config = PI0Config(
        device="cpu",
        input_features={"observation.images.front": PolicyFeature(FeatureType.VISUAL, (3, 64, 64)),
                        "observation.state": PolicyFeature(FeatureType.STATE, (39,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (4,))},
        normalization_mapping={"VISUAL": NormalizationMode.IDENTITY, "STATE": NormalizationMode.MEAN_STD,
                               "ACTION": NormalizationMode.MEAN_STD},
        chunk_size=16, n_action_steps=16, num_inference_steps=10, max_state_dim=40, max_action_dim=8,
        image_resolution=(64, 64), tokenizer_max_length=24,
    )
    policy = PI0Policy(config)
    pre, post = make_pi0_pre_post_processors(config, dataset_stats=stats)
    policy.save_pretrained(out / "policy")
    pre.save_pretrained(out / "policy")
    post.save_pretrained(out / "policy")
    pre_json = out / "policy" / "policy_preprocessor.json"
    pre_json.write_text(pre_json.read_text().replace(json.dumps(str(out / "tokenizer")), json.dumps(fx.PALIGEMMA)))
    print(f"{sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M parameters -> {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
