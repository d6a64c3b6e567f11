"""LeRobot SmolVLA (``config.json`` ``"type": "smolvla"``): the SmolVLM2 backbone's first VLM layers
and a narrower action expert interleaving self- and cross-attention over their K/V, flow matching
from t=1 to 0. Configuration, modeling (export-friendly), processor (tokenizer, image layout) and the
family's hooks live in the modules beside this one; checkpoints are read as lerobot writes them."""
from vlacompile.families.smolvla.configuration import FAMILY, SmolVLAConfig

__all__ = ["FAMILY", "SmolVLAConfig"]
