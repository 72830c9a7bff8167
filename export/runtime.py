"""onnxruntime sessions for the exported graphs, with inputs and outputs bound to torch tensors.

On a GPU the CUDA execution provider runs with IOBinding, so inputs and outputs stay on the device, and a
session whose CUDA provider did not load is an error (onnxruntime would otherwise fall back to the CPU
without a word). On a CPU the same binding code runs with the CPU provider.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph, InvalidProtobuf, NoSuchFile
import torch
from torch import Tensor

# What export.exporter writes into manifest.json and this module reads (3: the decode graph reads LSH layers'
# keys and values through a block table, local layers' from rings; 2: the prefill graph returns only hidden
# states and cache entries; 1 also returned full logits and a pooled vector nobody read).
FORMAT = "reformer-onnx/3"

DTYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(bfloat16)": torch.bfloat16,
          "tensor(int64)": torch.int64, "tensor(bool)": torch.bool, "tensor(int32)": torch.int32}
NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64, torch.bool: np.bool_,
         torch.int32: np.int32}


class DamagedGraph(RuntimeError):
    """A graph file missing or not a readable graph: exporting again mends it (a provider that does not run
    is another error, which no export mends)."""


def create_session(path: str | Path, device: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: the server's HTTP process and torch share these cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    cuda = device.startswith("cuda")
    if not cuda:
        options.intra_op_num_threads = torch.get_num_threads()  # the process's budget, as the server set it
    if cuda:
        # CUDA only. Not `session.disable_cpu_ep_fallback`: the CUDA provider itself leaves shape arithmetic
        # (Shape, Gather, Concat on int64) to the CPU, and that option refuses any graph with such nodes. A
        # provider that did not load at all is caught below (onnxruntime would run everything on the CPU).
        providers = [("CUDAExecutionProvider", {"device_id": torch.device(device).index or 0})]
    else:
        providers = ["CPUExecutionProvider"]
    advice = "install onnxruntime-gpu with CUDA 13 and cuDNN 9, or serve with --device cpu"
    if not Path(path).is_file() or Path(path).stat().st_size == 0:  # an empty file is "InvalidArgument"
        raise DamagedGraph(f"onnxruntime could not load {path}: it is missing or empty")
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except (NoSuchFile, InvalidProtobuf, InvalidGraph) as error:
        raise DamagedGraph(f"onnxruntime could not load {path}: {error}") from None
    except Exception as error:  # noqa: BLE001 - re-raised with what to do about it
        if cuda:
            raise RuntimeError(f"the CUDA execution provider does not run for {path}: {error}; {advice}") from None
        raise RuntimeError(f"onnxruntime could not load {path}: {error}") from None
    if cuda and session.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"the CUDA execution provider does not run ({session.get_providers()}); {advice}")
    return session


class BoundGraph:
    """One session; `run(inputs, output_shapes)` binds torch tensors in and preallocated torch tensors out."""

    def __init__(self, path: str | Path, device: str):
        self.device = torch.device(device)
        self.session = create_session(path, device)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [(o.name, DTYPES[o.type]) for o in self.session.get_outputs()]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, inputs: list[Tensor], output_shapes: list[tuple[int, ...]]) -> list[Tensor]:
        binding = self.session.io_binding()
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        index = self.device.index or 0
        for name, tensor in zip(self.inputs, inputs):
            tensor = tensor.contiguous()
            binding.bind_input(name, kind, index, NUMPY[tensor.dtype], list(tensor.shape), tensor.data_ptr())
        results = []
        for (name, dtype), shape in zip(self.outputs, output_shapes):
            tensor = torch.empty(shape, dtype=dtype, device=self.device)
            binding.bind_output(name, kind, index, NUMPY[dtype], list(shape), tensor.data_ptr())
            results.append(tensor)
        self.session.run_with_iobinding(binding)
        return results


def model_digest(model) -> str:
    """What graphs were made from: the config, every parameter and buffer (the LSH rotations too), as
    they are in the model's dtype. Graphs of other weights must not be reused: their prefill would
    run one model and the torch LM head another."""
    digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().reshape(-1).cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# The code the graphs are traced from: the model's modules and the exporter's. Any change to them may change
# a graph's inputs, outputs or arithmetic, and FORMAT is bumped by hand (once it was not).
TRACED_CODE = sorted((Path(__file__).parents[1] / "model").glob("*.py")) + [Path(__file__).with_name("exporter.py"),
                                                                           Path(__file__).with_name("graphs.py")]


def code_digest() -> str:
    digest = hashlib.sha256()
    for path in TRACED_CODE:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def graphs_mismatch(directory: str | Path, pool: dict, dtype: str, digest: str) -> str | None:
    """None when `directory` holds graphs of the model with `digest` for this pool and dtype; otherwise what
    it holds instead, in words."""
    manifest = Path(directory) / "manifest.json"
    if not manifest.exists():
        return "no graphs"
    try:
        written = json.loads(manifest.read_text())
    except (OSError, ValueError) as error:
        return f"an unreadable manifest ({error})"
    if written.get("model") != digest:
        return "graphs of other weights" if written.get("model") else "graphs of unrecorded weights"
    if written.get("code") != code_digest():
        return "graphs made by other code (this server's model or exporter changed since)"
    if (written.get("pool"), written.get("format"), written.get("dtype")) != (pool, FORMAT, dtype):
        return f"graphs for {written.get('pool')} in {written.get('dtype')} ({written.get('format')})"
    return None


@contextmanager
def directory_lock(directory: str | Path) -> Iterator[None]:
    """One process at a time checks, exports and loads a directory's graphs: servers that share a volume
    (replicas) would otherwise delete each other's manifest and load graphs still being written. A directory
    that cannot be written holds graphs nobody exports into: no lock is needed to read them."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "a")
    except OSError:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file is closed, or the process dies
        yield


class ExportedModel:
    """The graphs of one export directory (see export.exporter), on one device."""

    def __init__(self, directory: str | Path, device: str = "cpu"):
        directory = Path(directory)
        self.directory = directory
        self.manifest = json.loads((directory / "manifest.json").read_text())
        if self.manifest.get("format") != FORMAT:
            raise RuntimeError(f"{directory} holds graphs of format {self.manifest.get('format')!r}, this server reads "
                               f"{FORMAT!r}: export them again (python -m export)")
        self.graphs = {name: BoundGraph(directory / entry["file"], device)
                       for name, entry in self.manifest["graphs"].items()}

    @property
    def provider(self) -> str:
        return self.graphs["decode"].provider

    def prefill_graph(self, length: int) -> BoundGraph:
        for name, entry in self.manifest["graphs"].items():
            if name != "decode" and entry["min"] <= length <= entry["max"] and length % entry["multiple"] == 0:
                return self.graphs[name]
        raise ValueError(f"no exported prefill graph takes a padded length of {length}")
