"""Generate the pi0 / pi0.5 parity fixtures WITH LEROBOT 0.6.1 (run in the side environment, never in CI).

    bash ../shared/lerobot-side/setup.sh /work/side 061        # lerobot 0.6.1 in /work/side/venv061
    /work/side/venv061/bin/python tests/families/pi0/make_fixtures.py [OUT] [NAMES...]

lerobot builds pi0 only at the published sizes (``get_gemma_config`` knows "gemma_2b" and
"gemma_300m"; the SigLIP tower is PaliGemma's default). To make policies small enough to commit,
this script shrinks those sizes *inside lerobot* before building: it swaps lerobot's
``get_gemma_config`` for one returning the tiny widths below, and shrinks the vision config and
vocabulary the moment lerobot's ``PaliGemmaWithExpertModel`` constructs them. Everything else
(the layer code, masks, RoPE, adaRMS, the processors, ``save_pretrained`` / ``from_pretrained``) is
lerobot's own. config.json still says ``gemma_2b`` / ``gemma_300m``: vlacompile reads the sizes
from the weights, as it must for any checkpoint.

For every configuration in CONFIGS this writes:

* ``tokenizer/``: a small Gemma-style tokenizer (tokenizer.json: SentencePiece-like BPE with "▁",
  single digits, ``<bos>`` prepended, ``<pad>`` = 0), what ``--tokenizer`` points at;
* ``policy/``: the policy saved by lerobot with both processor pipelines, loaded back from disk.
  The tokenizer step's ``tokenizer_name`` is rewritten to ``google/paligemma-3b-pt-224`` afterwards,
  as in real checkpoints (lerobot ran with the local directory);
* ``cases.safetensors`` + ``cases.json``: observations (uint8 frames, state, task), the initial
  noise passed explicitly, the preprocessor's tokens / mask, and the chunk lerobot returned;
* ``meta.json``: versions and the configuration;
* for the configurations in EPISODES, ``episodes/``: a small LeRobotDataset v3 (image mode) written
  with lerobot's recording API, with the policy's features (the SmolVLA fixtures' writer).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PALIGEMMA = "google/paligemma-3b-pt-224"

# Each configuration differs in variant, cameras (count, sizes, resize, empty cameras), state /
# action dims, chunk, flow steps, depth, widths, KV heads and normalisation modes. lerobot fixes the
# query heads at 8 (``compute_layer_complete`` reshapes to 8 heads) and SigLIP at 16 heads.
CONFIGS = {
    "pi0_two_cams": dict(
        type="pi0", vlm=dict(width=64, depth=3, mlp=96, kv_heads=1, head_dim=16),
        expert=dict(width=32, mlp=48, kv_heads=1, head_dim=16),
        vision=dict(hidden=32, layers=2, mlp=40, patch=8), resolution=32, vocab=320,
        cameras={"top": (48, 64), "wrist": (32, 32)}, empty_cameras=0,
        state_dim=6, action_dim=4, max_state_dim=8, max_action_dim=8, chunk_size=5, steps=3, max_tokens=16,
        norm={"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MEAN_STD"},
    ),
    "pi0_empty_cam_kv2": dict(
        type="pi0", vlm=dict(width=48, depth=2, mlp=80, kv_heads=2, head_dim=8),
        expert=dict(width=24, mlp=40, kv_heads=2, head_dim=8),
        vision=dict(hidden=48, layers=1, mlp=64, patch=7), resolution=28, vocab=300,
        cameras={"front": (40, 30)}, empty_cameras=1,
        state_dim=5, action_dim=6, max_state_dim=6, max_action_dim=6, chunk_size=6, steps=4, max_tokens=12,
        norm={"VISUAL": "IDENTITY", "STATE": "MIN_MAX", "ACTION": "MEAN_STD"},
    ),
    "pi05_two_cams": dict(
        type="pi05", vlm=dict(width=64, depth=2, mlp=96, kv_heads=1, head_dim=16),
        expert=dict(width=32, mlp=48, kv_heads=1, head_dim=16),
        vision=dict(hidden=32, layers=2, mlp=40, patch=8), resolution=32, vocab=320,
        cameras={"base": (32, 32), "left_wrist": (24, 40)}, empty_cameras=0,
        state_dim=4, action_dim=5, max_state_dim=8, max_action_dim=8, chunk_size=5, steps=3, max_tokens=48,
        norm={"VISUAL": "IDENTITY", "STATE": "QUANTILES", "ACTION": "QUANTILES"},
    ),
    "pi05_three_cams_mha": dict(
        type="pi05", vlm=dict(width=48, depth=3, mlp=64, kv_heads=8, head_dim=6),
        expert=dict(width=40, mlp=56, kv_heads=8, head_dim=6),
        vision=dict(hidden=32, layers=1, mlp=48, patch=4), resolution=16, vocab=300,
        cameras={"a": (16, 16), "b": (20, 12), "c": (16, 16)}, empty_cameras=1,
        state_dim=7, action_dim=3, max_state_dim=8, max_action_dim=4, chunk_size=4, steps=10, max_tokens=56,
        norm={"VISUAL": "IDENTITY", "STATE": "QUANTILE10", "ACTION": "MEAN_STD"},
    ),
}
EPISODES = {"pi0_two_cams": dict(episodes=10, length=12, fps=30), "pi05_two_cams": dict(episodes=10, length=12, fps=30)}
TASKS = ["pick up the red cube", "Open_the top DRAWER and\nput the bowl on the plate", "push"]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>"]


def make_tokenizer(out: Path) -> None:
    """A small Gemma-style fast tokenizer: "▁"-prefixed BPE, single digits, <bos> prepended, <pad> = 0."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    corpus = TASKS + [t.lower() for t in TASKS] + ["Task: open the drawer, State: 12 200 3 45;\nAction: ",
                                                    "stack the blocks", "close the microwave", "0 1 2 3 4 5 6 7 8 9"] * 5
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("▁", "merged_with_next"),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    tok.decoder = decoders.Replace("▁", " ")
    tok.train_from_iterator(corpus * 10, trainers.BpeTrainer(vocab_size=260, special_tokens=SPECIAL,
                                                             initial_alphabet=list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:;,.\n▁-_")))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>", model_max_length=512)
    hf.save_pretrained(out)


def shrink_lerobot(c: dict) -> None:
    """Make lerobot's pi0 / pi05 build at this configuration's sizes (see the module docstring)."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    def gemma_config(variant: str):
        d = c["vlm"] if variant == "gemma_2b" else c["expert"]
        return modeling_pi0.GemmaConfig(width=d["width"], depth=c["vlm"]["depth"], mlp_dim=d["mlp"], num_heads=8,
                                        num_kv_heads=d["kv_heads"], head_dim=d["head_dim"])

    for mod in (modeling_pi0, modeling_pi05):
        mod.get_gemma_config = gemma_config
        if not hasattr(mod, "_vlacompile_orig"):
            mod._vlacompile_orig = (mod.PaliGemmaForConditionalGenerationWithPiGemma, mod.PiGemmaForCausalLM)
        vlm_cls, expert_cls = mod._vlacompile_orig

        def vlm(config, _cls=vlm_cls):
            v = config.vision_config
            v.hidden_size, v.num_hidden_layers = c["vision"]["hidden"], c["vision"]["layers"]
            v.intermediate_size, v.patch_size = c["vision"]["mlp"], c["vision"]["patch"]
            v.projection_dim = c["vlm"]["width"]
            config.text_config.num_image_tokens = (v.image_size // v.patch_size) ** 2
            config.text_config.vocab_size = c["vocab"]
            config._vocab_size = c["vocab"]
            config.image_token_index = c["vocab"] - 1
            return _cls(config=config)

        def expert(config, _cls=expert_cls):
            config.vocab_size = c["vocab"]
            return _cls(config=config)

        mod.PaliGemmaForConditionalGenerationWithPiGemma = vlm
        mod.PiGemmaForCausalLM = expert


def local_tokenizer_steps(tokenizer_dir: Path) -> None:
    """lerobot's pi processors name the gated hub tokenizer; point them at the local one."""
    from lerobot.policies.pi0 import processor_pi0
    from lerobot.policies.pi05 import processor_pi05
    from lerobot.processor import TokenizerProcessorStep

    def step(**kw):
        kw["tokenizer_name"] = str(tokenizer_dir)
        return TokenizerProcessorStep(**kw)

    processor_pi0.TokenizerProcessorStep = step
    processor_pi05.TokenizerProcessorStep = step


def make_stats(c: dict, rng: np.random.Generator) -> dict:
    def stats(dim: int, scale: float) -> dict:
        mean = rng.normal(0, scale, dim)
        std = rng.uniform(0.2, 1.5, dim) * scale
        return {"mean": mean, "std": std, "min": mean - 2.5 * std, "max": mean + 2.5 * std,
                "q01": mean - 2 * std, "q99": mean + 2 * std, "q10": mean - 1.2 * std, "q50": mean,
                "q90": mean + 1.2 * std, "count": np.array([1000])}

    out = {"observation.state": stats(c["state_dim"], 0.8), "action": stats(c["action_dim"], 0.5)}
    for cam in c["cameras"]:
        out[f"observation.images.{cam}"] = {k: np.full((3, 1, 1), v) for k, v in
                                            {"mean": 0.45, "std": 0.25, "min": 0.0, "max": 1.0}.items()}
    return {k: {s: torch.tensor(np.asarray(a), dtype=torch.float32) for s, a in d.items()} for k, d in out.items()}


def generate(name: str, c: dict, root: Path) -> None:
    import lerobot
    import transformers
    from safetensors.torch import save_file

    from lerobot.configs.types import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    if c["type"] == "pi0":
        from lerobot.policies.pi0.configuration_pi0 import PI0Config as Config
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy as PolicyCls
        from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors as make_processors
    else:
        from lerobot.policies.pi05.configuration_pi05 import PI05Config as Config
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy as PolicyCls
        from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors as make_processors

    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    tok_dir, policy_dir = out / "tokenizer", out / "policy"
    make_tokenizer(tok_dir)
    shrink_lerobot(c)
    local_tokenizer_steps(tok_dir)
    seed = sum(map(ord, name))
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)

    inputs = {f"observation.images.{cam}": PolicyFeature(FeatureType.VISUAL, (3, h, w)) for cam, (h, w) in c["cameras"].items()}
    inputs["observation.state"] = PolicyFeature(FeatureType.STATE, (c["state_dim"],))
    res = c["resolution"]
    config = Config(
        device="cpu", input_features=inputs, output_features={"action": PolicyFeature(FeatureType.ACTION, (c["action_dim"],))},
        normalization_mapping={k: NormalizationMode(v) for k, v in c["norm"].items()},
        chunk_size=c["chunk_size"], n_action_steps=c["chunk_size"], num_inference_steps=c["steps"],
        max_state_dim=c["max_state_dim"], max_action_dim=c["max_action_dim"], image_resolution=(res, res),
        empty_cameras=c["empty_cameras"], tokenizer_max_length=c["max_tokens"],
    )
    policy = PolicyCls(config)
    with torch.no_grad():  # default inits leave biases at 0, norms at 0 and adaRMS dense at 0: perturb them
        for pname, p in policy.named_parameters():
            if pname.endswith("bias") or "norm" in pname:
                p.add_(torch.randn_like(p) * 0.1)
            if ".dense." in pname:
                p.add_(torch.randn_like(p) * 0.05)
    pre, post = make_processors(config, dataset_stats=make_stats(c, rng))
    policy.save_pretrained(policy_dir)
    pre.save_pretrained(policy_dir)
    post.save_pretrained(policy_dir)

    # What a user has: everything loaded back from disk.
    policy = PolicyCls.from_pretrained(policy_dir).eval()
    pre = PolicyProcessorPipeline.from_pretrained(policy_dir, config_filename="policy_preprocessor.json")
    post = PolicyProcessorPipeline.from_pretrained(
        policy_dir, config_filename="policy_postprocessor.json",
        to_transition=policy_action_to_transition, to_output=transition_to_policy_action)

    arrays, cases = {}, []
    for i, task in enumerate(TASKS):
        frames = {cam: rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for cam, (h, w) in c["cameras"].items()}
        state = rng.normal(0, 1.2, c["state_dim"]).astype(np.float32)
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
        arrays[f"{i}.actions_normalized"] = raw[0].float()
        arrays[f"{i}.actions"] = actions[0].float()
        cases.append({"task": task, "cameras": list(c["cameras"])})
    save_file({k: v.contiguous() for k, v in arrays.items()}, str(out / "cases.safetensors"))
    (out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    pre_json = policy_dir / "policy_preprocessor.json"
    pre_json.write_text(pre_json.read_text().replace(json.dumps(str(tok_dir)), json.dumps(PALIGEMMA)))
    meta = {"generated_by": "tests/families/pi0/make_fixtures.py", "lerobot": lerobot.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "config": c}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"{name}: {sum(p.numel() for p in policy.parameters())} params, actions {tuple(actions.shape)}", flush=True)


def make_episodes(name: str, c: dict, root: Path, e: dict) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("smolvla_fixtures", HERE.parent / "smolvla" / "make_fixtures.py")
    smolvla = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smolvla)
    smolvla.make_episodes(name, c, root, e)


def main() -> None:
    args = sys.argv[1:]
    episodes_only = "--episodes-only" in args  # the datasets alone, leaving the policies as they are
    args = [a for a in args if a != "--episodes-only"]
    root = Path(args[0]) if args else HERE / "fixtures"
    for name in args[1:] or list(CONFIGS):
        if not episodes_only:
            generate(name, CONFIGS[name], root)
        if name in EPISODES:
            make_episodes(name, CONFIGS[name], root, EPISODES[name])


if __name__ == "__main__":
    main()
