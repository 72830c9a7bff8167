"""ONNX export and the onnxruntime backend against PyTorch (CPU, fp32)."""

import copy
import json
import threading
import time

import onnx
import pytest
import torch

from export.backend import OnnxDecoder, embed_steps
from export.exporter import export_model, prefill_regimes
from export.runtime import (DamagedGraph, ExportedModel, create_session, directory_lock, graphs_mismatch,
                            model_digest)
from model import SamplingParams, embed, generate
from model.config import ReformerConfig
from model.decode import Decoder
from model.reformer import drain
from model.reformer import ReformerLM
from tests.seed import rng_for

CONFIGS = {
    # equal chunk lengths: a short graph and a bucketed one
    "equal-chunks": dict(attn_layers=("local", "lsh", "lsh"), lsh_attn_chunk_length=16, local_attn_chunk_length=16,
                         num_buckets=4, num_hashes=2, lsh_num_chunks_before=1, local_num_chunks_before=1),
    # different chunk lengths: also the length at which only the larger-chunk layers run plain attention
    "mixed-chunks": dict(attn_layers=("lsh", "local", "local", "lsh"), lsh_attn_chunk_length=32,
                         local_attn_chunk_length=16, num_buckets=[2, 4], num_hashes=3, lsh_num_chunks_before=2,
                         local_num_chunks_before=2),
}



@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory):
    config = ReformerConfig(vocab_size=258, hidden_size=32, num_attention_heads=2, attention_head_size=16,
                            feed_forward_size=64, axial_pos_shape=(16, 32), axial_pos_embds_dim=(16, 16),
                            max_position_embeddings=512, eos_token_id=None, hash_seed=7, **CONFIGS[request.param])
    torch.manual_seed(0)
    model = ReformerLM(config).eval()
    with torch.no_grad():  # sharper weights: outputs depend on every detail
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.mul_(4)
    directory = tmp_path_factory.mktemp("onnx") / request.param
    # Blocks of 16 positions, fewer than four full-length sequences need: sequences borrow by their length.
    export_model(model, directory, slots=4, max_length=256, tail_capacity=8, cache_blocks=40, block_size=16,
                 progress=lambda _: None)
    return model, ExportedModel(directory, "cpu")


def test_graphs_are_valid_deterministic_and_dynamic(exported):
    model, graphs = exported
    manifest = graphs.manifest
    assert set(manifest["graphs"]) == {r["name"] for r in prefill_regimes(model.config)} | {"decode"}
    for entry in manifest["graphs"].values():
        proto = onnx.load(str(graphs.directory / entry["file"]))
        onnx.checker.check_model(proto)
        assert not [n.op_type for n in proto.graph.node if n.op_type.startswith("Random")]
        assert isinstance(entry["inputs"][0]["shape"][0], str)  # a symbolic (dynamic) batch in every graph
    if model.config.lsh_attn_chunk_length != model.config.local_attn_chunk_length:
        assert "prefill_mid" in manifest["graphs"]
    # A prefill graph computes what its callers read and nothing more: hidden states and cache entries (the
    # LM head runs in torch on the rows a prefill wants; an embedding wants none).
    config = model.config
    for name, entry in manifest["graphs"].items():
        if name != "decode":
            assert len(entry["outputs"]) == 1 + config.num_layers + config.attn_layers.count("lsh")
            assert entry["outputs"][0]["shape"][-1] == 2 * config.hidden_size
            assert all(output["shape"][-1] != config.vocab_size for output in entry["outputs"])
    assert manifest["format"] == "reformer-onnx/3"
    assert manifest["opset"] >= 18 and manifest["pool"] == {"slots": 4, "max_length": 256, "tail_capacity": 8,
                                                             "cache_blocks": 40, "block_size": 16}


