"""The students of students061/ (make_fixtures_061.py), built the one way both that script and
test_lerobot061.py build them: the family's own layer selection and slicing (what distill starts
from, before training), MLP channels kept from the first, saved with ``save_policy``. No training,
so the bytes lerobot 0.6.1 loaded are the bytes this writes today."""
from __future__ import annotations

from pathlib import Path


def build_student(teacher_dir: Path, spec: dict, out: Path):
    """-> (the student policy, what lerobot cannot express of it); the student written to ``out``."""
    import torch

    from vlacompile.checkpoint import load_policy, save_policy
    from vlacompile.families import get_family

    teacher = load_policy(teacher_dir / "policy", tokenizer=teacher_dir / "vlm", lerobot_version=spec["lerobot_version"])
    family = get_family("smolvla")
    layers = family.resolve_layers(teacher.config, dict(spec["layers"]), "fixture student")
    mlp, keep = {}, {}
    for part, want in (spec.get("mlp") or {}).items():
        mlp[part] = list(want) if isinstance(want, list) else [want] * len(layers[part])
        for i, width in enumerate(mlp[part]):
            keep[(part, i)] = {"mlp": torch.arange(width)}
    config = family.student_config(teacher.config, layers, mlp, spec.get("flow_steps"))
    student = family.restructure(teacher, config, layers=layers, keep=keep)
    save_policy(student, out)
    return student, family.lerobot_gaps(student)
