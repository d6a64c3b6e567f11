"""An ONNX policy's hooks. It is a teacher only: verify compares students with it and distillation
learns from its outputs, but it has no layers vlacompile may keep, prune or quantise, so every
student hook says to distil into another family (``distill.student``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from vlacompile.checkpoint import read_config, sha256_file
from vlacompile.errors import CheckpointError, ConfigError
from vlacompile.families.base import Family, SplitPlan
from vlacompile.families.onnx_policy.configuration import FAMILY as NAME
from vlacompile.families.onnx_policy.configuration import IMAGE_PREFIX, GraphInput, OnnxPolicyConfig
from vlacompile.families.onnx_policy.modeling import OnnxPolicyModule
from vlacompile.families.onnx_policy.processor import OnnxPolicyPreprocessor
from vlacompile.policy import CameraSpec, FlowHead, InputSpec, Policy, PolicySpec

KEYS = ("observation.state", "task", "noise")
OPAQUE = "an ONNX teacher is opaque: vlacompile runs it but has none of its layers to keep, prune or quantise"
HINT = 'distil it into a student of another family: [[stages]] stage = "distill", student = { family = "vlacompile-reference", ... }'


class OnnxPolicyFamily(Family):
    name = NAME
    label = "ONNX policy (opaque)"
    parts = ()
    config_cls = OnnxPolicyConfig

    def matches(self, config_json: dict[str, Any]) -> bool:
        return config_json.get("model_type") == NAME

    def load(self, ckpt: Path, *, allow_pickle: bool = False, tokenizer: Path | None = None,
             allow_unnormalized: bool = False) -> Policy:
        manifest = read_config(ckpt)
        cfg = _resolve(ckpt, manifest, tokenizer)
        graph = ckpt / cfg.graph
        module = OnnxPolicyModule(cfg, str(graph))
        meta = {"source": str(ckpt), "weights_sha256": sha256_file(graph), "format": "ONNX graph with a vlacompile manifest",
                "opaque": True, "tokenizer": cfg.tokenizer}
        return Policy(module=module, config=cfg, spec=self.spec_of(module), family=NAME, meta=meta)

    def save(self, policy: Policy, out: Path) -> Path:
        import shutil

        cfg: OnnxPolicyConfig = policy.config
        src = Path(policy.module.graph_path)
        shutil.copyfile(src, out / cfg.graph)
        for extra in src.parent.glob(src.name + ".data"):
            shutil.copyfile(extra, out / extra.name)
        (out / "config.json").write_text(json.dumps(cfg.source["manifest"], indent=2) + "\n")
        return out

    def build(self, config: OnnxPolicyConfig):
        raise ConfigError(f"{OPAQUE}: it cannot be built from a config", source="onnx-policy", hint=HINT)

    def input_names(self, cfg: OnnxPolicyConfig) -> tuple[str, ...]:
        names = [f"images.{c.key[len(IMAGE_PREFIX):]}" for c in cfg.cameras]
        if cfg.input("observation.state") is not None:
            names.append("state")
        if cfg.input("task") is not None:
            names.append("tokens")
            if cfg.input("token_mask") is not None:
                names.append("token_mask")
        return (*names, "noise")

    def spec_of(self, module: OnnxPolicyModule) -> PolicySpec:
        cfg = module.cfg
        inputs = []
        cameras = []
        for c in cfg.cameras:
            h, w = cfg.camera_hw(c)
            name = c.key[len(IMAGE_PREFIX):]
            cameras.append(CameraSpec(name, h, w))
            inputs.append(InputSpec(f"images.{name}", (3, h, w), "uint8", "image", camera=name))
        if cfg.input("observation.state") is not None:
            inputs.append(InputSpec("state", (cfg.state_dim,), "float32", "state"))
        if cfg.input("task") is not None:
            inputs.append(InputSpec("tokens", (cfg.max_length,), "int64", "tokens", low=0, high=2))
            if cfg.input("token_mask") is not None:
                inputs.append(InputSpec("token_mask", (cfg.max_length,), "bool", "token_mask"))
        inputs.append(InputSpec("noise", cfg.noise_shape, "float32", "noise"))
        settings = {"tokenizer_dir": cfg.tokenizer or "", "max_length": cfg.max_length, "padding_side": cfg.padding_side,
                    "prompt": cfg.prompt}
        return PolicySpec(
            family=NAME, cameras=tuple(cameras), state_dim=cfg.state_dim, action_dim=cfg.action_dim,
            chunk_size=cfg.chunk_size, flow_steps=1, max_tokens=cfg.max_length, control_hz=cfg.control_hz,
            action_mean=(0.0,) * cfg.action_dim, action_std=(1.0,) * cfg.action_dim,
            system2=(), system1=(), inputs=tuple(inputs), head=FlowHead(1, 0.0, 1.0, cfg.noise_shape),
            processor=tuple(sorted(settings.items())), state_names=cfg.state_names, action_names=cfg.action_names,
        )

    def preprocessor(self, spec: PolicySpec) -> OnnxPolicyPreprocessor:
        return OnnxPolicyPreprocessor(spec)

    def format_info(self, policy: Policy) -> dict[str, Any]:
        return {"family": NAME, "label": self.label, "format": policy.meta.get("format"), "opaque": True,
                "opaque_note": "the teacher is an ONNX graph: no layer initialisation, pruning or quantisation of the teacher; "
                               "students are initialised by their own family and learn from its outputs"}

    # -- students: none of its own ------------------------------------------------------------

    def _opaque(self, *args, **kwargs):
        raise ConfigError(OPAQUE, source="recipe", hint=HINT)

    depths = mlp_widths = student_config = prune_groups = pruned_config = restructure = split_plan = _opaque

    def resolve_layers(self, config, request, source):
        raise ConfigError(OPAQUE, source=source, hint=HINT)

    def action_scale(self, policy: Policy):
        import torch

        return torch.ones(policy.config.action_dim)

    def default_quant_excludes(self, config) -> tuple[str, ...]:
        return ()

    def flops(self, config) -> dict[str, float] | None:
        return None  # unknown: the report gives no roofline for an opaque teacher


def _resolve(ckpt: Path, m: dict[str, Any], tokenizer: Path | None) -> OnnxPolicyConfig:
    src = ckpt / "config.json"
    for key in ("graph", "inputs"):
        if key not in m:
            raise CheckpointError(f"the ONNX policy manifest has no {key!r}", source=src,
                                  hint='see vlacompile/families/onnx_policy/configuration.py for the manifest\'s fields')
    graph = ckpt / str(m["graph"])
    if not graph.is_file():
        raise CheckpointError(f"names the graph {m['graph']!r}, which is missing", source=src, hint="copy the ONNX file beside config.json")
    import onnx

    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as e:  # protobuf raises its own DecodeError
        raise CheckpointError(f"is not a readable ONNX graph ({e})", source=graph, hint="re-export or copy the graph again") from None
    sess_inputs = {i.name: i for i in model.graph.input}
    init_names = {t.name for t in model.graph.initializer}
    graph_inputs = {k: v for k, v in sess_inputs.items() if k not in init_names}

    def shape_of(vi) -> list:
        return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in vi.type.tensor_type.shape.dim]

    def dtype_of(vi) -> str:
        name = {1: "float32", 2: "uint8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64"}.get(vi.type.tensor_type.elem_type)
        if name is None:
            raise CheckpointError(f"graph input {vi.name!r} has an element type vlacompile does not feed", source=graph)
        return name

    mapping = dict(m["inputs"])
    if m.get("token_mask"):
        mapping["token_mask"] = m["token_mask"]
    unknown = [k for k in mapping if not (k.startswith(IMAGE_PREFIX) or k in (*KEYS, "token_mask"))]
    if unknown:
        raise CheckpointError(f"the manifest maps {unknown}, which are not LeRobot keys vlacompile feeds", source=src,
                              hint=f"map {IMAGE_PREFIX}<camera>, observation.state, task, noise (and token_mask)")
    missing = sorted(set(graph_inputs) - set(mapping.values()))
    if missing:
        raise CheckpointError(f"the graph takes inputs {missing} that the manifest does not map", source=src,
                              hint="map every graph input to a LeRobot key in \"inputs\"")
    absent = sorted(n for n in mapping.values() if n not in graph_inputs)
    if absent:
        raise CheckpointError(f"the manifest maps graph inputs {absent} that the graph does not have (it has {sorted(graph_inputs)})",
                              source=src)
    layout = str(m.get("image_layout", "NCHW"))
    if layout not in ("NCHW", "NHWC"):
        raise CheckpointError(f"image_layout is {layout!r}; it is NCHW or NHWC", source=src)
    inputs, batches = [], set()
    for key, name in mapping.items():
        vi = graph_inputs[name]
        shape = shape_of(vi)
        if any(not isinstance(d, int) for d in shape[1:]):
            raise CheckpointError(f"graph input {name!r} has a dynamic dimension besides the batch ({shape})", source=graph,
                                  hint="export the policy with static shapes (all but the batch)")
        batches.add(shape[0] if isinstance(shape[0], int) else None)
        inputs.append(GraphInput(key, name, dtype_of(vi), tuple(shape[1:])))
    if len(batches) > 1:
        raise CheckpointError(f"the graph's inputs disagree on the batch size ({batches})", source=graph)
    outputs = {o.name: o for o in model.graph.output}
    out_name = str(m.get("output") or model.graph.output[0].name)
    if out_name not in outputs:
        raise CheckpointError(f"names the output {out_name!r}; the graph has {sorted(outputs)}", source=src)
    out_shape = shape_of(outputs[out_name])
    if len(out_shape) != 3 or not all(isinstance(d, int) for d in out_shape[1:]):
        raise CheckpointError(f"output {out_name!r} has shape {out_shape}; a policy emits [batch, chunk, action_dim]", source=graph)
    chunk, action_dim = out_shape[1], out_shape[2]
    if "chunk_size" in m and int(m["chunk_size"]) != chunk:
        raise CheckpointError(f"chunk_size is {m['chunk_size']} but the graph emits chunks of {chunk}", source=src)
    names = m.get("action_names")
    if names is not None and len(names) != action_dim:
        raise CheckpointError(f"action_names lists {len(names)} names for {action_dim} actions", source=src)
    by_key = {i.key: i for i in inputs}
    cams = [i for i in inputs if i.key.startswith(IMAGE_PREFIX)]
    for c in cams:
        ok = len(c.shape) == 3 and (c.shape[0] == 3 if layout == "NCHW" else c.shape[2] == 3)
        if not ok:
            raise CheckpointError(f"camera input {c.name!r} has shape {list(c.shape)}; with image_layout {layout} it should be "
                                  f"{'[3, H, W]' if layout == 'NCHW' else '[H, W, 3]'}", source=graph)
    if not cams:
        raise CheckpointError("the manifest maps no camera (observation.images.<name>)", source=src)
    state_dim = by_key["observation.state"].shape[0] if "observation.state" in by_key else 0
    tok_dir, max_length = None, 0
    if "task" in by_key:
        max_length = by_key["task"].shape[0]
        cand = tokenizer or (ckpt / str(m["tokenizer"]) if m.get("tokenizer") else None)
        if cand is None or not (Path(cand) / "tokenizer.json").is_file():
            raise CheckpointError("the graph takes the task as tokens, but no tokenizer directory (tokenizer.json) is given",
                                  source=src, hint='set "tokenizer" in the manifest or pass --tokenizer')
        tok_dir = str(cand)
    if "noise" in by_key and len(by_key["noise"].shape) != 2:
        raise CheckpointError(f"the noise input has shape {list(by_key['noise'].shape)}; vlacompile feeds [chunk, dim]", source=graph)
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    size = graph.stat().st_size + sum(p.stat().st_size for p in ckpt.glob("*.data"))
    return OnnxPolicyConfig(
        graph=str(m["graph"]), inputs=tuple(inputs), output=out_name, chunk_size=chunk, action_dim=action_dim,
        state_dim=state_dim, image_layout=layout, static_batch=batches.pop(), action_names=tuple(names) if names else None,
        state_names=tuple(m["state_names"]) if m.get("state_names") else None, tokenizer=tok_dir, max_length=max_length,
        padding_side=str(m.get("padding_side", "right")), prompt=str(m.get("prompt", "{task}")), control_hz=float(m.get("control_hz", 0.0)), parameters=params,
        weight_bytes=size, source={"manifest": m},
    )


FAMILY = OnnxPolicyFamily()  # what the registry (vlacompile.families) reads
