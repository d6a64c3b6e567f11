"""Building blocks more than one family computes the same way (lerobot's and transformers' float32
op order): activations, the gated MLP, attention projections, eager attention with GQA, the flow
time's sinusoidal embedding in exact float32, and the SigLIP encoder layer."""
from __future__ import annotations

import math

import torch
from torch import nn

# The score a masked key gets: float16's lowest finite value. lerobot fills with float32's lowest,
# which rounds to -inf in bfloat16 and float16 (autocast, a TensorRT FP16/BF16 engine), and a row
# whose keys are all masked (a padded query) then softmaxes to NaN, which 0 * NaN spreads through
# every later product. This value is finite in all three, still softmaxes a fully masked row to the
# uniform row lerobot computes, and gives partly masked rows the same exact zeros in float32
# (exp(-65504 - s) underflows for any real score s).
MASKED_SCORE = -65504.0

ACTIVATIONS = {
    "silu": nn.SiLU, "swish": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"), "gelu_new": lambda: nn.GELU(approximate="tanh"),
}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one vlacompile implements ({sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]()


class GatedMlp(nn.Module):
    """LlamaMLP: down(act(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.act_fn = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Projections(nn.Module):
    """A decoder layer's attention projections (only the projections: attention itself is the model's)."""

    def __init__(self, dim: int, heads: int, kv_heads: int, head_dim: int, bias: bool, kv_in: int | None = None):
        super().__init__()
        self.head_dim = head_dim
        self.q_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(kv_in or dim, kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(kv_in or dim, kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """lerobot's eager attention: q [B, L, H, D], k/v [B, S, KV, D] (GQA by expansion), ``allowed``
    [B, L, S] -> [B, L, H * D]. Masked scores take ``MASKED_SCORE``: lerobot's float32 result, finite
    in every reduced precision."""
    b, s, _, d = k.shape
    groups = heads // kv_heads
    k = k[:, :, :, None, :].expand(b, s, kv_heads, groups, d).reshape(b, s, heads, d)
    v = v[:, :, :, None, :].expand(b, s, kv_heads, groups, d).reshape(b, s, heads, d)
    scores = torch.matmul(q.transpose(1, 2), k.transpose(1, 2).transpose(2, 3)) * (d**-0.5)
    scores = torch.where(allowed[:, None, :, :], scores, MASKED_SCORE)
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs, v.permute(0, 2, 1, 3)).permute(0, 2, 1, 3)
    return out.reshape(b, q.shape[1], heads * d)


def _veltkamp(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c = a * 4097.0  # 2^12 + 1: splits a float32 into two 12-bit halves
    hi = c - (c - a)
    return hi, a - hi


def sinusoidal_time(t: torch.Tensor, freq_hi: torch.Tensor, freq_lo: torch.Tensor) -> torch.Tensor:
    """[sin(2 pi t f), cos(2 pi t f)] for the frequencies f = freq_hi + freq_lo (float64 split into
    two float32s), with t * f formed exactly (Dekker's product) and reduced to one period before the
    sine: what lerobot computes in float64, in float32 ops."""
    t = t[:, None]
    p = t * freq_hi
    th, tl = _veltkamp(t)
    fh, fl = _veltkamp(freq_hi)
    err = ((th * fh - p) + th * fl + tl * fh) + tl * fl + t * freq_lo
    angle = ((p - torch.round(p)) + err) * (2 * math.pi)
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)


class TimeEmbedding(nn.Module):
    """The flow time's sinusoidal embedding (lerobot ``create_sinusoidal_pos_embedding``), frequencies
    1 / (min_period (max_period / min_period) ** linspace(0, 1)) split into two float32 halves."""

    def __init__(self, dim: int, min_period: float, max_period: float):
        super().__init__()
        fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64)
        freq = 1.0 / (min_period * (max_period / min_period) ** fraction)
        self.register_buffer("freq_hi", freq.float(), persistent=False)
        self.register_buffer("freq_lo", (freq - freq.float().double()).float(), persistent=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return sinusoidal_time(t, self.freq_hi, self.freq_lo)


class VisionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, mlp: int, eps: float, act: str):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = self.heads * self.head_dim
        self.layer_norm1 = nn.LayerNorm(dim, eps=eps)
        self.self_attn = nn.Module()
        self.self_attn.q_proj = nn.Linear(dim, inner)
        self.self_attn.k_proj = nn.Linear(dim, inner)
        self.self_attn.v_proj = nn.Linear(dim, inner)
        self.self_attn.out_proj = nn.Linear(inner, dim)
        self.layer_norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, mlp)
        self.mlp.act = activation(act)
        self.mlp.fc2 = nn.Linear(mlp, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.layer_norm1(x)
        a = self.self_attn
        q = a.q_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        k = a.k_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        v = a.v_proj(h).view(b, n, self.heads, self.head_dim).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * (self.head_dim**-0.5)
        out = torch.matmul(scores.softmax(dim=-1), v).transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        x = x + a.out_proj(out)
        return x + self.mlp.fc2(self.mlp.act(self.mlp.fc1(self.layer_norm2(x))))


def slice_layer_tensor(vision: bool, rest: str, t: torch.Tensor, heads: int, keep: dict[str, torch.Tensor]) -> torch.Tensor:
    """One tensor of a layer (``rest``: its name inside the layer) sliced to the kept MLP channels
    (``keep["mlp"]``: gated MLP gate/up/down, or the SigLIP fc1/fc2) and, in a vision layer of
    ``heads`` heads, the kept heads (``keep["attn"]``)."""
    mlp, attn = keep.get("mlp"), keep.get("attn")
    if mlp is not None:
        if vision:
            if rest in ("mlp.fc1.weight", "mlp.fc1.bias"):
                return t[mlp]
            if rest == "mlp.fc2.weight":
                return t[:, mlp]
        else:
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias"):
                return t[mlp]
            if rest == "mlp.down_proj.weight":
                return t[:, mlp]
    if attn is not None and vision:
        if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
            hd = t.shape[0] // heads
            return t.reshape(heads, hd, *t.shape[1:])[attn].reshape(-1, *t.shape[1:])
        if rest == "self_attn.out_proj.weight":
            hd = t.shape[1] // heads
            return t.reshape(t.shape[0], heads, hd)[:, attn].reshape(t.shape[0], -1)
    return t
