"""Loads artifacts in an environment with only vlacompile-runtime installed and checks their chunks.

    python runtime/tests/check_torch_free.py DIR [--tol 1e-5]

DIR holds one folder per case (written by the compiler's tests, tests/runtime/runtime_artifacts.py):
``artifact/`` (an artifact directory), ``cases.npz`` and ``cases.json`` (observations in LeRobot's
keys, the noise, and the compiler's ONNX Runtime chunks per graph). Fails unless ``import torch``
and ``import vlacompile`` fail here, and every chunk the runtime predicts equals the compiler's to
``--tol`` (absolute). Prints the largest difference per case and graph.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir", type=Path)
    ap.add_argument("--tol", type=float, default=1e-5)
    args = ap.parse_args()
    for name in ("torch", "vlacompile"):
        if importlib.util.find_spec(name) is not None:
            print(f"FAIL: {name} is importable here; this check needs an environment with only vlacompile-runtime")
            return 1
    import vlacompile_runtime

    if not args.dir.is_dir():
        print(f"FAIL: {args.dir} is not a directory (the runtime tests write it when VLACOMPILE_RUNTIME_CASES names it)")
        return 1
    cases = sorted(p for p in args.dir.iterdir() if (p / "cases.json").is_file())
    if not cases:
        print(f"FAIL: no cases in {args.dir}")
        return 1
    failed = 0
    for case in cases:
        meta = json.loads((case / "cases.json").read_text())
        arrays = np.load(case / "cases.npz")
        for graph in meta["graphs"]:
            policy = vlacompile_runtime.load(case / "artifact", threads=1, graph=graph)
            worst = 0.0
            for i, c in enumerate(meta["cases"]):
                obs = {k: arrays[f"{i}/{k}"] for k in c["keys"]}
                obs["task"] = c["task"]
                got = policy.predict_chunk(obs, noise=arrays[f"{i}/noise"])
                want = arrays[f"{i}/expected.{graph}"]
                if got.shape != want.shape:
                    print(f"FAIL {case.name} {graph} case {i}: shape {got.shape}, expected {want.shape}")
                    failed += 1
                    continue
                worst = max(worst, float(np.abs(got.astype(np.float64) - want).max()))
            ok = worst <= args.tol
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {case.name:<28} {graph:<6} {len(meta['cases'])} observations, max |runtime - compiler| = {worst:.3g}")
    assert "torch" not in sys.modules and "vlacompile" not in sys.modules
    print(f"torch-free runtime: {len(cases)} artifacts, {'all equal' if not failed else f'{failed} FAILED'} (tol {args.tol:g})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
