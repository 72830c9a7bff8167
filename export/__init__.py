"""ONNX export of the model core (`python -m export`) and the onnxruntime backend (`--backend onnx`).

- `graphs`: the prefill and decode computations as exportable modules;
- `exporter`: export, checks (onnx checker, no random operators), manifest.json;
- `runtime`: onnxruntime sessions with IOBinding; a CUDA provider that does not run is an error;
- `backend`: the decoder and embedder that run the graphs for the server's engine.
"""
