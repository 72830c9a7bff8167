"""The engine without HTTP: detokenization, stop strings, cancellation and deadlines, slot accounting."""

import time

import pytest
import torch

from model import ByteTokenizer, SamplingParams, generate, load_model
from server.engine import Engine, TextStream
from server.settings import ServerSettings, parse_args
from server.worker import ReformerAPI
from tests.server_harness import tiny_checkpoint


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny_checkpoint(tmp_path_factory.mktemp("engine") / "tiny"))


def run(engine: Engine, limit: int = 10_000) -> list[dict]:
    events = []
    for _ in range(limit):
        if not engine.has_work():
            return events
        events += [event for _, event in engine.iteration()]
    raise AssertionError("the engine did not finish")


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    tokenizer = ByteTokenizer()
    stream = TextStream(tokenizer, stop=("END",))
    out = "".join(stream.push(t)[0] for t in tokenizer.encode("héllo E"))
    assert out == "héllo"  # "é" waited for its second byte; " E" may start "END"
    assert stream.push(tokenizer.encode("N")[0]) == (" ", False)  # only "EN" can still begin the stop
    assert stream.push(tokenizer.encode("D")[0]) == ("", True)
    plain = TextStream(tokenizer)
    assert "".join(plain.push(t)[0] for t in tokenizer.encode("日本")) + plain.finish() == "日本"


def test_engine_batches_requests_like_offline_generation(model):
    engine = Engine(model, ByteTokenizer(), max_running=2, prefill_batch_tokens=32)
    prompts = [ByteTokenizer().encode(p) for p in ("one", "two two", "three three three")]
    for i, prompt in enumerate(prompts):
        engine.submit({"kind": "generate", "uid": str(i), "route": 0, "prompt_ids": prompt,
                       "params": SamplingParams(max_tokens=9, temperature=0.0)})
    events = run(engine)
    expected = generate(model, prompts, SamplingParams(max_tokens=9, temperature=0.0))
    for i in range(3):
        tokens = [e["token"] for e in events if e["uid"] == str(i) and e["type"] == "token"]
        assert tokens == expected[i].token_ids
    assert engine.decoder.free_slots == 2


def test_cancel_mid_prefill_and_mid_decode_frees_slots(model):
    engine = Engine(model, ByteTokenizer(), max_running=2)
    params = SamplingParams(max_tokens=150, temperature=0.0)
    engine.submit({"kind": "generate", "uid": "a", "route": 0, "prompt_ids": [5] * 300, "params": params})
    engine.iteration()  # admitted; its prefill is one layer in
    assert engine.work is not None and engine.decoder.free_slots == 1
    engine.submit({"kind": "cancel", "uid": "a"})
    events = [e for _, e in engine.iteration()]
    assert engine.work is None and engine.decoder.free_slots == 2
    assert events[0]["type"] == "done" and events[0]["finish_reason"] == "cancelled"
    engine.submit({"kind": "generate", "uid": "b", "route": 0, "prompt_ids": [6, 7], "params": params})
    for _ in range(10):
        engine.iteration()
    assert engine.running and engine.decoder.free_slots == 1
    engine.submit({"kind": "cancel", "uid": "b"})
    engine.iteration()
    assert not engine.running and engine.decoder.free_slots == 2


def test_deadline_and_refused_requests(model):
    engine = Engine(model, ByteTokenizer(), max_running=1)
    engine.submit({"kind": "generate", "uid": "late", "route": 0, "prompt_ids": [5, 6], "timeout": 0.05,
                   "params": SamplingParams(max_tokens=450, temperature=0.0)})
    engine.iteration()
    time.sleep(0.1)
    done = [e for e in run(engine) if e["type"] == "done"]
    assert done[0]["timeout"] and done[0]["finish_reason"] == "cancelled"
    engine.submit({"kind": "generate", "uid": "big", "route": 0, "prompt_ids": [5] * 500,
                   "params": SamplingParams(max_tokens=100)})
    error = run(engine)[0]
    assert error["type"] == "error" and error["status"] == 400 and "exceeds" in error["message"]
    assert engine.decoder.free_slots == 1


def test_slot_count_follows_the_cache_budget(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    settings = ServerSettings(model=str(checkpoint), max_running=16, kv_cache_bytes=4 << 20)
    api = ReformerAPI.__new__(ReformerAPI)
    api.settings = settings
    config = settings.model_config()
    per_slot = 4 * 2 * 512 * 2 * 16 * 4 + 2 * 2 * 2 * 512 * 8  # four layers of keys+values, two bucket indexes
    assert api._slots_that_fit(config, 512, torch.float32, "cpu") == (4 << 20) // per_slot - 1 == 6
    settings.kv_cache_bytes = per_slot
    with pytest.raises(RuntimeError, match="lower --max-model-len"):
        api._slots_that_fit(config, 512, torch.float32, "cpu")


def test_command_line_needs_a_model_until_the_default_exists(tmp_path, monkeypatch):
    import server.settings as settings_module

    monkeypatch.setattr(settings_module, "DEFAULT_MODEL", tmp_path / "absent")
    with pytest.raises(SystemExit, match="no embedded default model"):
        parse_args([]).model_config()
    with pytest.raises(SystemExit):
        parse_args(["--max-running", "0"])
