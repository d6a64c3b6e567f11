"""Where the files that ship with vlacompile live (targets, recipes, demo teacher and episodes)."""
from __future__ import annotations

import os
from pathlib import Path

# The repository root (an editable install), or VLACOMPILE_HOME for a relocated copy.
ROOT = Path(os.environ.get("VLACOMPILE_HOME", Path(__file__).resolve().parent.parent))
TARGETS_DIR = ROOT / "targets"
RECIPES_DIR = ROOT / "recipes"
CALIBRATION_DIR = ROOT / "calibration"
DEMO_TEACHER = ROOT / "demo" / "teacher"
DEMO_EPISODES = CALIBRATION_DIR / "demo"
