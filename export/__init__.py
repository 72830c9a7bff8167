"""ONNX export of the model core and an onnxruntime backend: built by issue #5 on top of `model`."""
