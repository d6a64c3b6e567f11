"""Any policy exported as ONNX, as a teacher (``config.json`` ``"model_type": "onnx-policy"``): a
graph and a manifest that maps LeRobot keys to its inputs. Opaque: it is run, never sliced,
pruned, quantised or re-exported; students of other families learn from its outputs."""
