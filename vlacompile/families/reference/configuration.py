"""The reference family's configuration: sizes of a policy, validated, round-tripping through config.json.

Per-layer head counts and MLP widths allow pruned (non-uniform) models.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from vlacompile.errors import CheckpointError

FAMILY = "vlacompile-reference"


@dataclass(frozen=True)
class ReferenceConfig:
    """Sizes of a reference-family policy. Per-layer lists allow pruned (non-uniform) models."""

    cameras: tuple[str, ...] = ("front",)
    image_size: int = 64
    patch_size: int = 8
    state_dim: int = 6
    action_dim: int = 4
    chunk_size: int = 16
    flow_steps: int = 10
    max_tokens: int = 32
    control_hz: float = 10.0
    head_dim: int = 32
    vision_width: int = 128
    vision_heads: tuple[int, ...] = (4, 4, 4, 4)
    vision_mlp: tuple[int, ...] = (512, 512, 512, 512)
    backbone_width: int = 128
    backbone_heads: tuple[int, ...] = (4, 4, 4, 4)
    backbone_mlp: tuple[int, ...] = (512, 512, 512, 512)
    expert_width: int = 128
    expert_heads: tuple[int, ...] = (4, 4, 4, 4)
    expert_mlp: tuple[int, ...] = (512, 512, 512, 512)

    @property
    def vision_depth(self) -> int:
        return len(self.vision_heads)

    @property
    def backbone_depth(self) -> int:
        return len(self.backbone_heads)

    @property
    def expert_depth(self) -> int:
        return len(self.expert_heads)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {"model_type": FAMILY, **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ReferenceConfig":
        d = dict(d)
        model_type = d.pop("model_type", None)
        if model_type != FAMILY:
            raise CheckpointError(f"model_type is {model_type!r}, expected {FAMILY!r}", source=source)
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise CheckpointError(
                f"unknown fields {unknown}",
                source=source,
                hint=f"the {FAMILY} family reads only {sorted(known)}; remove the others or check the checkpoint's family",
            )
        missing = sorted(set(known) - set(d))
        if missing:
            raise CheckpointError(
                f"missing fields {missing}", source=source, hint="re-save the checkpoint with vlacompile, or add the fields"
            )
        kwargs: dict[str, Any] = {}
        for name, value in d.items():
            default = known[name].default
            try:
                if isinstance(default, tuple):
                    if not isinstance(value, (list, tuple)):
                        raise TypeError
                    kwargs[name] = tuple(_as_str(v) if name == "cameras" else _as_int(v) for v in value)
                elif isinstance(default, float):
                    kwargs[name] = _as_float(value)
                else:
                    kwargs[name] = _as_int(value)
            except TypeError:
                raise CheckpointError(
                    f"field {name!r} has value {value!r} of the wrong type (expected like {default!r})", source=source
                ) from None
        cfg = cls(**kwargs)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "config") -> None:
        problems = []
        if not self.cameras:
            problems.append("no cameras")
        for name in ("image_size", "patch_size", "vision_width", "backbone_width", "expert_width"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.patch_size >= 1 and self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        for part in ("vision", "backbone", "expert"):
            heads, mlp = getattr(self, f"{part}_heads"), getattr(self, f"{part}_mlp")
            if len(heads) != len(mlp):
                problems.append(f"{part}_heads has {len(heads)} layers but {part}_mlp has {len(mlp)}")
            if any(h < 1 for h in heads) or any(m < 1 for m in mlp):
                problems.append(f"{part} has a layer with no heads or no MLP channels")
        for name in ("state_dim", "action_dim", "chunk_size", "flow_steps", "head_dim"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.max_tokens < 2:  # the tokenizer always writes bos and eos
            problems.append("max_tokens must be at least 2")
        if not (math.isfinite(self.control_hz) and self.control_hz > 0):
            problems.append(f"control_hz must be a positive number, got {self.control_hz}")
        if problems:
            raise CheckpointError("; ".join(problems), source=source)

    def shrink(
        self,
        *,
        vision_layers: list[int] | None = None,
        backbone_layers: list[int] | None = None,
        expert_layers: list[int] | None = None,
        mlp_ratio: float = 1.0,
        flow_steps: int | None = None,
    ) -> "ReferenceConfig":
        """A smaller config of the same family: keep the given layers, scale MLP widths."""

        def layers(part: str, keep: list[int] | None) -> list[int]:
            depth = len(getattr(self, f"{part}_heads"))
            if keep is None:
                return list(range(depth))
            bad = [i for i in keep if not 0 <= i < depth]
            if bad:
                raise ValueError(f"{part} layer indices {bad} are outside 0..{depth - 1}")
            return list(keep)

        def pick(part: str, keep: list[int] | None) -> dict[str, tuple[int, ...]]:
            idx = layers(part, keep)
            heads, mlp = getattr(self, f"{part}_heads"), getattr(self, f"{part}_mlp")
            return {
                f"{part}_heads": tuple(heads[i] for i in idx),
                f"{part}_mlp": tuple(max(8, int(round(mlp[i] * mlp_ratio))) for i in idx),
            }

        return replace(
            self,
            **pick("vision", vision_layers),
            **pick("backbone", backbone_layers),
            **pick("expert", expert_layers),
            flow_steps=self.flow_steps if flow_steps is None else flow_steps,
        )


def _as_int(value: Any) -> int:
    # JSON writers may emit 32.0 for 32; booleans, fractions, non-finite and non-numbers are errors.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    if isinstance(value, float) and not value.is_integer():
        raise TypeError
    return int(value)


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError
    try:
        return float(value)
    except OverflowError:  # an integer beyond float range
        raise TypeError from None


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError
    return value
