"""pi0 and pi0.5 (lerobot >= 0.5, openpi's PyTorch port), implemented here and export-friendly.

    images ─▶ /255, resize with centred pad ─▶ x2-1 ─▶ SigLIP ─▶ multi_modal_projector ─┐
    tokens ─▶ embed x sqrt(width) ───────────────────────────────────────────────────────┤ "System 2": Gemma over
                                                                                          │ the prefix -> K/V per layer
    pi0:   state ─▶ normalise, pad ─▶ state_proj (one suffix token, computed once) ───────┘
    noise x(t=1) ─▶ K Euler steps t = 1, 1-1/K .. of the Gemma expert over [prefix K/V; suffix] ─▶ x(0) ─▶ unnormalise

The same computations as lerobot (``modeling_pi0.py`` / ``modeling_pi05.py`` / ``pi_gemma.py``
and transformers' Gemma / SigLIP) in the same float32 order, written so the policy exports to one
static-shape graph: the prefix's K/V are explicit tensors (``prefix`` returns them, ``velocity``
reads them), the Euler loop is unrolled, masks are boolean, nothing depends on data at trace
time. An empty camera's tokens are padding that no valid token attends to, so their embeddings are
zeros here instead of SigLIP run on a -1 image (lerobot's): the actions are the same.

Inputs: ``images.<camera>`` (uint8 [B, 3, H, W]), pi0's ``state`` (float32, physical units),
``tokens`` / ``token_mask`` (the tokenizer's ids and mask, ``tokenizer_max_length``), ``noise``
([B, chunk, max_action_dim]). pi0.5's state reaches the model only through the prompt's tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlacompile.families.blocks import GatedMlp, Projections, TimeEmbedding, VisionLayer, attention
from vlacompile.families.pi0.configuration import Pi0Config
from vlacompile.lerobot.normalize import Normalize


class GemmaNorm(nn.Module):
    """Gemma's RMSNorm (``PiGemmaRMSNorm`` without a condition): x / rms(x) x (1 + w), eps 1e-6."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x * torch.rsqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + self.eps)
        return normed * (1.0 + self.weight)


class AdaptiveNorm(nn.Module):
    """pi0.5's adaptive RMSNorm: ``dense(cond)`` -> (scale, shift, gate); x / rms(x) x (1 + scale) + shift,
    and the gate for the residual it feeds (x + y x gate)."""

    def __init__(self, dim: int, cond_dim: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(cond_dim, 3 * dim)
        self.eps = eps

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        normed = x * torch.rsqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + self.eps)
        scale, shift, gate = self.dense(cond)[:, None, :].chunk(3, dim=-1)
        return normed * (1 + scale) + shift, gate


class GemmaLayer(nn.Module):
    def __init__(self, dim: int, mlp: int, cfg: Pi0Config, cond_dim: int | None = None):
        super().__init__()
        norm = (lambda: AdaptiveNorm(dim, cond_dim, cfg.rms_eps)) if cond_dim else (lambda: GemmaNorm(dim, cfg.rms_eps))
        self.input_layernorm = norm()
        self.self_attn = Projections(dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, bias=False)
        self.post_attention_layernorm = norm()
        self.mlp = GatedMlp(dim, mlp, "gelu_pytorch_tanh", bias=False)

    def forward(self, step, *args):
        """``step(self, *args)``: the prefix and the expert use a layer differently, but both call it
        through here, so module hooks (FSDP's gather of a sharded layer) see every use."""
        return step(self, *args)


