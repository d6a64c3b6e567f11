"""SmolVLA's configuration, resolved: lerobot's ``config.json`` and processor pipelines, plus the
SmolVLM2 backbone's ``config.json`` (which lerobot reads by ``vlm_model_name``), in one frozen
dataclass that says every size the module needs.

Layer layout (lerobot ``smolvlm_with_expert.py``; the rules the module follows and students keep):

* the VLM keeps its first ``num_vlm_layers`` text layers; the expert has ``num_expert_layers``
  (``num_expert_layers <= 0``: as many as the VLM), and expert layer ``e`` sits at VLM layer
  ``e * m`` with ``m = num_vlm_layers // num_expert_layers``; other VLM layers have no expert;
* in ``cross_attn`` mode, layer ``i`` is self-attention when ``self_attn_every_n_layers > 0`` and
  ``i % n == 0`` (the expert's queries attend over [VLM K/V ; its own K/V]), else cross-attention
  (the expert's ``k_proj``/``v_proj`` map the cached VLM K/V); in any other mode every layer is
  self-attention;
* expert layer ``e``'s K/V projections take the VLM's K/V width when ``e`` is not a self-attention
  index in cross mode (lerobot reshapes them by the *expert* index), else the expert's width.
  A configuration where a self-attention layer has no expert, or an expert's projections do not
  fit the layer it sits at, does not run in lerobot either: it is refused with that reason.

Which lerobot runs the policy decides one computation: the vision tower's patch position ids,
which transformers computes (``SmolVLMVisionEmbeddings``). lerobot 0.4.x runs transformers 4,
which bucketises patch ``i`` of ``n`` at ``i / n * (1 - 1e-6)``; lerobot 0.5 and 0.6 run
transformers 5, which bucketises it at ``clamp(i * (1 / n), max=1 - 1e-6)``. On an 8 x 8 grid the
ids per row are 0, 0, 1, .., 6 against 0, 1, .., 7, and the same checkpoint's chunks differ by
tenths. Everything else SmolVLA computes is the same in lerobot 0.4.4 and 0.6.1 (their
``policies/smolvla`` and processor steps compared line by line).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vlacompile.errors import CheckpointError, ConfigError
from vlacompile.lerobot.policy_dir import Camera  # noqa: F401  (SmolVLAConfig.cameras)

FAMILY = "smolvla"

# The two conventions (``patch_positions``) and the lerobot releases that run each.
PATCH_POSITIONS = {"transformers4": "i / n * (1 - 1e-6)", "transformers5": "clamp(i * (1 / n), max=1 - 1e-6)"}
PATCH_LABELS = {"transformers4": "lerobot 0.4.x / transformers 4", "transformers5": "lerobot >= 0.5 / transformers 5"}
LEROBOT_VERSIONS = {"0.4": "transformers4", "0.5": "transformers5", "0.6": "transformers5"}


def parse_lerobot_version(text: str, source: str = "--lerobot-version") -> str:
    """``"0.6.1"``, ``"v0.4.4"``, ``"0.5"`` -> the release line ``"0.6"`` / ``"0.4"`` / ``"0.5"``."""
    parts = str(text).strip().lstrip("vV").split(".")
    line = ".".join(parts[:2])
    if len(parts) < 2 or line not in LEROBOT_VERSIONS or not all(p.isdigit() for p in parts):
        raise ConfigError(f"lerobot version {text!r} is not one whose SmolVLA vlacompile implements",
                          source=source, hint=f"name the lerobot release you run the policy with: one of "
                          f"{', '.join(LEROBOT_VERSIONS)} (a patch version such as 0.6.1 is fine)")
    return line


def get_intermediate_size(hidden_dim: int, ffn_dim_multiplier: int = 4, multiple_of: int = 256) -> int:
    """The expert's MLP width from its hidden width (lerobot's ``get_intermediate_size``)."""
    hidden_dim = int(2 * hidden_dim / 3)
    hidden_dim = int(ffn_dim_multiplier * hidden_dim)
    return multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)


@dataclass(frozen=True)
class SmolVLAConfig:
    # Data.
    cameras: tuple[Camera, ...]
    state_key: str
    state_name: str  # the observation's key for the state (rename map applied backwards)
    state_dim: int
    action_dim: int
    empty_cameras: int
    # Action head.
    chunk_size: int
    num_steps: int
    max_state_dim: int
    max_action_dim: int
    min_period: float
    max_period: float
    # Images.
    resize: tuple[int, int] | None  # (width, height) of resize_imgs_with_padding, or None
    patch_positions: str  # "transformers4" | "transformers5": the vision tower's patch position ids (PATCH_POSITIONS)
    # Language.
    tokenizer_max_length: int
    padding: str  # "longest" | "max_length" (a static graph pads to max_length either way: same result)
    padding_side: str
    truncation: bool
    append_newline: bool  # smolvla_new_line_processor in the pipeline
    add_image_special_tokens: bool
    image_start_tokens: tuple[int, ...]  # [fake_image_token, global_image_token] ids
    image_end_tokens: tuple[int, ...]
    prefix_length: int
    # Attention layout.
    attention_mode: str
    self_attn_every_n_layers: int
    # Vision tower (SigLIP-style).
    vision_hidden: int
    vision_head_dim: int
    vision_heads: tuple[int, ...]  # per layer (head pruning keeps a per-layer count)
    vision_mlp: tuple[int, ...]
    vision_image_size: int
    patch_size: int
    vision_eps: float
    vision_act: str
    scale_factor: int
    # Text model (the VLM's first num_vlm_layers layers).
    text_hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    vocab_size: int
    text_act: str
    attention_bias: bool
    mlp_bias: bool
    text_mlp: tuple[int, ...]  # per VLM layer
    # Expert.
    expert_hidden: int
    expert_mlp: tuple[int, ...]  # per expert layer
    expert_kv_in: tuple[int, ...]  # per expert layer: input width of k_proj / v_proj
    # Normalisation modes (lerobot NormalizationMode names) and options.
    state_norm: str
    action_norm: str
    visual_norm: str
    adapt_to_pi_aloha: bool = False
    control_hz: float = 0.0  # lerobot's policy config records no rate (0: unknown; the target's budget decides)
    # Provenance: the lerobot config.json and processor pipelines this came from (written back on save).
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    # -- derived layout ----------------------------------------------------------------------

    @property
    def num_vlm_layers(self) -> int:
        return len(self.text_mlp)

    @property
    def num_expert_layers(self) -> int:
        return len(self.expert_mlp)

    @property
    def vision_layers(self) -> int:
        return len(self.vision_mlp)

    @property
    def expert_stride(self) -> int:
        return self.num_vlm_layers // self.num_expert_layers

    @property
    def cross(self) -> bool:
        return "cross" in self.attention_mode

    def is_self_attn(self, i: int) -> bool:
        """Whether VLM layer ``i`` is a self-attention layer when the expert runs."""
        n = self.self_attn_every_n_layers
        return not self.cross or (n > 0 and i % n == 0)

    def expert_at(self, i: int) -> int | None:
        """The expert layer at VLM layer ``i`` (lerobot ``get_model_layers``), or None."""
        m = self.expert_stride
        if m > 0 and i > 0 and i % m != 0:
            return None
        e = i // m if m > 0 else i
        return e if e < self.num_expert_layers else None

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def tokens_per_image(self) -> int:
        side = (self.resize[1] if self.resize else self.cameras[0].height) // self.patch_size
        side_w = (self.resize[0] if self.resize else self.cameras[0].width) // self.patch_size
        return side * side_w // self.scale_factor**2

    @property
    def num_images(self) -> int:
        return len(self.cameras) + self.empty_cameras

    @property
    def prefix_len(self) -> int:
        per_image = self.tokens_per_image + (len(self.image_start_tokens) + len(self.image_end_tokens) if self.add_image_special_tokens else 0)
        n = self.num_images * per_image + self.tokenizer_max_length + 1
        return max(n, self.prefix_length)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return {"model_type": FAMILY, **d}

    def validate(self, source: str) -> None:
        problems = []
        if self.num_expert_layers < 1 or self.num_vlm_layers % self.num_expert_layers:
            problems.append(f"{self.num_vlm_layers} VLM layers are not a multiple of {self.num_expert_layers} expert layers")
        if not self.cameras:
            problems.append("no camera features (VISUAL)")
        if self.state_dim > self.max_state_dim or self.action_dim > self.max_action_dim:
            problems.append(f"state/action dims {self.state_dim}/{self.action_dim} exceed max_state_dim/max_action_dim "
                            f"{self.max_state_dim}/{self.max_action_dim}")
        if self.resize is None and len({(c.height, c.width) for c in self.cameras}) > 1:
            problems.append("cameras of different sizes need resize_imgs_with_padding")
        for e in range(self.num_expert_layers):
            i = e * self.expert_stride
            want = self.kv_width if (self.cross and not self.is_self_attn(i)) else self.expert_hidden
            if self.expert_kv_in[e] != want:
                problems.append(
                    f"expert layer {e} sits at VLM layer {i}, a {'self' if self.is_self_attn(i) else 'cross'}-attention layer, "
                    f"but its k_proj/v_proj take {self.expert_kv_in[e]} channels, not {want} (lerobot cannot run this either)")
        for i in range(self.num_vlm_layers):
            if self.is_self_attn(i) and self.expert_at(i) is None:
                problems.append(f"VLM layer {i} is self-attention but has no expert layer (lerobot cannot run this either)")
        if self.patch_positions not in PATCH_POSITIONS:
            problems.append(f"patch_positions is {self.patch_positions!r}, not one of {sorted(PATCH_POSITIONS)}")
        if problems:
            raise CheckpointError("; ".join(problems), source=source,
                                  hint="the num_vlm_layers / num_expert_layers / self_attn_every_n_layers combination is not one SmolVLA runs")

    def with_layers(self, **changes) -> "SmolVLAConfig":
        return replace(self, **changes)
