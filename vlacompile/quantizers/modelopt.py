"""nvidia-modelopt on the torch model: fake-quant INT8 / FP8 / INT4-AWQ for TensorRT.

modelopt inserts quantisers on the inputs and weights of Linear and Conv layers, calibrates their
ranges on episodes, and the export stage writes them (TorchScript exporter) as explicit
QuantizeLinear/DequantizeLinear that TensorRT fuses into INT8 kernels. On this machine INT8
``INT8_DEFAULT_CFG`` was the most accurate INT8 method measured (DESIGN.md: 0.033 relative error
vs 0.24-0.28 for ORT's), and its Q/DQ graph runs in ORT too (slowly on a CPU). FP8 and INT4-AWQ
export TensorRT-only ops (``trt::TRT_FP8QuantizeLinear``, ``trt::DequantizeLinear``): those graphs
are for TensorRT targets only.

What stays in higher precision: LayerNorm inputs (norms run in FP16/FP32 in TensorRT; modelopt's
default would quantise them), embedding tables, the modules named in ``exclude``, and the attention matmuls
(``torch.matmul`` is not a module, so modelopt does not quantise it).
"""
from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Callable
from typing import Any

import torch

from vlacompile.errors import ConfigError
from vlacompile.quantizers import matches, unmatched

CONFIGS = {"int8": "INT8_DEFAULT_CFG", "fp8": "FP8_DEFAULT_CFG", "int4": "INT4_AWQ_CFG"}
WEIGHT_BITS = {"int8": 8, "fp8": 8, "int4": 4}


def _mtq():
    # modelopt's import warns about torch.jit.script deprecations and missing transformers: noise here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import modelopt.torch.quantization as mtq
    return mtq


def quant_config(precision: str, *, excluded: list[str], per_channel: bool, block_size: int) -> dict[str, Any]:
    """modelopt's default config for ``precision`` with vlacompile's overrides (later entries win);
    ``excluded`` lists qualified module names whose quantisers stay off."""
    mtq = _mtq()

    cfg = copy.deepcopy(getattr(mtq, CONFIGS[precision]))
    entries = cfg["quant_cfg"]
    for kept in ("nn.LayerNorm", "nn.Embedding"):  # INT8_DEFAULT_CFG spares embeddings, INT4_AWQ_CFG does not
        entries.append({"quantizer_name": "*", "parent_class": kept, "enable": False})
    if precision == "int8" and not per_channel:
        entries.append({"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 8, "axis": None}})
    if precision == "int4":
        entries.append({"quantizer_name": "*weight_quantizer", "cfg": {"num_bits": 4, "block_sizes": {-1: block_size, "type": "static"}}})
    for name in excluded:
        entries.append({"quantizer_name": f"{name}.*", "enable": False})
    return cfg


def quantize_module(
    module: torch.nn.Module,
    precision: str,
    *,
    exclude: tuple[str, ...],
    per_channel: bool,
    block_size: int,
    forward_loop: Callable[[torch.nn.Module], None],
    source: str,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A fake-quant copy of ``module`` (the input is left untouched: it may be the teacher)."""
    mtq = _mtq()

    layers = [name for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    missing = unmatched(exclude, [(name, "") for name in layers])
    if missing:
        raise ConfigError(
            f"quantize.exclude names {missing}, which match no Linear or Conv layer of the model",
            source=source,
            hint=f"name torch modules by their qualified names, e.g. {', '.join(layers[:6])}, ...",
        )
    excluded = [name for name in layers if any(matches(name, p) for p in exclude)]
    if len(excluded) == len(layers):
        raise ConfigError("quantize.exclude keeps every layer in higher precision: nothing to quantise", source=source)
    qmodule = copy.deepcopy(module).eval()
    cfg = quant_config(precision, excluded=excluded, per_channel=per_channel, block_size=block_size)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # modelopt prints its progress and warns about optional plugins
        qmodule = mtq.quantize(qmodule, cfg, forward_loop=forward_loop)
    return qmodule, {"excluded": excluded, "quantized_layers": len(quantized_layers(qmodule))}


def quantized_layers(module: torch.nn.Module) -> list[str]:
    """Layers whose weight quantiser is enabled."""
    return [
        name
        for name, m in module.named_modules()
        if getattr(getattr(m, "weight_quantizer", None), "is_enabled", False)
    ]


def deployed_weight_bytes(module: torch.nn.Module, precision: str) -> int:
    """Bytes of the weights once deployed: quantised layers' weights at their bit width, the rest FP32."""
    quantized = set(quantized_layers(module))
    total = 0.0
    for name, p in module.named_parameters():
        owner = name.rsplit(".", 1)[0]
        bits = WEIGHT_BITS[precision] if owner in quantized and name.endswith(".weight") else 32
        total += p.numel() * bits / 8
    return int(total)
