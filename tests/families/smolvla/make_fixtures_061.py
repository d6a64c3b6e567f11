"""Generate the SmolVLA fixtures of lerobot 0.6.1 (transformers 5) WITH LEROBOT, in the side
environment, never in CI. vlacompile is imported from this checkout (the side environment has its
few dependencies):

    bash ../shared/lerobot-side/setup.sh /work/side 061          # lerobot 0.6.1 in /work/side/venv061
    PYTHONPATH=. /work/side/venv061/bin/python tests/families/smolvla/make_fixtures_061.py

It writes three kinds of fixture, all computed by lerobot 0.6.1:

* ``fixtures/<name>/lerobot061.safetensors`` (+ ``lerobot061.json``): the policies make_fixtures.py
  saved with lerobot 0.4.4, loaded by lerobot 0.6.1 and run on the same cases (same frames, state,
  task and noise): what lerobot's preprocessor made of them and the chunks it returned. The same
  checkpoint and inputs under both stacks; they differ in the vision tower's patch position ids.
* ``fixtures061/<name>/``: policies saved by lerobot 0.6.1 (``make_fixtures.generate``: its
  config.json has ``pretrained_revision``), with cases and chunks, as make_fixtures.py makes them.
* ``students061/<name>.json`` + ``.safetensors``: a student vlacompile writes in lerobot's layout
  (a layer- and MLP-sliced copy of a teacher above, no training, so a test rebuilds it byte for
  byte), loaded by lerobot 0.6.1 with ``SmolVLAPolicy.from_pretrained`` from inside its directory
  (lerobot resolves ``vlm_model_name = "vlm"`` there), as its files are: the sha256 of every file
  lerobot read, the missing / unexpected keys lerobot logged (and those it logs for a policy it
  saved itself), its error where it refuses the student, and its chunks on the teacher's cases.

Regenerate rather than edit. The committed outputs are small: no student weights (tests rebuild
them), one tiny 0.6.1-saved policy.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_fixtures import generate  # noqa: E402

GENERATED_BY = "tests/families/smolvla/make_fixtures_061.py"

# Policies saved by lerobot 0.6.1. Small on purpose (a few hundred KB): the four fixtures/ policies
# run under lerobot 0.6.1 already cover the layouts; this one covers what lerobot 0.6.1 writes.
CONFIGS_061 = {
    "two_cams_061": dict(
        vlm=dict(hidden=32, layers=4, heads=4, kv_heads=2, vision_hidden=16, vision_layers=2, image=64, scale=2,
                 bos=False),
        cameras={"front": (48, 64), "wrist": (64, 64)},  # one resized with padding (64x48 -> 64x64)
        state_dim=5, action_dim=4, chunk_size=6, num_steps=4, num_vlm_layers=4, num_expert_layers=-1,
        self_attn_every_n_layers=2, attention_mode="cross_attn", max_state_dim=6, max_action_dim=6,
        tokenizer_max_length=12, pad_language_to="longest", expert_width_multiplier=0.5,
        norm={"VISUAL": "IDENTITY", "STATE": "MEAN_STD", "ACTION": "MIN_MAX"},
        bf16_backbone=True, add_image_special_tokens=False, empty_cameras=0, prefix_length=-1,
        position_embedding_std=1.0,  # so the patch positions decide the chunk visibly, as in trained policies
    ),
}

# Students vlacompile writes: the teacher fixture, the lerobot version named for it (None: detected),
# the layers kept per part, the MLP channels kept per part (one width, or one per kept layer; None: all),
# the flow steps (None: the teacher's).
STUDENTS = {
    # The 0.6.1-saved teacher, half its vision and VLM layers, 2 flow steps (the default recipes' shape).
    "half_layers_061": dict(teacher="fixtures061/two_cams_061", lerobot_version=None,
                            layers={"vision": 0.5, "backbone": 0.5}, mlp=None, flow_steps=2),
    # A lerobot 0.4.4 checkpoint run with lerobot 0.6.1: bf16 backbone, image special tokens, an
    # empty camera, self-attention every 3rd layer; half the layers and one MLP width per part.
    "half_layers_narrow_mlp": dict(teacher="fixtures/two_cams_every3", lerobot_version="0.6",
                                   layers={"vision": 0.5, "backbone": 0.5}, mlp={"vision": 64, "backbone": 128}),
    # MLP widths that differ per layer: lerobot builds one width per part and cannot load it.
    "per_layer_mlp": dict(teacher="fixtures061/two_cams_061", lerobot_version=None,
                          layers={"vision": 0.5, "backbone": 0.5}, mlp={"backbone": [48, 64]}),
}


def lerobot_pipelines(policy_dir: Path, vlm_dir: Path | None = None):
    """The pre/post processor pipelines lerobot loads from ``policy_dir`` (tokenizer from ``vlm_dir``)."""
    from lerobot.processor import PolicyProcessorPipeline
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action

    overrides = {"tokenizer_processor": {"tokenizer_name": str(vlm_dir)}} if vlm_dir is not None else None
    pre = PolicyProcessorPipeline.from_pretrained(policy_dir, config_filename="policy_preprocessor.json", overrides=overrides)
    post = PolicyProcessorPipeline.from_pretrained(policy_dir, config_filename="policy_postprocessor.json",
                                                   to_transition=policy_action_to_transition, to_output=transition_to_policy_action)
    return pre, post


def lerobot_policy(policy_dir: Path, vlm_dir: Path | None = None):
    """``SmolVLAPolicy.from_pretrained`` (vlm_model_name pointed at ``vlm_dir`` when given), and the
    missing / unexpected keys lerobot logged while loading it."""
    import lerobot.policies.pretrained as pretrained
    from lerobot.configs.policies import PreTrainedConfig
    from lerobot.policies.smolvla.modeling_smolvla import SmolVLAPolicy

    seen: dict[str, list[str]] = {}
    original = pretrained.log_model_loading_keys

    def record(missing, unexpected):
        seen.update(missing=sorted(missing), unexpected=sorted(unexpected))
        original(missing, unexpected)

    pretrained.log_model_loading_keys = record
    try:
        config = PreTrainedConfig.from_pretrained(policy_dir)
        if vlm_dir is not None:
            config.vlm_model_name = str(vlm_dir)
        policy = SmolVLAPolicy.from_pretrained(policy_dir, config=config).eval()
    finally:
        pretrained.log_model_loading_keys = original
    return policy, seen


def read_cases(root: Path):
    from safetensors.torch import load_file

    arrays = load_file(str(root / "cases.safetensors"))
    for i, case in enumerate(json.loads((root / "cases.json").read_text())):
        yield i, case, {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{i}.")}


def run_cases(policy, pre, post, root: Path) -> dict[str, torch.Tensor]:
    """lerobot on the fixture's cases (frames, state, task, noise): tokens, mask, normalised state, chunks."""
    out = {}
    for i, case, ref in read_cases(root):
        batch = {f"observation.images.{cam}": ref[f"image.{cam}"].permute(2, 0, 1).float() / 255.0 for cam in case["cameras"]}
        batch["observation.state"] = ref["state"]
        batch["task"] = case["task"]
        processed = pre(batch)
        with torch.no_grad():
            raw = policy.predict_action_chunk(processed, noise=ref["noise"][None].clone())
        out[f"{i}.tokens"] = processed["observation.language.tokens"][0].to(torch.int64)
        out[f"{i}.token_mask"] = processed["observation.language.attention_mask"][0].to(torch.int64)
        out[f"{i}.state_normalized"] = processed["observation.state"][0].float()
        out[f"{i}.actions_normalized"] = raw[0].float()
        out[f"{i}.actions"] = post(raw)[0].float()
    return out


