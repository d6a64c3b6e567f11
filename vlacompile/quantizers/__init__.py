"""Quantisation backends, one module per tool, used by the ``quantize`` stage:

* ``ort``: ONNX Runtime's quantisers on an exported graph: dynamic INT8 (MatMulInteger), static
  INT8 (QDQ, calibrated) and weight-only INT4 (MatMulNBits);
* ``modelopt``: nvidia-modelopt on the torch model (fake-quant INT8 / FP8 / INT4-AWQ), exported
  afterwards with explicit Q/DQ that TensorRT fuses.

Both map the recipe's ``exclude`` list (torch module names) to what they quantise: modelopt by
module name, ORT by ONNX node name, which the export stage writes as ``/<module path>/<op>``.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import numpy as np

from vlacompile.policy import PolicySpec


def node_module(node_name: str) -> str:
    """The torch module an exported node belongs to: ``/expert/state_in/Gemm`` -> ``expert.state_in``."""
    if not node_name.startswith("/"):
        return ""
    return ".".join(p for p in node_name.split("/")[1:-1] if p)


def matches(module: str, pattern: str, node_name: str = "") -> bool:
    """``pattern`` names ``module`` or one of its parents (``expert`` covers ``expert.state_in``),
    matches it as a glob (``expert.blocks.*.mlp.fc1``), or is a substring of the ONNX node name."""
    if module and (module == pattern or module.startswith(pattern + ".") or fnmatch.fnmatchcase(module, pattern)):
        return True
    return bool(node_name) and pattern in node_name


def unmatched(patterns: Iterable[str], names: Iterable[tuple[str, str]]) -> list[str]:
    """Patterns that match none of the (module, node name) pairs: a typo would quantise what it meant to keep."""
    names = list(names)
    return [p for p in patterns if not any(matches(m, p, n) for m, n in names)]


def sample_inputs(spec: PolicySpec, episodes, n: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """``n`` model inputs drawn stratified from ``episodes`` (tasks, episodes, time), with seeded noise.

    The family's preprocessor makes them (camera order, tokenizer), as at run time.
    """
    from vlacompile.data.sampling import draw_stratified

    samples = draw_stratified(episodes, n, chunk_size=spec.chunk_size, seed=seed)
    noise = np.random.default_rng(seed).standard_normal((len(samples), *spec.noise_shape), dtype=np.float32)
    name = next(i.name for i in spec.inputs if i.role == "noise")
    return {**samples.model_inputs(spec), name: noise}