class Rope(nn.Module):
    """transformers' Gemma RoPE: inv_freq = 1 / theta^(2i/d); rotate-half of x [B, L, H, D] at positions [B, L]."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * emb.cos() + rotated * emb.sin()


class VisionTower(nn.Module):
    """PaliGemma's SigLIP (patch embedding, learned positions, encoder, post-norm) and projector."""

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        d = cfg.vision_hidden
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.embeddings.position_embedding = nn.Embedding(cfg.tokens_per_image, d)
        self.layers = nn.ModuleList(VisionLayer(d, h, cfg.vision_head_dim, m, cfg.vision_eps, "gelu_pytorch_tanh")
                                    for h, m in zip(cfg.vision_heads, cfg.vision_mlp))
        self.post_layernorm = nn.LayerNorm(d, eps=cfg.vision_eps)
        self.projector = nn.Linear(d, cfg.width)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = x + self.embeddings.position_embedding.weight[None]
        for layer in self.layers:
            x = layer(x)
        return self.projector(self.post_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList(GemmaLayer(cfg.width, m, cfg) for m in cfg.text_mlp)
        self.norm = GemmaNorm(cfg.width, cfg.rms_eps)  # lerobot keeps it; the K/V cache does not need it
        self.rope = Rope(cfg.head_dim, cfg.rope_theta)


class Expert(nn.Module):
    def __init__(self, cfg: Pi0Config):
        super().__init__()
        cond = cfg.expert_width if cfg.pi05 else None
        self.layers = nn.ModuleList(GemmaLayer(cfg.expert_width, m, cfg, cond) for m in cfg.expert_mlp)
        self.norm = AdaptiveNorm(cfg.expert_width, cond, cfg.rms_eps) if cond else GemmaNorm(cfg.expert_width, cfg.rms_eps)


class Normalization(nn.Module):
    """The processor pipelines' normaliser and unnormaliser (pi0's state inside the graph; pi0.5's
    state stats serve its preprocessor's prompt)."""

    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.state = Normalize(cfg.state_norm, (cfg.state_dim,))
        self.action = Normalize(cfg.action_norm, (cfg.action_dim,))
        self.images = nn.ModuleDict({str(i): Normalize(cfg.visual_norm if c.normalized else "IDENTITY", (3, 1, 1))
                                     for i, c in enumerate(cfg.cameras)})


class Pi0(nn.Module):
    def __init__(self, cfg: Pi0Config):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalization(cfg)
        self.vision = VisionTower(cfg)
        self.backbone = Backbone(cfg)
        self.expert = Expert(cfg)
        e = cfg.expert_width
        self.action_in_proj = nn.Linear(cfg.max_action_dim, e)
        self.action_out_proj = nn.Linear(e, cfg.max_action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(e, e)
            self.time_mlp_out = nn.Linear(e, e)
        else:
            self.state_proj = nn.Linear(cfg.max_state_dim, e)
            self.action_time_mlp_in = nn.Linear(2 * e, e)
            self.action_time_mlp_out = nn.Linear(e, e)
        self.time_embedding = TimeEmbedding(e, cfg.min_period, cfg.max_period)
        self.times = [1.0 + k * (-1.0 / cfg.num_steps) for k in range(cfg.num_steps)]

    # -- System 2: once per chunk ---------------------------------------------------------------

    def _image(self, img: torch.Tensor, norm: Normalize) -> torch.Tensor:
        x = norm(img.float() / 255.0)
        r = self.cfg.resolution
        h, w = x.shape[2:]
        if (h, w) != (r, r):  # resize_with_pad_torch: keep the aspect ratio, pad both sides with 0
            ratio = max(w / r, h / r)
            rh, rw = int(h / ratio), int(w / ratio)
            x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
            top, left = (r - rh) // 2, (r - rw) // 2
            x = F.pad(x, (left, r - rw - left, top, r - rh - top), value=0.0)
        return x * 2.0 - 1.0

    def embed_prefix(self, images: list[torch.Tensor], tokens: torch.Tensor, token_mask: torch.Tensor):
        cfg = self.cfg
        b = tokens.shape[0]
        embs, valid = [], []
        for i, img in enumerate(images):
            embs.append(self.vision(self._image(img, self.normalize.images[str(i)])))
            valid.append(torch.ones(b, cfg.tokens_per_image, dtype=torch.bool, device=tokens.device))
        for _ in range(cfg.empty_cameras):
            embs.append(tokens.new_zeros(b, cfg.tokens_per_image, cfg.width, dtype=torch.float32))
            valid.append(torch.zeros(b, cfg.tokens_per_image, dtype=torch.bool, device=tokens.device))
        embs.append(self.backbone.embed_tokens(tokens) * torch.tensor(math.sqrt(cfg.width), dtype=torch.float32))
        valid.append(token_mask)
        return torch.cat(embs, dim=1), torch.cat(valid, dim=1)

    def prefix(self, *inputs: torch.Tensor):
        """System 2: (images..., [state,] tokens, token_mask) -> (K_0, V_0, ..., prefix_valid[, state_emb])."""
        cfg = self.cfg
        n = len(cfg.cameras)
        images = list(inputs[:n])
        rest = inputs[n:]
        state = None if cfg.pi05 else rest[0]
        tokens, token_mask = rest[-2], rest[-1].bool()
        x, valid = self.embed_prefix(images, tokens, token_mask)
        allowed = valid[:, None, :] & valid[:, :, None]  # all prefix tokens share one attention block
        positions = torch.cumsum(valid.long(), dim=1) - 1
        b, p = x.shape[:2]
        carry: list[torch.Tensor] = []
        for i, layer in enumerate(self.backbone.layers):
            x, k, v = layer(self._prefix_layer, x, allowed, positions, i == cfg.depth - 1)
            carry += [k, v]
        carry.append(valid)
        if state is not None:
            s = F.pad(self.normalize.state(state), (0, cfg.max_state_dim - cfg.state_dim))
            carry.append(self.state_proj(s)[:, None, :])
        return tuple(carry)

    def _prefix_layer(self, layer: GemmaLayer, x, allowed, positions, last: bool):
        cfg = self.cfg
        b, p = x.shape[:2]
        rope = self.backbone.rope
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = rope(a.q_proj(h).view(b, p, -1, cfg.head_dim), positions)
        k = rope(a.k_proj(h).view(b, p, -1, cfg.head_dim), positions)
        v = a.v_proj(h).view(b, p, -1, cfg.head_dim)
        if last:
            return x, k, v  # the last layer's output feeds nothing: only its K/V are needed
        out = a.o_proj(attention(q, k, v, allowed, cfg.num_heads, cfg.num_kv_heads)) + x
        return layer.mlp(layer.post_attention_layernorm(out)) + out, k, v

    # -- System 1: K times per chunk ------------------------------------------------------------

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, *carry: torch.Tensor) -> torch.Tensor:
        """One denoising step: x_t [B, chunk, max_action_dim], t [B], the prefix K/V, mask (and pi0's
        state token) -> v_t."""
        cfg = self.cfg
        depth = cfg.depth
        kv, valid = carry[: 2 * depth], carry[2 * depth]
        b, c = x_t.shape[:2]
        action = self.action_in_proj(x_t)
        temb = self.time_embedding(t)
        if cfg.pi05:
            h = action
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(temb))))
            # att_masks [1, 0, ..]: the actions form one block over the prefix
            block = torch.ones(c, c, dtype=torch.bool, device=x_t.device)
        else:
            state_emb = carry[2 * depth + 1]
            mixed = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(
                torch.cat([action, temb[:, None, :].expand_as(action)], dim=2))))
            h = torch.cat([state_emb, mixed], dim=1)
            cond = None
            # att_masks [1, 1, 0, ..]: the state token sees itself, the actions see the state and each other
            s = c + 1
            cum = torch.tensor([1] + [2] * c, device=x_t.device)
            block = cum[None, :] <= cum[:, None]
            c = s
        p = valid.shape[1]
        allowed = torch.cat([valid[:, None, :].expand(b, c, p), block[None].expand(b, c, c)], dim=2)
        positions = valid.long().sum(dim=-1, keepdim=True) + torch.arange(c, device=x_t.device)[None, :]
        for i, layer in enumerate(self.expert.layers):
            h = layer(self._expert_layer, h, cond, kv[2 * i], kv[2 * i + 1], allowed, positions)
        h = self.expert.norm(h) if cond is None else self.expert.norm(h, cond)[0]
        return self.action_out_proj(h[:, -cfg.chunk_size:])

    def _expert_layer(self, layer: GemmaLayer, h, cond, k_prefix, v_prefix, allowed, positions):
        cfg = self.cfg
        b, c = h.shape[:2]
        rope = self.backbone.rope
        a = layer.self_attn
        hn, gate = (layer.input_layernorm(h), None) if cond is None else layer.input_layernorm(h, cond)
        q = rope(a.q_proj(hn).view(b, c, -1, cfg.head_dim), positions)
        k = torch.cat([k_prefix, rope(a.k_proj(hn).view(b, c, -1, cfg.head_dim), positions)], dim=1)
        v = torch.cat([v_prefix, a.v_proj(hn).view(b, c, -1, cfg.head_dim)], dim=1)
        out = a.o_proj(attention(q, k, v, allowed, cfg.num_heads, cfg.num_kv_heads))
        h = h + out if gate is None else h + out * gate
        hn, gate = (layer.post_attention_layernorm(h), None) if cond is None else layer.post_attention_layernorm(h, cond)
        out = layer.mlp(hn)
        return h + out if gate is None else h + out * gate

    # -- the whole policy -----------------------------------------------------------------------

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize.action.inverse(x[:, :, : self.cfg.action_dim])

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        noise = inputs[-1]
        carry = self.prefix(*inputs[:-1])
        x = noise
        dt = -1.0 / self.cfg.num_steps
        for time in self.times:
            t = torch.full((noise.shape[0],), time, dtype=torch.float32, device=noise.device)
            x = x + dt * self.velocity(x, t, *carry)
        return self.postprocess(x)


def build(cfg: Pi0Config) -> Pi0:
    return Pi0(cfg)
