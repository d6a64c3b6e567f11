"""A SmolVLA with the published architecture and random weights, made BY LEROBOT (side environment).

    /work/side/venv/bin/python bench/make_full_smolvla.py OUT        # ~3 min, ~1.9 GB

Writes OUT/vlm (a SmolVLM2-500M-shaped backbone directory: its config.json with the published
sizes, and a small BPE tokenizer: no hub here, and the token ids only need to fall inside the
49,280-entry embedding), OUT/policy (lerobot's SmolVLAPolicy with its defaults: the VLM's first 16
of 32 text layers, a 720-wide expert, 512 px images, chunks of 50, 10 flow steps; saved with its
processors, VLM weights stored in bfloat16 as lerobot/smolvla_base stores them) and OUT/episodes
(a LeRobotDataset written with lerobot's recording API: one 512x512 camera, SO-100's 6-dim state and
action, 12 episodes x 10 frames). Nothing here is trained: the figures it gives are for the
architecture (latency, memory, the build's mechanics), not for a task.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "families" / "smolvla"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

# SmolVLM2-500M-Video-Instruct's sizes (FAMILIES.md section 2: vision 12 x 768 (12 heads, MLP 3072), 512 px,
# patch 16; text 32 x 960 (15 / 5 heads of 64, MLP 2560), vocabulary 49,280; pixel shuffle x4).
TEXT = dict(model_type="llama", vocab_size=49280, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
            num_attention_heads=15, num_key_value_heads=5, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
            rope_theta=100000.0, hidden_act="silu", tie_word_embeddings=False)
VISION = dict(model_type="smolvlm_vision", hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=512, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")


def parity_case(policy_dir: Path, path: Path) -> None:
    """One observation through lerobot (loaded from disk, as a user has it), with explicit noise: what
    the bench checks vlacompile's full-size teacher against."""
    from safetensors.torch import save_file

    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    policy = SmolVLAPolicy.from_pretrained(policy_dir).eval()
    pre = PolicyProcessorPipeline.from_pretrained(policy_dir, config_filename="policy_preprocessor.json")
    post = PolicyProcessorPipeline.from_pretrained(policy_dir, config_filename="policy_postprocessor.json",
                                                   to_transition=policy_action_to_transition, to_output=transition_to_policy_action)
    g = torch.Generator().manual_seed(1)
    frame = torch.randint(0, 256, (512, 512, 3), generator=g, dtype=torch.uint8)
    state = torch.randn(6, generator=g)
    noise = torch.randn(1, 50, 32, generator=g)
    batch = {"observation.images.top": frame.permute(2, 0, 1).float() / 255.0, "observation.state": state, "task": "pick up the red cube"}
    with torch.no_grad():
        actions = post(policy.predict_action_chunk(pre(batch), noise=noise.clone()))
    save_file({"image.top": frame, "state": state, "noise": noise[0], "actions": actions[0].float().contiguous()}, str(path))


def main(out: Path) -> None:
    from make_fixtures import SPECIAL, TASKS, bf16_backbone
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, SmolVLMConfig

    from lerobot.configs.types import FeatureType, PolicyFeature
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors

    vlm, policy_dir, episodes = out / "vlm", out / "policy", out / "episodes"
    for d in (vlm, policy_dir, episodes):
        shutil.rmtree(d, ignore_errors=True)
    vlm.mkdir(parents=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TASKS * 10, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<pad>", unk_token="<|endoftext|>",
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                              "image_token": "<image>", "end_of_utterance_token": "<end_of_utterance>"})
    hf_tok.save_pretrained(vlm)
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    SmolVLMProcessor(image_processor=SmolVLMImageProcessor(do_image_splitting=False), tokenizer=hf_tok,
                     video_processor=SmolVLMVideoProcessor(), image_seq_len=64).save_pretrained(vlm)
    SmolVLMConfig(image_token_id=hf_tok.convert_tokens_to_ids("<image>"), scale_factor=4, text_config=TEXT,
                  vision_config=VISION, tie_word_embeddings=False).save_pretrained(vlm)

    torch.manual_seed(0)
    config = SmolVLAConfig(
        vlm_model_name=str(vlm), load_vlm_weights=False, device="cpu",
        input_features={"observation.images.top": PolicyFeature(FeatureType.VISUAL, (3, 512, 512)),
                        "observation.state": PolicyFeature(FeatureType.STATE, (6,))},
        output_features={"action": PolicyFeature(FeatureType.ACTION, (6,))},
    )
    policy = SmolVLAPolicy(config)
    stats = {k: {"mean": torch.zeros(6), "std": torch.ones(6), "min": -torch.ones(6), "max": torch.ones(6)} for k in ("observation.state", "action")}
    pre, post = make_smolvla_pre_post_processors(config, dataset_stats=stats)
    policy.save_pretrained(policy_dir)
    pre.save_pretrained(policy_dir)
    post.save_pretrained(policy_dir)
    bf16_backbone(policy_dir / "model.safetensors")
    print(f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.1f}M params in {policy_dir}", flush=True)
    parity_case(policy_dir, out / "parity.safetensors")

    features = {"observation.images.top": {"dtype": "image", "shape": (512, 512, 3), "names": ["height", "width", "channels"]},
                "observation.state": {"dtype": "float32", "shape": (6,), "names": [f"joint{i}" for i in range(6)]},
                "action": {"dtype": "float32", "shape": (6,), "names": [f"joint{i}" for i in range(6)]}}
    ds = LeRobotDataset.create(repo_id="vlacompile/full-smolvla", fps=30, features=features, root=episodes, robot_type="so100",
                               use_videos=False)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:512, 0:512]
    for ep in range(12):  # 10 frames each: verify runs the 450M teacher on every held-out frame, twice
        state = rng.normal(0, 1, 6).astype(np.float32)
        for t in range(10):
            state = state + rng.normal(0, 0.05, 6).astype(np.float32)
            img = np.stack([(xx // 2 + t * 7 + ep * 21) % 256, (yy // 2 + t * 3) % 256, np.full((512, 512), ep * 20 % 256)], -1)
            ds.add_frame({"observation.images.top": img.astype(np.uint8), "observation.state": state.copy(),
                          "action": (state + rng.normal(0, 0.05, 6)).astype(np.float32), "task": TASKS[ep % 3]})
        ds.save_episode()
    ds.finalize()
    print(f"episodes: 12 x 10 frames in {episodes}", flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
