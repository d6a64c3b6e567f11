"""The reference VLA family: pi0 / GR00T in miniature.

    images ──ViT (shared over cameras)──┐
                                        ├─▶ decoder-only backbone ─▶ prefix features      "System 2"
    instruction ──byte tokens──────────┘                                (once per chunk)
    noise x_0 ──▶ K Euler steps of the flow-matching action expert ──▶ action chunk    "System 1"
                  (self-attention over [state, H action tokens], cross-attention to the prefix)

Layers are written timm-style (fused qkv, ``unbind``) and every block may have its own number of
heads and MLP width, so structured pruning can remove heads and channels for real and the pruned
model still round-trips through ``config.json``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlacompile.families.reference.configuration import FAMILY, ReferenceConfig
from vlacompile.families.reference.processor import PAD_ID, VOCAB_SIZE
from vlacompile.policy import CameraSpec, PolicySpec

NEG_INF = -1e4  # additive mask value that stays finite in FP16

# ---------------------------------------------------------------------------------------------
# Layers


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # Written out (not F.scaled_dot_product_attention) so the exported graph is plain
    # MatMul/Softmax that every runtime and quantiser understands.
    scores = torch.matmul(q, k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores + mask
    return torch.matmul(scores.softmax(dim=-1), v)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.qkv = nn.Linear(dim, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = _attend(q, k, v, mask).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(out)


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = heads, head_dim
        self.q = nn.Linear(dim, heads * head_dim)
        self.kv = nn.Linear(context_dim, 2 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None, kv: torch.Tensor | None = None) -> torch.Tensor:
        """``kv``: ``self.kv(context)`` when the caller has it (the same for every flow step)."""
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.q(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        kv = (self.kv(context) if kv is None else kv).reshape(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        out = _attend(q, k, v, mask).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim)
        return self.proj(out)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; with ``context_dim`` it also cross-attends (action expert)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int, context_dim: int | None = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, head_dim)
        self.cross = None
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(dim)
            self.cross = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp)

    def forward(self, x, mask=None, context=None, context_mask=None, context_kv=None):
        x = x + self.attn(self.norm1(x), mask)
        if self.cross is not None:
            x = x + self.cross(self.norm_cross(x), context, context_mask, context_kv)
        return x + self.mlp(self.norm2(x))


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow time t in [0, 1] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * 1000.0 * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb  # odd widths (e.g. after pruning) get a zero column


# ---------------------------------------------------------------------------------------------
# The policy


class VisionEncoder(nn.Module):
    """A SigLIP-like ViT shared over cameras, with a learned camera embedding."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        w = cfg.vision_width
        self.patch_embed = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.num_patches, w) * 0.02)
        self.cam_embed = nn.Parameter(torch.randn(len(cfg.cameras), 1, w) * 0.02)
        self.blocks = nn.ModuleList(
            Block(w, h, cfg.head_dim, m) for h, m in zip(cfg.vision_heads, cfg.vision_mlp)
        )
        self.norm = nn.LayerNorm(w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c = images.shape[:2]
        x = images.reshape(b * c, *images.shape[2:]).float() * (2.0 / 255.0) - 1.0  # uint8 -> [-1, 1]
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed  # [b*c, P, w]
        x = x.reshape(b, c, x.shape[1], x.shape[2]) + self.cam_embed
        x = x.reshape(b * c, x.shape[2], x.shape[3])
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return x.reshape(b, c * x.shape[1], x.shape[2])  # [b, c*P, w]


class Backbone(nn.Module):
    """Decoder-only language backbone over [image tokens, instruction tokens] (prefix-LM mask)."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        w = cfg.backbone_width
        self.vision_proj = nn.Linear(cfg.vision_width, w)
        self.embed = nn.Embedding(VOCAB_SIZE, w)
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.max_tokens, w) * 0.02)
        self.blocks = nn.ModuleList(
            Block(w, h, cfg.head_dim, m) for h, m in zip(cfg.backbone_heads, cfg.backbone_mlp)
        )
        self.norm = nn.LayerNorm(w)
        n_img = len(cfg.cameras) * cfg.num_patches
        n = n_img + cfg.max_tokens
        # Image tokens see all image tokens; text tokens see images and earlier text.
        allowed = torch.ones(n, n, dtype=torch.bool).tril()
        allowed[:n_img, :n_img] = True
        self.register_buffer("causal", torch.where(allowed, 0.0, NEG_INF), persistent=False)
        self.n_img = n_img

    def forward(self, vision_tokens: torch.Tensor, tokens: torch.Tensor):
        b = tokens.shape[0]
        x = torch.cat([self.vision_proj(vision_tokens), self.embed(tokens) + self.pos_embed], dim=1)
        key_pad = torch.cat(
            [torch.zeros(b, self.n_img, device=tokens.device), (tokens == PAD_ID).float() * NEG_INF], dim=1
        )  # [b, n]
        mask = self.causal[None, None] + key_pad[:, None, None, :]
        for blk in self.blocks:
            x = blk(x, mask)
        return self.norm(x), key_pad[:, None, None, :]


class ActionExpert(nn.Module):
    """Flow-matching velocity field over [state token, H noisy action tokens]."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        w = cfg.expert_width
        self.width = w
        self.state_in = nn.Linear(cfg.state_dim, w)
        self.action_in = nn.Linear(cfg.action_dim, w)
        self.time_mlp = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.pos_embed = nn.Parameter(torch.randn(1, cfg.chunk_size + 1, w) * 0.02)
        self.blocks = nn.ModuleList(
            Block(w, h, cfg.head_dim, m, context_dim=cfg.backbone_width)
            for h, m in zip(cfg.expert_heads, cfg.expert_mlp)
        )
        self.norm = nn.LayerNorm(w)
        self.action_out = nn.Linear(w, cfg.action_dim)

    def context_kv(self, prefix: torch.Tensor) -> list[torch.Tensor]:
        """Each layer's cross-attention K/V projection of the prefix: the same at every flow step."""
        return [blk.cross.kv(prefix) for blk in self.blocks]

    def forward(self, x_t, t, state_n, prefix, prefix_mask, context_kv=None):
        temb = self.time_mlp(timestep_embedding(t, self.width))[:, None, :]
        h = torch.cat([self.state_in(state_n)[:, None, :], self.action_in(x_t) + temb], dim=1) + self.pos_embed
        for i, blk in enumerate(self.blocks):
            h = blk(h, None, prefix, prefix_mask, None if context_kv is None else context_kv[i])
        return self.action_out(self.norm(h[:, 1:]))


class ReferenceVLA(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.backbone = Backbone(cfg)
        self.expert = ActionExpert(cfg)
        # Normalisation statistics travel with the weights (set from the training episodes).
        self.register_buffer("state_mean", torch.zeros(cfg.state_dim))
        self.register_buffer("state_std", torch.ones(cfg.state_dim))
        self.register_buffer("action_mean", torch.zeros(cfg.action_dim))
        self.register_buffer("action_std", torch.ones(cfg.action_dim))

    def set_stats(self, state_mean, state_std, action_mean, action_std) -> None:
        for name, v in (("state_mean", state_mean), ("state_std", state_std), ("action_mean", action_mean), ("action_std", action_std)):
            t = torch.as_tensor(v, dtype=torch.float32)
            if name.endswith("std"):
                t = t.clamp_min(1e-6)
            getattr(self, name).copy_(t)

    # System 2: once per chunk.
    def prefix(self, images: torch.Tensor, tokens: torch.Tensor):
        return self.backbone(self.vision(images), tokens)

    def normalize_state(self, state: torch.Tensor) -> torch.Tensor:
        return (state - self.state_mean) / self.state_std

    # System 1: K times per chunk.
    def velocity(self, x_t, t, state_n, prefix, prefix_mask, context_kv=None):
        return self.expert(x_t, t, state_n, prefix, prefix_mask, context_kv)

    def forward(self, images, state, tokens, noise):
        prefix, prefix_mask = self.prefix(images, tokens)
        state_n = self.normalize_state(state)
        # The expert's K/V of the prefix, projected once rather than at each of the K steps (with 10
        # steps it was 40% of the demo teacher's work); the result is the same to the bit.
        kv = self.expert.context_kv(prefix)
        x = noise
        k = self.cfg.flow_steps
        for i in range(k):  # Euler integration of dx/dt = v(x, t) from t=0 (noise) to t=1 (actions)
            t = torch.full((noise.shape[0],), i / k, dtype=noise.dtype, device=noise.device)
            x = x + self.velocity(x, t, state_n, prefix, prefix_mask, kv) / k
        return x * self.action_std + self.action_mean

    def flow_matching_loss(self, images, state, tokens, actions, generator=None) -> torch.Tensor:
        """Training loss on recorded action chunks [B, H, A] (physical units)."""
        x1 = (actions - self.action_mean) / self.action_std
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device)
        # Beta-like emphasis on low t (noisy end), as in pi0.
        t = torch.rand(x1.shape[0], generator=generator, device=x1.device) ** 1.5
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        prefix, prefix_mask = self.prefix(images, tokens)
        v = self.velocity(x_t, t, self.normalize_state(state), prefix, prefix_mask)
        return F.mse_loss(v, x1 - x0)


def build(cfg: ReferenceConfig) -> ReferenceVLA:
    return ReferenceVLA(cfg)


def spec_of(model: ReferenceVLA) -> PolicySpec:
    cfg = model.cfg
    return PolicySpec(
        family=FAMILY,
        cameras=tuple(CameraSpec(c, cfg.image_size, cfg.image_size) for c in cfg.cameras),
        state_dim=cfg.state_dim,
        action_dim=cfg.action_dim,
        chunk_size=cfg.chunk_size,
        flow_steps=cfg.flow_steps,
        max_tokens=cfg.max_tokens,
        control_hz=cfg.control_hz,
        action_mean=tuple(float(v) for v in model.action_mean),
        action_std=tuple(float(v) for v in model.action_std),
    )


def flops_per_call(cfg: ReferenceConfig) -> dict[str, float]:
    """Multiply-accumulates x2 of one get_action call, per part of the split graphs (for the roofline
    estimate). System 1 projects the prefix's cross-attention K/V at each step; the single graph
    does it once per call (``ReferenceVLA.forward``), so it computes (K - 1) projections fewer."""

    def block(n_tokens, width, heads, mlp, ctx_tokens=0, ctx_width=0):
        inner = heads * cfg.head_dim
        f = 2 * n_tokens * width * 3 * inner + 2 * n_tokens * inner * width  # qkv + proj
        f += 2 * 2 * n_tokens * n_tokens * inner  # scores + weighted sum
        f += 2 * 2 * n_tokens * width * mlp  # fc1 + fc2
        if ctx_tokens:
            f += 2 * n_tokens * width * inner + 2 * ctx_tokens * ctx_width * 2 * inner + 2 * n_tokens * inner * width
            f += 2 * 2 * n_tokens * ctx_tokens * inner
        return f

    n_cam, p = len(cfg.cameras), cfg.num_patches
    vision = n_cam * (2 * p * 3 * cfg.patch_size**2 * cfg.vision_width)
    vision += n_cam * sum(block(p, cfg.vision_width, h, m) for h, m in zip(cfg.vision_heads, cfg.vision_mlp))
    n_prefix = n_cam * p + cfg.max_tokens
    backbone = 2 * n_cam * p * cfg.vision_width * cfg.backbone_width
    backbone += sum(block(n_prefix, cfg.backbone_width, h, m) for h, m in zip(cfg.backbone_heads, cfg.backbone_mlp))
    n_act = cfg.chunk_size + 1
    step = sum(
        block(n_act, cfg.expert_width, h, m, n_prefix, cfg.backbone_width)
        for h, m in zip(cfg.expert_heads, cfg.expert_mlp)
    )
    return {"system2": float(vision + backbone), "system1_per_step": float(step), "system1": float(step * cfg.flow_steps)}
