"""LeRobot SmolVLA, implemented here and export-friendly.

    images ─▶ resize with pad (left/top) ─▶ SigLIP-style ViT ─▶ pixel shuffle + projection ─┐  x sqrt(d)
    task ─▶ tokens (+"\\n") ─▶ embeddings x sqrt(d) ───────────────────────────────────────┤   "System 2": the VLM's
    state ─▶ normalise, pad ─▶ state_proj (one token) ──────────────────────────────────┘   text layers over the
                                                                                             prefix -> per-layer K/V
    noise x(t=1) ─▶ 10 Euler steps t = 1, 0.9 .. 0.1 of the action expert over the K/V ─▶ x(0) ─▶ unpad, unnormalise

The same computations as lerobot (``policies/smolvla/modeling_smolvla.py``, ``smolvlm_with_expert.py``),
in the same float32 order, written so that the whole policy exports to one static-shape graph:
the prefix's K/V cache is an explicit tensor per layer (``prefix`` returns it, ``velocity`` reads
it), the integration loop is unrolled over a fixed time schedule, masks are boolean tensors, and
nothing depends on data at trace time. Where lerobot computes in float64 (the flow time's sinusoidal
embedding) this computes the same angles in float32 with an exact product (Dekker/Veltkamp), since
TensorRT has no float64: the embedding agrees with lerobot's to 3e-7.

The module's inputs are ``images.<camera>`` (uint8 [B, 3, H, W] per camera, at its own
resolution), ``state`` (float32, physical units), ``tokens`` / ``token_mask`` (the tokenizer's ids
and attention mask, padded to ``tokenizer_max_length``) and ``noise`` ([B, chunk, max_action_dim]).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlacompile.families.blocks import GatedMlp, Projections, TimeEmbedding, VisionLayer, attention
from vlacompile.families.smolvla.configuration import SmolVLAConfig
from vlacompile.lerobot.normalize import Normalize

# ---------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    """LlamaRMSNorm: x / rms(x) (in float32) times the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps))