@pytest.mark.parametrize("batch", [1, 3])
def test_logits_and_embeddings_match_torch_across_lengths(exported, batch):
    model, graphs = exported
    rng = rng_for("onnx-forward", batch)
    documents = [[rng.randrange(3, 258) for _ in range(n)] for n in (1, 7, 16, 32, 40, 64, 130)[: 3 + 2 * batch]]
    expected = embed(model, documents, pooling="mean")
    actual = drain(embed_steps(graphs, model.config, torch.device("cpu"), documents, pooling="mean"))
    assert (expected - actual).abs().max() <= 1e-4
    contexts = [len(d) // 2 for d in documents]  # chunks' overlaps: attended to, not pooled
    for pooling in ("mean", "last"):
        expected = embed(model, documents, pooling=pooling, contexts=contexts)
        actual = drain(embed_steps(graphs, model.config, torch.device("cpu"), documents, pooling=pooling,
                                   contexts=contexts))
        assert (expected - actual).abs().max() <= 1e-4
    for documents_group in (documents[:batch], documents[-batch:]):
        decoder, onnx_decoder = Decoder(model, 4, 256, tail_capacity=8), OnnxDecoder(model, graphs)
        slots = [(decoder.allocate(), onnx_decoder.allocate(len(d))) for d in documents_group]
        torch_logits = decoder.prefill([(a, d) for (a, _), d in zip(slots, documents_group)], prompt_logits=True)
        onnx_logits = onnx_decoder.prefill([(b, d) for (_, b), d in zip(slots, documents_group)], prompt_logits=True)
        assert (torch_logits.last_logits - onnx_logits.last_logits).abs().max() <= 1e-4
        for a, b in zip(torch_logits.prompt_logits, onnx_logits.prompt_logits):
            assert (a - b).abs().max() <= 1e-4


def test_decode_steps_match_torch_and_repeat_exactly(exported):
    model, graphs = exported
    rng = rng_for("onnx-decode")
    prompts = [[rng.randrange(3, 258) for _ in range(n)] for n in (1, 20, 33)]
    runs = []
    for _ in range(2):
        onnx_decoder = OnnxDecoder(model, graphs)
        slots = [onnx_decoder.allocate(len(p) + 32) for p in prompts]
        logits = [onnx_decoder.prefill(list(zip(slots, prompts))).last_logits]
        for t in range(32):  # 32 steps: several tail merges (capacity 8); batch of 3, then 1
            active = slots if t % 4 else slots[1:2]
            logits.append(onnx_decoder.step(active, [3 + (t * 7 + i) % 250 for i in range(len(active))]))
        runs.append(logits)
    decoder = Decoder(model, 4, 256, tail_capacity=8)
    slots = [decoder.allocate() for _ in prompts]
    expected = [decoder.prefill(list(zip(slots, prompts))).last_logits]
    for t in range(32):
        active = slots if t % 4 else slots[1:2]
        expected.append(decoder.step(active, [3 + (t * 7 + i) % 250 for i in range(len(active))]))
    for a, b, c in zip(runs[0], runs[1], expected):
        assert torch.equal(a, b)  # two runs give identical results
        assert (a - c).abs().max() <= 1e-4
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    assert ([o.token_ids for o in generate(model, prompts, greedy, decoder=OnnxDecoder(model, graphs))]
            == [o.token_ids for o in generate(model, prompts, greedy)])


def test_cuda_provider_that_does_not_run_is_an_error(exported, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the CUDA provider is expected to run")
    _, graphs = exported
    with pytest.raises(RuntimeError, match="CUDA") as error:
        create_session(graphs.directory / "decode.onnx", "cuda")
    assert not isinstance(error.value, DamagedGraph)  # the server must not export again over good graphs


def test_cpu_sessions_take_the_threads_torch_was_given(exported):
    """The server sets one thread budget for the model on CPU (`--cpu-threads`); the graphs keep to it."""
    _, graphs = exported
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        session = create_session(graphs.directory / "decode.onnx", "cpu")
        assert session.get_session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(before)


def test_graphs_are_reused_only_for_the_weights_pool_and_dtype_they_were_made_from(exported, tmp_path):
    """A server reuses a directory's graphs only when its manifest names them: other weights (a checkpoint
    retrained in place) used to run one model's prefill under another's LM head."""
    model, graphs = exported
    pool, digest = graphs.manifest["pool"], model_digest(model)
    assert graphs_mismatch(graphs.directory, pool, "float32", digest) is None
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    assert graphs_mismatch(graphs.directory, pool, "float32", model_digest(other)) == "graphs of other weights"
    assert graphs_mismatch(graphs.directory, {**pool, "slots": 1}, "float32", digest).startswith("graphs for")
    assert graphs_mismatch(graphs.directory, pool, "bfloat16", digest).startswith("graphs for")
    # graphs of the same weights, but traced from code that has changed since (FORMAT was not bumped)
    (tmp_path / "manifest.json").write_text(json.dumps({**graphs.manifest, "code": "0" * 64}))
    assert graphs_mismatch(tmp_path, pool, "float32", digest).startswith("graphs made by other code")
    (tmp_path / "manifest.json").unlink()
    assert graphs_mismatch(tmp_path, pool, "float32", digest) == "no graphs"
    (tmp_path / "manifest.json").write_text('{"format": "reformer-onn')  # cut short
    assert graphs_mismatch(tmp_path, pool, "float32", digest).startswith("an unreadable manifest")


def test_a_graph_file_missing_or_cut_short_is_a_damaged_graph(exported, tmp_path):
    """What the server mends by exporting again (and nothing else is)."""
    _, graphs = exported
    with pytest.raises(DamagedGraph):
        create_session(tmp_path / "missing.onnx", "cpu")
    cut = tmp_path / "decode.onnx"
    cut.write_bytes((graphs.directory / "decode.onnx").read_bytes()[:3000])
    with pytest.raises(DamagedGraph):
        create_session(cut, "cpu")
    cut.write_bytes(b"")  # opened for writing, nothing written yet (onnxruntime says "InvalidArgument")
    with pytest.raises(DamagedGraph):
        create_session(cut, "cpu")


def test_one_server_at_a_time_checks_exports_and_loads_a_graph_directory(tmp_path):
    """Replicas that share a volume take turns; a directory nobody can write needs no turn."""
    held = threading.Event()

    def first():
        with directory_lock(tmp_path / "graphs"):
            held.set()
            time.sleep(0.5)

    thread = threading.Thread(target=first)
    thread.start()
    assert held.wait(10)
    asked = time.monotonic()
    with directory_lock(tmp_path / "graphs"):
        waited = time.monotonic() - asked
    thread.join()
    assert waited > 0.3
    (tmp_path / "a-file").write_text("")  # a place no lock can be made in (root may write read-only folders)
    with directory_lock(tmp_path / "a-file" / "graphs"):
        pass