def versions() -> dict[str, str]:
    import lerobot
    import transformers

    return {"lerobot": lerobot.__version__, "transformers": transformers.__version__, "torch": torch.__version__}


def cross_stack(root: Path) -> None:
    """The lerobot 0.4.4 fixtures' policies, run by lerobot 0.6.1 on their own cases."""
    from safetensors.torch import load_file, save_file

    for fx in sorted(p for p in root.iterdir() if p.is_dir()):
        policy, keys = lerobot_policy(fx / "policy", fx / "vlm")
        pre, post = lerobot_pipelines(fx / "policy", fx / "vlm")
        arrays = run_cases(policy, pre, post, fx)
        save_file({k: v.contiguous() for k, v in arrays.items()}, str(fx / "lerobot061.safetensors"))
        old = {k: v for k, v in load_file(str(fx / "cases.safetensors")).items() if k.endswith(".actions")}
        diff = max(float((arrays[k] - v).abs().max()) for k, v in old.items())
        meta = {"generated_by": GENERATED_BY, **versions(),
                "what": "this directory's policy (saved by lerobot 0.4.4) loaded by lerobot 0.6.1 and run on cases.safetensors",
                "load_keys": keys, "max_abs_diff_vs_lerobot_044": diff}
        (fx / "lerobot061.json").write_text(json.dumps(meta, indent=2) + "\n")
        print(f"{fx.name}: lerobot 0.6.1 vs 0.4.4 on the same checkpoint: max |diff| {diff:.3g}", flush=True)