class DecoderLayer(nn.Module):
    def __init__(self, dim: int, mlp: int, cfg: SmolVLAConfig, kv_in: int | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, cfg.rms_eps)
        self.self_attn = Projections(dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.attention_bias, kv_in)
        self.post_attention_layernorm = RMSNorm(dim, cfg.rms_eps)
        self.mlp = GatedMlp(dim, mlp, cfg.text_act, cfg.mlp_bias)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, max_wavelength: float = 10_000) -> torch.Tensor:
    """SmolVLA's RoPE (half-split rotation, base 10000) of x [B, L, H, D] at positions [B, L]."""
    d_half = x.shape[-1] // 2
    freq_exponents = (2.0 / x.shape[-1]) * torch.arange(d_half, dtype=torch.float32, device=x.device)
    timescale = max_wavelength**freq_exponents
    radians = (positions[..., None].to(torch.float32) / timescale[None, None, :])[..., None, :]
    sin, cos = torch.sin(radians), torch.cos(radians)
    x1, x2 = x[..., :d_half], x[..., d_half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ---------------------------------------------------------------------------------------------
# Vision


class VisionTower(nn.Module):
    """SmolVLM's vision transformer and connector: patch embedding, position embedding (NaViT
    bucketed ids in the configured transformers convention, fixed here for the static image size),
    encoder, post-norm, pixel shuffle and the modality projection."""

    def __init__(self, cfg: SmolVLAConfig, image_hw: tuple[int, int]):
        super().__init__()
        d = cfg.vision_hidden
        self.scale = cfg.scale_factor
        self.embeddings = nn.Module()
        self.embeddings.patch_embedding = nn.Conv2d(3, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        per_side = cfg.vision_image_size // cfg.patch_size
        self.embeddings.position_embedding = nn.Embedding(per_side**2, d)
        self.layers = nn.ModuleList(VisionLayer(d, h, cfg.vision_head_dim, m, cfg.vision_eps, cfg.vision_act)
                                    for h, m in zip(cfg.vision_heads, cfg.vision_mlp))
        self.post_layernorm = nn.LayerNorm(d, eps=cfg.vision_eps)
        self.connector = nn.Module()
        self.connector.proj = nn.Linear(d * cfg.scale_factor**2, cfg.text_hidden, bias=False)
        h, w = image_hw[0] // cfg.patch_size, image_hw[1] // cfg.patch_size
        self.register_buffer("position_ids", _navit_position_ids(h, w, per_side, cfg.patch_positions), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.embeddings.patch_embedding(pixels).flatten(2).transpose(1, 2)
        x = x + self.embeddings.position_embedding(self.position_ids)[None]
        for layer in self.layers:
            x = layer(x)
        x = self.post_layernorm(x)
        return self.connector.proj(_pixel_shuffle(x, self.scale))


def _navit_position_ids(h: int, w: int, per_side: int, convention: str) -> torch.Tensor:
    """Position ids of an all-valid h x w patch grid, computed as SmolVLMVisionEmbeddings does (float32
    bucketize), in transformers 4's convention (``i / n * (1 - 1e-6)``, lerobot 0.4.x) or transformers
    5's (``clamp(i * (1 / n), max=1 - 1e-6)``, lerobot >= 0.5). A constant of the graph either way."""
    boundaries = torch.arange(1 / per_side, 1.0, 1 / per_side)

    def fractions(n: int) -> torch.Tensor:
        if convention == "transformers4":
            return torch.arange(n, dtype=torch.float32) / torch.tensor(n) * (1 - 1e-6)
        if convention == "transformers5":
            step = 1.0 / torch.tensor([n])  # an int64 count divided in float32, as transformers 5 does
            return torch.clamp(torch.arange(n, dtype=torch.float32) * step, max=1.0 - 1e-6)
        raise ValueError(f"unknown patch position convention {convention!r}")

    bh = torch.bucketize(fractions(h), boundaries, right=True)
    bw = torch.bucketize(fractions(w), boundaries, right=True)
    return (bh[:, None] * per_side + bw).flatten()


def _pixel_shuffle(x: torch.Tensor, s: int) -> torch.Tensor:
    b, n, d = x.shape
    side = int(n**0.5)
    x = x.view(b, side, side, d).view(b, side, side // s, d * s).permute(0, 2, 1, 3)
    x = x.reshape(b, side // s, side // s, d * s * s).permute(0, 2, 1, 3)
    return x.reshape(b, n // (s * s), d * s * s)


# ---------------------------------------------------------------------------------------------
# The policy


class TextModel(nn.Module):
    def __init__(self, cfg: SmolVLAConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.text_hidden)
        self.layers = nn.ModuleList(DecoderLayer(cfg.text_hidden, m, cfg) for m in cfg.text_mlp)
        self.norm = RMSNorm(cfg.text_hidden, cfg.rms_eps)  # lerobot keeps it; the K/V cache does not need it
        # add_image_special_tokens: [fake_image_token, global_image_token] before each image, fake_image_token after.
        self.register_buffer("image_start_tokens", torch.tensor(cfg.image_start_tokens, dtype=torch.long), persistent=False)
        self.register_buffer("image_end_tokens", torch.tensor(cfg.image_end_tokens, dtype=torch.long), persistent=False)


class Expert(nn.Module):
    def __init__(self, cfg: SmolVLAConfig):
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(cfg.expert_hidden, m, cfg, kv_in=k) for m, k in zip(cfg.expert_mlp, cfg.expert_kv_in))
        self.norm = RMSNorm(cfg.expert_hidden, cfg.rms_eps)


class Normalization(nn.Module):
    """The processor pipelines' normaliser and unnormaliser, inside the graph."""

    def __init__(self, cfg: SmolVLAConfig):
        super().__init__()
        self.state = Normalize(cfg.state_norm, (cfg.state_dim,))
        self.action = Normalize(cfg.action_norm, (cfg.action_dim,))
        self.images = nn.ModuleDict({str(i): Normalize(cfg.visual_norm if c.normalized else "IDENTITY", (3, 1, 1))
                                     for i, c in enumerate(cfg.cameras)})


class SmolVLA(nn.Module):
    def __init__(self, cfg: SmolVLAConfig):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalization(cfg)
        # One tower per distinct camera resolution would duplicate weights; the resize makes every
        # image the same size, so one tower serves all (its position ids are for that size).
        size = (cfg.resize[1], cfg.resize[0]) if cfg.resize else (cfg.cameras[0].height, cfg.cameras[0].width)
        self.image_size = size
        self.vision = VisionTower(cfg, size)
        self.text = TextModel(cfg)
        self.expert = Expert(cfg)
        e, d = cfg.expert_hidden, cfg.text_hidden
        self.state_proj = nn.Linear(cfg.max_state_dim, d)
        self.action_in_proj = nn.Linear(cfg.max_action_dim, e)
        self.action_out_proj = nn.Linear(e, cfg.max_action_dim)
        self.action_time_mlp_in = nn.Linear(2 * e, e)
        self.action_time_mlp_out = nn.Linear(e, e)
        self.time_embedding = TimeEmbedding(e, cfg.min_period, cfg.max_period)
        self.times = [1.0 + k * (-1.0 / cfg.num_steps) for k in range(cfg.num_steps)]  # t = 1, 1 - 1/K, ...

    # -- System 2: once per chunk ---------------------------------------------------------------

    def _image(self, img: torch.Tensor, norm: Normalize) -> torch.Tensor:
        x = norm(img.float() / 255.0)
        if self.cfg.resize is not None:
            w, h = self.cfg.resize
            cur_h, cur_w = x.shape[2:]
            ratio = max(cur_w / w, cur_h / h)
            rh, rw = int(cur_h / ratio), int(cur_w / ratio)
            if (rh, rw) != (cur_h, cur_w):
                x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False)
            x = F.pad(x, (max(0, w - rw), 0, max(0, h - rh), 0), value=0.0)  # left and top, as lerobot pads
        return x * 2.0 - 1.0

    def embed_prefix(self, images: list[torch.Tensor], state: torch.Tensor, tokens: torch.Tensor, token_mask: torch.Tensor):
        """-> (embeddings [B, P, d], valid [B, P] bool, ar [P] int: lerobot's att_masks)."""
        cfg = self.cfg
        b = tokens.shape[0]
        d = cfg.text_hidden
        embs, valid, ar = [], [], []
        pixels = [self._image(img, self.normalize.images[str(i)]) for i, img in enumerate(images)]
        empty = [torch.full_like(pixels[-1], -1.0)] * cfg.empty_cameras
        for i, px in enumerate([*pixels, *empty]):
            present = i < len(pixels)
            if cfg.add_image_special_tokens:
                start = self.text.embed_tokens(self.text.image_start_tokens)[None].expand(b, -1, -1)
                embs.append(start)
                valid.append(torch.ones(b, start.shape[1], dtype=torch.bool, device=tokens.device))
                ar += [0] * start.shape[1]
            img = self.vision(px)
            img = img * torch.tensor(d**0.5, dtype=img.dtype)
            embs.append(img)
            ones = torch.ones(b, img.shape[1], dtype=torch.bool, device=tokens.device)
            valid.append(ones if present else ~ones)  # an empty camera's tokens are padding
            ar += [0] * img.shape[1]
            if cfg.add_image_special_tokens:
                end = self.text.embed_tokens(self.text.image_end_tokens)[None].expand(b, -1, -1)
                embs.append(end)
                valid.append(torch.ones(b, end.shape[1], dtype=torch.bool, device=tokens.device))
                ar += [0] * end.shape[1]
        embs.append(self.text.embed_tokens(tokens) * math.sqrt(d))
        valid.append(token_mask)
        ar += [0] * tokens.shape[1]
        s = self.normalize.state(state)
        if cfg.adapt_to_pi_aloha:
            s = _aloha_decode_state(s)
        s = F.pad(s, (0, cfg.max_state_dim - cfg.state_dim))
        embs.append(self.state_proj(s)[:, None, :])
        valid.append(torch.ones(b, 1, dtype=torch.bool, device=tokens.device))
        ar += [1]
        x, valid = torch.cat(embs, dim=1), torch.cat(valid, dim=1)
        pad = cfg.prefix_length - x.shape[1]
        if pad > 0:
            x = torch.cat([x, x.new_zeros(b, pad, d)], dim=1)
            valid = torch.cat([valid, torch.zeros(b, pad, dtype=torch.bool, device=valid.device)], dim=1)
            ar += [0] * pad
        return x, valid, ar

    def prefix(self, *inputs: torch.Tensor):
        """System 2: (images..., state, tokens, token_mask) -> (K_0, V_0, ..., prefix_valid): the K/V
        each expert layer attends to (for cross-attention layers already through the expert's
        k_proj / v_proj, which depend on the prefix only) and the prefix's valid-token mask."""
        cfg = self.cfg
        n = len(cfg.cameras)
        images, (state, tokens, token_mask) = list(inputs[:n]), inputs[n:]
        x, valid, ar = self.embed_prefix(images, state, tokens, token_mask.bool())
        cum = torch.cumsum(torch.tensor(ar, dtype=torch.long, device=x.device), dim=0)
        allowed = (cum[None, :] <= cum[:, None])[None] & valid[:, None, :] & valid[:, :, None]
        positions = torch.cumsum(valid.long(), dim=1) - 1
        b, p = x.shape[:2]
        carry: list[torch.Tensor] = []
        last = cfg.num_vlm_layers - 1
        for i, layer in enumerate(self.text.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = apply_rope(a.q_proj(h).view(b, p, -1, cfg.head_dim), positions)
            k = apply_rope(a.k_proj(h).view(b, p, -1, cfg.head_dim), positions)
            v = a.v_proj(h).view(b, p, -1, cfg.head_dim)
            e = cfg.expert_at(i)
            if e is not None:
                if cfg.is_self_attn(i):
                    carry += [k, v]
                else:
                    ea = self.expert.layers[e].self_attn
                    carry += [ea.k_proj(k.reshape(b, p, -1)).view(b, p, -1, cfg.head_dim),
                              ea.v_proj(v.reshape(b, p, -1)).view(b, p, -1, cfg.head_dim)]
            if i == last:
                break  # the last layer's output feeds nothing: only its K/V are needed
            out = a.o_proj(attention(q, k, v, allowed, cfg.num_heads, cfg.num_kv_heads)) + x
            x = layer.mlp(layer.post_attention_layernorm(out)) + out
        return (*carry, valid)

    # -- System 1: K times per chunk ------------------------------------------------------------

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, *carry: torch.Tensor) -> torch.Tensor:
        """One denoising step: x_t [B, chunk, max_action_dim], t [B], the prefix K/V and mask -> v_t."""
        cfg = self.cfg
        kv, valid = carry[:-1], carry[-1]
        b, c = x_t.shape[:2]
        action = self.action_in_proj(x_t)
        temb = self.time_embedding(t)[:, None, :].expand_as(action)
        h = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(torch.cat([action, temb], dim=2))))
        p = valid.shape[1]
        causal = torch.ones(c, c, dtype=torch.bool, device=x_t.device).tril()
        allowed = torch.cat([valid[:, None, :].expand(b, c, p), causal[None].expand(b, c, c)], dim=2)
        offsets = valid.long().sum(dim=-1, keepdim=True)
        positions = offsets + torch.arange(c, device=x_t.device)[None, :]
        local = torch.arange(c, device=x_t.device)[None, :].expand(b, c)  # cross-attention queries restart at 0
        j = 0
        for i in range(cfg.num_vlm_layers):
            e = cfg.expert_at(i)
            if e is None:
                continue  # no expert at this layer: the suffix passes through
            layer = self.expert.layers[e]
            a = layer.self_attn
            k_prefix, v_prefix = kv[2 * j], kv[2 * j + 1]
            j += 1
            hn = layer.input_layernorm(h)
            if cfg.is_self_attn(i):
                q = apply_rope(a.q_proj(hn).view(b, c, -1, cfg.head_dim), positions)
                k = torch.cat([k_prefix, apply_rope(a.k_proj(hn).view(b, c, -1, cfg.head_dim), positions)], dim=1)
                v = torch.cat([v_prefix, a.v_proj(hn).view(b, c, -1, cfg.head_dim)], dim=1)
                out = attention(q, k, v, allowed, cfg.num_heads, cfg.num_kv_heads)
            else:
                q = apply_rope(a.q_proj(hn).view(b, c, -1, cfg.head_dim), local)
                out = attention(q, k_prefix, v_prefix, allowed[:, :, :p], cfg.num_heads, cfg.num_kv_heads)
            out = a.o_proj(out) + h
            h = layer.mlp(layer.post_attention_layernorm(out)) + out
        return self.action_out_proj(self.expert.norm(h))

    # -- the whole policy -----------------------------------------------------------------------

    def postprocess(self, x: torch.Tensor) -> torch.Tensor:
        actions = x[:, :, : self.cfg.action_dim]
        if self.cfg.adapt_to_pi_aloha:
            actions = _aloha_encode_actions(actions)
        return self.normalize.action.inverse(actions)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        noise = inputs[-1]
        carry = self.prefix(*inputs[:-1])
        x = noise
        dt = -1.0 / self.cfg.num_steps
        for time in self.times:
            t = torch.full((noise.shape[0],), time, dtype=torch.float32, device=noise.device)
            x = x + dt * self.velocity(x, t, *carry)
        return self.postprocess(x)


def _aloha_decode_state(state: torch.Tensor) -> torch.Tensor:
    """lerobot's ``_pi_aloha_decode_state`` (on the normalised state): flip joints 1, 2, 8, 9; grippers
    6, 13 from Aloha's linear range back to angular, normalised to [0, 1]."""
    flip = torch.ones(state.shape[-1], dtype=state.dtype)
    flip[[1, 2, 8, 9]] = -1
    out = state * flip
    lin = out[..., [6, 13]] * (0.05800 - 0.01844) + 0.01844
    arm, horn = 0.036, 0.022
    rad = torch.arcsin(torch.clamp((horn**2 + lin**2 - arm**2) / (2 * horn * lin), -1.0, 1.0))
    g = (rad - 0.4) / (1.5 - 0.4)
    return torch.cat([out[..., :6], g[..., :1], out[..., 7:13], g[..., 1:], out[..., 14:]], dim=-1)


def _aloha_encode_actions(actions: torch.Tensor) -> torch.Tensor:
    """lerobot's ``_pi_aloha_encode_actions``: flip joints 1, 2, 8, 9; grippers 6, 13 to Aloha's range."""
    flip = torch.ones(actions.shape[-1], dtype=actions.dtype)
    flip[[1, 2, 8, 9]] = -1
    out = actions * flip
    g = out[..., [6, 13]] * (1.5 - 0.4) + 0.4
    g = (g - -0.6213) / (1.4910 - -0.6213)
    return torch.cat([out[..., :6], g[..., :1], out[..., 7:13], g[..., 1:], out[..., 14:]], dim=-1)


def build(cfg: SmolVLAConfig) -> SmolVLA:
    return SmolVLA(cfg)
