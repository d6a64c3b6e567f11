"""The reference VLA family (``model_type = "vlacompile-reference"``): vlacompile's own miniature
pi0 / GR00T, the demo teacher's architecture. Configuration, modeling, processor and the family's
hooks live in the modules beside this one."""
from vlacompile.families.reference.configuration import FAMILY, ReferenceConfig
from vlacompile.families.reference.modeling import ReferenceVLA, build, flops_per_call, spec_of

__all__ = ["FAMILY", "ReferenceConfig", "ReferenceVLA", "build", "flops_per_call", "spec_of"]
