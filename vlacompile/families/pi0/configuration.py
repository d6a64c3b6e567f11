"""pi0 / pi0.5's configuration, resolved: lerobot's ``config.json``, its processor pipelines and the
sizes the weights say, in one frozen dataclass.

lerobot (>= 0.5) builds these from openpi's PaliGemma + Gemma expert (``policies/pi0``, ``pi05``,
``pi_gemma.py``):

* a SigLIP tower (PaliGemma's: 16 heads, patch embedding, learned positions, no pooling head)
  and ``multi_modal_projector`` into the Gemma width; images resized with centred padding to the
  square ``image_resolution`` and mapped to [-1, 1];
* a Gemma backbone over [image tokens; language tokens x sqrt(width)], bidirectional over valid
  tokens, whose per-layer K/V (after RoPE) are the cache;
* a Gemma expert, layer for layer beside the backbone (same depth, same K/V heads and head dim),
  over the suffix: pi0 [state_proj(state); action_time_mlp(action_in_proj(x_t), sincos(t))],
  pi0.5 [action_in_proj(x_t)] with the time entering through adaptive RMSNorm (``dense`` ->
  scale, shift, gate) in every expert norm;
* 8 query heads in both (lerobot's ``compute_layer_complete`` reshapes to 8 heads); head dim and
  K/V heads from the weights.

pi0.5 has no ``state_proj``: its preprocessor normalises the state and writes it into the prompt as
256-bin tokens (``Task: ..., State: 12 200 ...;\\nAction: ``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from vlacompile.errors import CheckpointError
from vlacompile.lerobot.policy_dir import Camera

FAMILY = "pi0"
VARIANTS = ("pi0", "pi05")
QUERY_HEADS = 8  # fixed by lerobot's compute_layer_complete (reshape to 1 * 8 * head_dim)
VISION_HEADS = 16  # PaliGemma's SigLIP; lerobot never changes it


@dataclass(frozen=True)
class Pi0Config:
    variant: str  # "pi0" | "pi05"
    # Data.
    cameras: tuple[Camera, ...]
    state_key: str
    state_name: str
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
    # Images: square resolution the tower takes (resize with centred padding when a camera differs).
    resolution: int
    # Language.
    tokenizer_max_length: int
    padding_side: str
    truncation: bool
    append_newline: bool  # pi0_new_line_processor in the pipeline (pi0)
    # Vision tower (SigLIP).
    vision_hidden: int
    vision_head_dim: int
    vision_heads: tuple[int, ...]  # per layer
    vision_mlp: tuple[int, ...]
    patch_size: int
    # Gemma backbone.
    width: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    text_mlp: tuple[int, ...]  # per layer
    # Gemma expert (same depth as the backbone).
    expert_width: int
    expert_mlp: tuple[int, ...]
    # Normalisation modes.
    state_norm: str
    action_norm: str
    visual_norm: str
    num_heads: int = QUERY_HEADS
    rms_eps: float = 1e-6
    vision_eps: float = 1e-6
    rope_theta: float = 10_000.0
    control_hz: float = 0.0
    source: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def pi05(self) -> bool:
        return self.variant == "pi05"

    @property
    def depth(self) -> int:
        return len(self.text_mlp)

    @property
    def vision_layers(self) -> int:
        return len(self.vision_mlp)

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def tokens_per_image(self) -> int:
        return (self.resolution // self.patch_size) ** 2

    @property
    def num_images(self) -> int:
        return len(self.cameras) + self.empty_cameras

    @property
    def prefix_len(self) -> int:
        return self.num_images * self.tokens_per_image + self.tokenizer_max_length

    @property
    def suffix_len(self) -> int:
        return self.chunk_size + (0 if self.pi05 else 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return {"model_type": FAMILY, **d}

    def validate(self, source: str) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(f"variant {self.variant!r} is not one of {VARIANTS}")
        if not self.cameras:
            problems.append("no camera features (VISUAL)")
        if len(self.expert_mlp) != self.depth:
            problems.append(f"the expert has {len(self.expert_mlp)} layers and the backbone {self.depth}; "
                            "lerobot runs them layer for layer, so they must match")
        if self.state_dim > self.max_state_dim or self.action_dim > self.max_action_dim:
            problems.append(f"state/action dims {self.state_dim}/{self.action_dim} exceed max_state_dim/max_action_dim "
                            f"{self.max_state_dim}/{self.max_action_dim}")
        if self.resolution % self.patch_size:
            problems.append(f"image_resolution {self.resolution} is not a multiple of the patch size {self.patch_size}")
        if self.num_heads % self.num_kv_heads:
            problems.append(f"{self.num_heads} query heads are not a multiple of {self.num_kv_heads} K/V heads")
        if problems:
            raise CheckpointError("; ".join(problems), source=source, hint="the checkpoint is not a pi0 / pi0.5 lerobot runs")

    def with_layers(self, **changes) -> "Pi0Config":
        return replace(self, **changes)