def file_hashes(d: Path) -> dict[str, str]:
    return {p.relative_to(d).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def make_student(spec: dict, out: Path):
    """The student as vlacompile writes it (test_lerobot061.py rebuilds it with the same helper)."""
    from lerobot_students import build_student

    return build_student(HERE / spec["teacher"], spec, out)


def students(root: Path) -> None:
    from safetensors.torch import save_file

    root.mkdir(exist_ok=True)
    work = Path(os.environ.get("TMPDIR", "/tmp")) / "vlacompile-students061"
    shutil.rmtree(work, ignore_errors=True)
    for name, spec in STUDENTS.items():
        student, gaps = make_student(spec, work / name)
        teacher_dir = HERE / spec["teacher"]
        _, own_keys = lerobot_policy(teacher_dir / "policy", teacher_dir / "vlm")
        record = {"generated_by": GENERATED_BY, **versions(), "student": spec, "vlacompile_gaps": gaps,
                  "files": file_hashes(work / name), "lerobot_keys_of_its_own_save": own_keys}
        cwd = os.getcwd()
        try:
            os.chdir(work / name)  # lerobot resolves vlm_model_name / tokenizer_name "vlm" against the working directory
            with contextlib.redirect_stdout(sys.stderr):
                policy, keys = lerobot_policy(Path("."))
                pre, post = lerobot_pipelines(Path("."))
            record["lerobot_keys"] = keys
            arrays = run_cases(policy, pre, post, teacher_dir)
            save_file({k: v.contiguous() for k, v in arrays.items()}, str(root / f"{name}.safetensors"))
            record["loaded"] = True
            record["vision_layers_built"] = len(policy.model.vlm_with_expert.get_vlm_model().vision_model.encoder.layers)
        except Exception as e:  # lerobot refuses the student: what it said
            record.update(loaded=False, error=f"{type(e).__name__}: {str(e)[:600]}")
            (root / f"{name}.safetensors").unlink(missing_ok=True)
        finally:
            os.chdir(cwd)
        (root / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"student {name}: loaded by lerobot 0.6.1: {record['loaded']}; keys {record.get('lerobot_keys')}; "
              f"gaps {gaps}", flush=True)


def main() -> None:
    import lerobot

    assert lerobot.__version__.startswith("0.6"), f"run this with lerobot 0.6.x, not {lerobot.__version__}"
    torch.set_num_threads(1)
    what = sys.argv[1:] or ["cross", "fixtures061", "students"]
    if "cross" in what:
        cross_stack(HERE / "fixtures")
    if "fixtures061" in what:
        for name, c in CONFIGS_061.items():
            generate(name, c, HERE / "fixtures061", generated_by=GENERATED_BY)
    if "students" in what:
        students(HERE / "students061")


if __name__ == "__main__":
    main()
