"""Observations -> an ONNX policy's inputs: the runtime's ``OnnxPolicyPreprocessor``
(``vlacompile_runtime.processors``): uint8 [N, 3, H, W] per camera, the state as it is, the task
written into the manifest's ``prompt`` and tokenised."""
from vlacompile_runtime.processors import OnnxPolicyPreprocessor  # noqa: F401
