"""Checkpoints: the reference's save_pretrained directories, legacy .bin files, and our own format."""

import json
import os

import pytest
import torch

from model.checkpoint import CheckpointError, load_model, read_config, save_model
from tests.reference import TINY, build_pair, random_ids, rng_for


def test_save_pretrained_directory_gives_identical_logits(tmp_path):
    reference, _ = build_pair(dict(TINY))
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    model = load_model(tmp_path)
    ids = random_ids(rng_for("save-pretrained"), 2, 24, TINY["vocab_size"])
    with torch.no_grad():
        assert (model(ids) - reference(ids).logits).abs().max() <= 1e-5


def test_legacy_bin_loads_without_unpickling_code(tmp_path):
    reference, _ = build_pair(dict(TINY))
    reference.config.to_json_file(tmp_path / "config.json")
    torch.save(reference.state_dict(), tmp_path / "pytorch_model.bin")
    ids = random_ids(rng_for("bin"), 1, 16, TINY["vocab_size"])
    with torch.no_grad():
        assert (load_model(tmp_path)(ids) - reference(ids).logits).abs().max() <= 1e-5


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_pickled_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    reference, _ = build_pair(dict(TINY))
    reference.config.to_json_file(tmp_path / "config.json")
    torch.save({"reformer.embeddings.word_embeddings.weight": _Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception):
        load_model(tmp_path)
    assert not marker.exists()


def test_lm_head_bias_policy(tmp_path):
    """A trained output bias (trax conversions) is applied by default; lm_head_bias=False is transformers 5.x."""
    reference, _ = build_pair(dict(TINY))
    with torch.no_grad():
        reference.lm_head.bias.copy_(torch.linspace(-3, 3, TINY["vocab_size"]))
    reference.save_pretrained(tmp_path)
    ids = random_ids(rng_for("bias"), 1, 12, TINY["vocab_size"])
    with torch.no_grad():
        expected = reference(ids).logits  # transformers 5.x ignores the bias
        assert (load_model(tmp_path, lm_head_bias=False)(ids) - expected).abs().max() <= 1e-5
        with_bias = load_model(tmp_path)(ids)
    torch.testing.assert_close(with_bias, expected + torch.linspace(-3, 3, TINY["vocab_size"]))


def test_our_format_round_trips_with_rotations(tmp_path):
    _, model = build_pair(dict(TINY))
    for block in model.layers:
        if block.kind == "lsh":
            block.attn.rotations.normal_(generator=torch.Generator().manual_seed(7))  # not derivable from the seed
    save_model(model, tmp_path / "fp32")
    save_model(model, tmp_path / "fp16", dtype=torch.float16)
    ids = random_ids(rng_for("ours"), 2, 20, TINY["vocab_size"])
    loaded = load_model(tmp_path / "fp32")
    half = load_model(tmp_path / "fp16")
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))
        assert (half(ids) - model(ids)).abs().max() < 0.5  # fp16 weights, fp32 compute
    assert json.loads((tmp_path / "fp32" / "reformer.json").read_text())["tokenizer"] == "bytes"
    assert read_config(tmp_path / "fp32") == model.config  # what the server's HTTP processes read, no weights
    for a, b in zip(loaded.layers, half.layers):
        if a.kind == "lsh":
            assert a.attn.rotations.dtype == torch.float32 and torch.equal(a.attn.rotations, b.attn.rotations)


def test_mismatched_weights_are_reported(tmp_path):
    _, model = build_pair(dict(TINY))
    save_model(model, tmp_path)
    data = json.loads((tmp_path / "reformer.json").read_text())
    data["config"]["feed_forward_size"] = 16
    (tmp_path / "reformer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="do not match"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "missing")


def test_generation_defaults_are_read_checked_and_filled_only_where_a_request_is_silent(tmp_path):
    from model.checkpoint import read_default_max_tokens, read_generation_defaults
    from server.protocol import CompletionRequest

    assert read_generation_defaults(tmp_path) == {} and read_generation_defaults(None) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.2, "max_new_tokens": 99, "eos_token_id": 2}))
    defaults = read_generation_defaults(tmp_path)
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.2}  # sampling fields only

    silent = CompletionRequest(prompt="x").sampling_params(8, None, 258, defaults)
    assert (silent.temperature, silent.top_p, silent.repetition_penalty) == (0.6, 0.9, 1.2)
    explicit = CompletionRequest(prompt="x", temperature=1.0, repetition_penalty=1.0).sampling_params(
        8, None, 258, defaults)
    assert (explicit.temperature, explicit.top_p, explicit.repetition_penalty) == (1.0, 0.9, 1.0)
    assert CompletionRequest(prompt="x").sampling_params(8, None, 258).temperature == 1.0  # no defaults: OpenAI's

    assert read_default_max_tokens(tmp_path) == 99 and read_default_max_tokens(None) is None
    for bad in ({"temperature": -1}, {"top_p": "high"}, {"repetition_penalty": True}):
        (tmp_path / "generation_config.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match="generation_config.json"):
            read_generation_defaults(tmp_path)
    for bad in (0, 2.5, "many", True):
        (tmp_path / "generation_config.json").write_text(json.dumps({"max_new_tokens": bad}))
        with pytest.raises(CheckpointError, match="max_new_tokens"):
            read_default_max_tokens(tmp_path)


def test_a_bad_generation_config_stops_start_up_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.server_harness import tiny_checkpoint

    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    (checkpoint / "generation_config.json").write_text(json.dumps({"temperature": -1}))
    from bench.launcher import free_port

    result = subprocess.run([sys.executable, "-m", "server", "--model", str(checkpoint), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-2000:]
    assert "generation_config.json" in output and "'temperature' must be" in output
