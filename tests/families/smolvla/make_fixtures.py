"""Generate the SmolVLA parity fixtures WITH LEROBOT (run in the side environment, never in CI).

    bash ../shared/lerobot-side/setup.sh /work/side          # lerobot 0.4.4 in /work/side/venv
    /work/side/venv/bin/python tests/families/smolvla/make_fixtures.py [OUT]   # default: next to this file

For every configuration in CONFIGS this builds, offline and with random weights:

* ``vlm/``: a tiny SmolVLM2-style backbone directory (config.json, a BPE tokenizer trained here,
  the SmolVLM processor files), which is what ``vlm_model_name`` points lerobot at and what
  vlacompile reads as ``--tokenizer``;
* ``policy/``: a ``SmolVLAPolicy`` saved by lerobot with its pre/post-processor pipelines
  (``save_pretrained`` of the policy and of both pipelines, so the normaliser state files are
  there), then loaded back from disk, as a user would;
* ``cases.safetensors`` + ``cases.json``: a few observations (uint8 camera frames, state, task),
  the initial noise passed explicitly, what lerobot's preprocessor made of them (tokens, attention
  mask, normalised state) and the action chunk ``predict_action_chunk`` + postprocessor returned;
* ``meta.json``: the lerobot / transformers / torch versions and the configuration;
* for the configurations in EPISODES, ``episodes/``: a small LeRobotDataset v3 (image mode) written
  with lerobot's own recording API (``LeRobotDataset.create`` / ``add_frame`` / ``save_episode`` /
  ``finalize``) with the policy's features, for the end-to-end build test.

The fixtures are what lerobot computed; vlacompile's tests compare against them without lerobot.
Regenerate them with this script rather than editing them. make_fixtures_061.py (lerobot 0.6.1)
reuses ``generate`` and runs these same policies under lerobot 0.6.1.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import torch

HERE = Path(__file__).resolve().parent

# Each configuration differs from the others in cameras, image sizes, state/action dims, chunk
# size, flow steps, VLM depth, expert depth and the self/cross-attention pattern.
CONFIGS = {
    "one_cam_cross_every2": dict(
        vlm=dict(hidden=64, layers=4, heads=4, kv_heads=2, vision_hidden=32, vision_layers=2, image=64, scale=2,
                 bos=False),
        cameras={"top": (48, 64)},  # H, W as recorded: resized with padding to the VLM's 64x64
        state_dim=6, action_dim=4, chunk_size=8, num_steps=4, num_vlm_layers=4, num_expert_layers=-1,
        self_attn_every_n_layers=2, attention_mode="cross_attn", max_state_dim=8, max_action_dim=8,
        tokenizer_max_length=12, pad_language_to="longest", expert_width_multiplier=0.75,
        norm={"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
        bf16_backbone=False, add_image_special_tokens=False, empty_cameras=0, prefix_length=-1,
    ),
    "two_cams_every3": dict(
        vlm=dict(hidden=96, layers=8, heads=6, kv_heads=3, vision_hidden=48, vision_layers=3, image=96, scale=3,
                 bos=True),
        cameras={"wrist": (32, 32), "front": (72, 96)},
        state_dim=14, action_dim=7, chunk_size=10, num_steps=10, num_vlm_layers=6, num_expert_layers=-1,
        self_attn_every_n_layers=3, attention_mode="cross_attn", max_state_dim=16, max_action_dim=16,
        tokenizer_max_length=16, pad_language_to="max_length", expert_width_multiplier=0.5,
        norm={"VISUAL": "IDENTITY", "STATE": "MIN_MAX", "ACTION": "MEAN_STD"},
        bf16_backbone=True, add_image_special_tokens=True, empty_cameras=1, prefix_length=-1,
    ),
    "self_attn_prefix_pad": dict(
        vlm=dict(hidden=64, layers=3, heads=4, kv_heads=4, vision_hidden=32, vision_layers=1, image=64, scale=4,
                 bos=False),
        cameras={"cam_high": (64, 64)},
        state_dim=3, action_dim=3, chunk_size=5, num_steps=3, num_vlm_layers=3, num_expert_layers=-1,
        self_attn_every_n_layers=-1, attention_mode="self_attn", max_state_dim=4, max_action_dim=4,
        tokenizer_max_length=10, pad_language_to="longest", expert_width_multiplier=0.75,
        norm={"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "MIN_MAX"},
        bf16_backbone=False, add_image_special_tokens=False, empty_cameras=0, prefix_length=24,
    ),
    # Half as many expert layers as VLM layers, every layer cross-attention: the expert sits at VLM
    # layers 0 and 2, layers 1 and 3 have none. (With self-attention layers in the pattern lerobot
    # 0.4.4 needs an expert at each of them and gives every odd expert layer cross-attention
    # projections, so halving the expert only runs with all-cross layers.)
    "half_expert": dict(
        vlm=dict(hidden=64, layers=6, heads=4, kv_heads=1, vision_hidden=32, vision_layers=2, image=32, scale=2,
                 bos=True),
        cameras={"left": (40, 30), "right": (30, 40)},
        state_dim=5, action_dim=6, chunk_size=6, num_steps=5, num_vlm_layers=4, num_expert_layers=2,
        self_attn_every_n_layers=-1, attention_mode="cross_attn", max_state_dim=6, max_action_dim=6,
        tokenizer_max_length=8, pad_language_to="longest", expert_width_multiplier=1.0,
        norm={"VISUAL": "MEAN_STD", "STATE": "MEAN_STD", "ACTION": "QUANTILE10"},
        bf16_backbone=False, add_image_special_tokens=False, empty_cameras=0, prefix_length=-1,
    ),
}
EPISODES = {"one_cam_cross_every2": dict(episodes=10, length=12, fps=30)}
TASKS = ["pick up the red cube", "Open_the top DRAWER and put the bowl on the plate, then close it again", "push"]
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<end_of_utterance>", "<fake_token_around_image>",
           "<global-img>", "<image>", "<pad>"]


def make_vlm(out: Path, v: dict) -> None:
    """A tiny random SmolVLM2-style directory: config, a BPE tokenizer trained on a small corpus, processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import (PreTrainedTokenizerFast, SmolVLMConfig, SmolVLMImageProcessor, SmolVLMProcessor,
                              SmolVLMVideoProcessor)

    out.mkdir(parents=True, exist_ok=True)
    corpus = [t.lower() for t in TASKS] + TASKS + ["open the drawer", "stack the blocks", "close the microwave"] * 5
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    if v["bos"]:  # a post-processor that prepends BOS, as many HF tokenizers have
        bos = tok.token_to_id("<|im_start|>")
        tok.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)])
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<pad>",
        unk_token="<|endoftext|>", model_max_length=512,
        extra_special_tokens={"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                              "image_token": "<image>", "end_of_utterance_token": "<end_of_utterance>"})
    patch = 16
    seq = (v["image"] // patch) ** 2 // v["scale"] ** 2
    proc = SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(do_image_splitting=False, size={"longest_edge": v["image"]},
                                              max_image_size={"longest_edge": v["image"]}),
        tokenizer=hf_tok, video_processor=SmolVLMVideoProcessor(size={"longest_edge": v["image"]},
                                                                max_image_size={"longest_edge": v["image"]}),
        image_seq_len=seq)
    proc.save_pretrained(out)
    h = v["hidden"]
    SmolVLMConfig(
        image_token_id=hf_tok.convert_tokens_to_ids("<image>"), scale_factor=v["scale"], tie_word_embeddings=False,
        text_config=dict(model_type="llama", vocab_size=len(hf_tok), hidden_size=h, intermediate_size=2 * h,
                         num_hidden_layers=v["layers"], num_attention_heads=v["heads"], num_key_value_heads=v["kv_heads"],
                         head_dim=h // v["heads"], max_position_embeddings=1024, rms_norm_eps=1e-5,
                         pad_token_id=hf_tok.pad_token_id),
        vision_config=dict(model_type="smolvlm_vision", hidden_size=v["vision_hidden"], intermediate_size=2 * v["vision_hidden"],
                           num_hidden_layers=v["vision_layers"], num_attention_heads=2, image_size=v["image"], patch_size=patch),
    ).save_pretrained(out)


def make_stats(c: dict, rng: np.random.Generator) -> dict:
    def stats(dim: int, scale: float) -> dict:
        mean = rng.normal(0, scale, dim)
        std = rng.uniform(0.2, 1.5, dim) * scale
        lo, hi = mean - 2.5 * std, mean + 2.5 * std
        return {"mean": mean, "std": std, "min": lo, "max": hi, "q01": mean - 2 * std, "q99": mean + 2 * std,
                "q10": mean - 1.2 * std, "q50": mean, "q90": mean + 1.2 * std, "count": np.array([1000])}

    out = {"observation.state": stats(c["state_dim"], 0.8), "action": stats(c["action_dim"], 0.5)}
    for cam in c["cameras"]:
        out[f"observation.images.{cam}"] = {k: np.full((3, 1, 1), v) for k, v in
                                            {"mean": 0.45, "std": 0.25, "min": 0.0, "max": 1.0}.items()}
    return {k: {s: torch.tensor(np.asarray(a), dtype=torch.float32) for s, a in d.items()} for k, d in out.items()}


def bf16_backbone(weights: Path) -> None:
    """Store the VLM (vision, connector, text layers) in bfloat16 as lerobot/smolvla_base does; the
    projections and the expert stay float32 (mixed dtypes, as the hub checkpoints have)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(weights))
    state = {k: v.to(torch.bfloat16) if k.startswith("model.vlm_with_expert.vlm.") else v for k, v in state.items()}
    save_file(state, str(weights), metadata={"format": "pt"})


def generate(name: str, c: dict, root: Path, generated_by: str = "tests/families/smolvla/make_fixtures.py") -> None:
    import lerobot
    import transformers
    from safetensors.torch import save_file

    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.smolvla.configuration_smolvla import SmolVLAConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy
    from lerobot.policies.smolvla.processor_smolvla import make_smolvla_pre_post_processors
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    vlm_dir, policy_dir = out / "vlm", out / "policy"
    make_vlm(vlm_dir, c["vlm"])
    rng = np.random.default_rng(sum(map(ord, name)))
    torch.manual_seed(sum(map(ord, name)))

    inputs = {f"observation.images.{cam}": PolicyFeature(FeatureType.VISUAL, (3, h, w)) for cam, (h, w) in c["cameras"].items()}
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (c["state_dim"],))
    img = c["vlm"]["image"]
    config = SmolVLAConfig(
        vlm_model_name=str(vlm_dir), load_vlm_weights=False, device="cpu",
        input_features=inputs, output_features={"action": PolicyFeature(FeatureType.ACTION, (c["action_dim"],))},
        normalization_mapping={k: NormalizationMode(v) for k, v in c["norm"].items()},
        chunk_size=c["chunk_size"], n_action_steps=c["chunk_size"], num_steps=c["num_steps"],
        num_vlm_layers=c["num_vlm_layers"], num_expert_layers=c["num_expert_layers"],
        self_attn_every_n_layers=c["self_attn_every_n_layers"], attention_mode=c["attention_mode"],
        expert_width_multiplier=c["expert_width_multiplier"], max_state_dim=c["max_state_dim"],
        max_action_dim=c["max_action_dim"], resize_imgs_with_padding=(img, img),
        tokenizer_max_length=c["tokenizer_max_length"], pad_language_to=c["pad_language_to"],
        add_image_special_tokens=c["add_image_special_tokens"], empty_cameras=c["empty_cameras"],
        prefix_length=c["prefix_length"],
    )
    policy = SmolVLAPolicy(config)
    with torch.no_grad():  # default inits leave biases at 0 and norms at 1: perturb them so every weight matters
        for pname, p in policy.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            if "position_embedding" in pname and c.get("position_embedding_std"):
                p.normal_(0.0, c["position_embedding_std"])  # trained towers' are large; the default init's are tiny
    pre, post = make_smolvla_pre_post_processors(config, dataset_stats=make_stats(c, rng))
    policy.save_pretrained(policy_dir)
    pre.save_pretrained(policy_dir)
    post.save_pretrained(policy_dir)
    if c["bf16_backbone"]:
        bf16_backbone(policy_dir / "model.safetensors")

    # What a user has: everything loaded back from disk.
    policy = SmolVLAPolicy.from_pretrained(policy_dir).eval()
    pre = PolicyProcessorPipeline.from_pretrained(policy_dir, config_filename="policy_preprocessor.json")
    post = PolicyProcessorPipeline.from_pretrained(
        policy_dir, config_filename="policy_postprocessor.json",
        to_transition=policy_action_to_transition, to_output=transition_to_policy_action)

    arrays, cases = {}, []
    for i, task in enumerate(TASKS):
        frames = {cam: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for cam, (h, w) in c["cameras"].items()}
        state = rng.normal(0, 1, c["state_dim"]).astype(np.float32)
        noise = torch.randn(1, c["chunk_size"], c["max_action_dim"], generator=torch.Generator().manual_seed(100 + i))
        batch = {f"observation.images.{cam}": torch.from_numpy(f).permute(2, 0, 1).float() / 255.0 for cam, f in frames.items()}
        batch["observation.state"] = torch.from_numpy(state)
        batch["task"] = task
        processed = pre(batch)
        with torch.no_grad():
            raw = policy.predict_action_chunk(processed, noise=noise.clone())
        actions = post(raw)
        for cam, f in frames.items():
            arrays[f"{i}.image.{cam}"] = torch.from_numpy(f)
        arrays[f"{i}.state"] = torch.from_numpy(state)
        arrays[f"{i}.noise"] = noise[0]
        arrays[f"{i}.tokens"] = processed["observation.language.tokens"][0].to(torch.int64)
        arrays[f"{i}.token_mask"] = processed["observation.language.attention_mask"][0].to(torch.int64)
        arrays[f"{i}.state_normalized"] = processed["observation.state"][0].float()
        arrays[f"{i}.actions_normalized"] = raw[0].float()
        arrays[f"{i}.actions"] = actions[0].float()
        cases.append({"task": task, "cameras": list(c["cameras"])})
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(out / "cases.safetensors"))
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    meta = {
        "generated_by": generated_by,
        "lerobot": lerobot.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "config": {k: v for k, v in c.items()},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: {sum(p.numel() for p in policy.parameters())} params, actions {tuple(actions.shape)}", flush=True)


def make_episodes(name: str, c: dict, root: Path, e: dict, video: bool = False) -> None:
    """A LeRobotDataset with the policy's features, written by lerobot: images as PNG in the parquet
    (``episodes/``) or, with ``video``, as lerobot's default AV1 MP4s (``episodes_video/``, the same
    frames before encoding). Frames are smooth gradients (they compress), states and actions random walks."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    out = root / name / ("episodes_video" if video else "episodes")
    shutil.rmtree(out, ignore_errors=True)
    rng = np.random.default_rng(7)
    features = {f"observation.images.{cam}": {"dtype": "video" if video else "image", "shape": (h, w, 3), "names": ["height", "width", "channels"]}
                for cam, (h, w) in c["cameras"].items()}
    features["observation.state"] = {"dtype": "float32", "shape": (c["state_dim"],), "names": [f"s{i}" for i in range(c["state_dim"])]}
    features["action"] = {"dtype": "float32", "shape": (c["action_dim"],), "names": [f"a{i}" for i in range(c["action_dim"])]}
    ds = LeRobotDataset.create(repo_id=f"vlacompile/{name}", fps=e["fps"], features=features, root=out, robot_type="tiny",
                               use_videos=video)
    for ep in range(e["episodes"]):
        state = rng.normal(0, 1, c["state_dim"]).astype(np.float32)
        action = rng.normal(0, 1, c["action_dim"]).astype(np.float32)
        for t in range(e["length"]):
            state = state + rng.normal(0, 0.1, c["state_dim"]).astype(np.float32)
            action = action + rng.normal(0, 0.1, c["action_dim"]).astype(np.float32)
            frame = {"observation.state": state.copy(), "action": action.copy(), "task": TASKS[ep % 2]}
            for cam, (h, w) in c["cameras"].items():
                yy, xx = np.mgrid[0:h, 0:w]
                img = np.stack([(xx * 4 + t * 9 + ep * 20) % 256, (yy * 4 + t * 5) % 256, np.full((h, w), (ep * 37) % 256)], -1)
                frame[f"observation.images.{cam}"] = img.astype(np.uint8)
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    print(f"{name}: {e['episodes']} episodes x {e['length']} frames written by lerobot in {out}", flush=True)


def main() -> None:
    args = sys.argv[1:]
    episodes_only = "--episodes-only" in args  # the datasets alone, leaving the policies as they are
    args = [a for a in args if a != "--episodes-only"]
    root = Path(args[0]) if args else HERE / "fixtures"
    only = args[1:] or list(CONFIGS)
    for name in only:
        if not episodes_only:
            generate(name, CONFIGS[name], root)
        if name in EPISODES:
            make_episodes(name, CONFIGS[name], root, EPISODES[name])
            make_episodes(name, CONFIGS[name], root, EPISODES[name], video=True)


if __name__ == "__main__":
    main()
