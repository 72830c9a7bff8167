"""The engine without HTTP: detokenization, stop strings, cancellation and deadlines, slot accounting, and
faults that stay with the request that caused them."""

import time
from types import SimpleNamespace
from unittest.mock import MagicMock

import pytest
import torch

from model import ByteTokenizer, SamplingParams, generate, load_model
from model.detokenize import TextStream
from model.engine import Engine
from model.messages import (Cancel, EmbedRequest, Embeddings, ErrorCode, Failed, Finished, FinishReason,
                            GenerateRequest, Token)
from model.sampling import MIN_TEMPERATURE, InvalidParameter, Sampler, TokenChoice
from server.settings import parse_args
from server.worker import ReformerAPI
from tests.server_harness import tiny_checkpoint

GREEDY = SamplingParams(max_tokens=9, temperature=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_model(tiny_checkpoint(tmp_path_factory.mktemp("engine") / "tiny"))


def run(engine: Engine, limit: int = 10_000) -> list:
    outputs = []
    for _ in range(limit):
        if not engine.has_work():
            return outputs
        outputs += [output for _, output in engine.iteration()]
    raise AssertionError("the engine did not finish")


def tokens_of(outputs: list, uid: str) -> list[int]:
    return [o.token for o in outputs if o.uid == uid and isinstance(o, Token)]


def ending(outputs: list, uid: str):
    (last,) = [o for o in outputs if o.uid == uid and isinstance(o, Finished | Failed | Embeddings)]
    return last


def alone(model, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
    """What a request generates by itself: the same decoder math, one sequence, nothing beside it."""
    return generate(model, [prompt], params, num_slots=1)[0].token_ids


def test_text_stream_holds_back_partial_characters_and_stop_prefixes():
    tokenizer = ByteTokenizer()
    stream = TextStream(tokenizer, stop=("END",))
    out = "".join(stream.push(t)[0] for t in tokenizer.encode("héllo E"))
    assert out == "héllo"  # "é" waited for its second byte; " E" may start "END"
    assert stream.push(tokenizer.encode("N")[0]) == (" ", False)  # only "EN" can still begin the stop
    assert stream.push(tokenizer.encode("D")[0]) == ("", True)
    plain = TextStream(tokenizer)
    assert "".join(plain.push(t)[0] for t in tokenizer.encode("日本")) + plain.finish() == "日本"


def test_text_after_a_prompt_that_ends_inside_a_character_is_not_lost():
    tokenizer = ByteTokenizer()
    smile, after = tokenizer.encode("😀"), tokenizer.encode("aaa")
    stream = TextStream(tokenizer, context=tokenizer.encode("\0") + smile[:2])  # a prompt of ids, cut mid-character
    text = "".join(stream.push(t)[0] for t in smile[2:] + after) + stream.finish()
    assert text == tokenizer.decode(smile[2:] + after) == "\ufffd\ufffdaaa"  # what the generated ids say


def test_text_stream_can_keep_the_stop_string_and_show_special_tokens():
    tokenizer = ByteTokenizer()
    kept = TextStream(tokenizer, stop=("END",), include_stop=True)
    out = "".join(kept.push(t)[0] for t in tokenizer.encode("abEN"))
    assert out + kept.push(tokenizer.encode("D")[0])[0] == "abEND"
    shown = TextStream(tokenizer, skip_special=False)
    text = "".join(shown.push(t)[0] for t in [*tokenizer.encode("a"), tokenizer.eos_id, *tokenizer.encode("b")])
    assert text + shown.finish() == "a</s>b"


def _scripted(monkeypatch, tokens: list[int]) -> None:
    """Every sampler picks `tokens` in turn, whatever the model says."""
    script = iter(tokens)
    monkeypatch.setattr(Sampler, "choose", lambda self, logits, adjusted=None: TokenChoice(next(script), 0.0))


@pytest.mark.parametrize("ender", ["eos", "stop token"])
def test_text_held_back_for_a_stop_string_is_released_when_a_stop_token_ends(model, monkeypatch, ender):
    """A stop string holds back the text that might begin it; an end-of-sequence or stop token must still
    release that text (without its own), or the answer loses its end."""
    tokenizer = ByteTokenizer()
    last = tokenizer.eos_id if ender == "eos" else tokenizer.encode("#")[0]
    monkeypatch.setattr(model.config, "eos_token_id", tokenizer.eos_id)  # the tiny model names none
    _scripted(monkeypatch, [*tokenizer.encode("The answer is 42."), last])
    engine = Engine(model, tokenizer, max_running=1)
    params = SamplingParams(max_tokens=50, temperature=0.0, stop_token_ids=(last,) if ender != "eos" else ())
    engine.submit(GenerateRequest("a", (5, 6), params, stop=("\n\nUser:",)))
    outputs = run(engine)
    assert "".join(o.text for o in outputs if isinstance(o, Token)) == "The answer is 42."
    assert ending(outputs, "a").reason is FinishReason.STOP


def test_a_request_that_fails_to_start_decoding_fails_alone_and_frees_its_slot(model, monkeypatch):
    """A fault after the prefill (here: scoring the prompt for echo with logprobs) ends that request with a
    500; the request prefilled with it and the one already decoding are served as if alone."""
    import model.engine as engine_module

    engine = Engine(model, ByteTokenizer(), max_running=3)
    engine.submit(GenerateRequest("early", (5, 6, 7), GREEDY))
    while not engine.running:
        engine.iteration()
    monkeypatch.setattr(engine_module, "_prompt_logprobs", lambda job, logits: 1 / 0)
    engine.submit(GenerateRequest("echo", (8, 9), GREEDY, prompt_logprobs=True))
    engine.submit(GenerateRequest("beside", (10, 11), GREEDY))
    outputs = run(engine)
    failure = ending(outputs, "echo")
    assert isinstance(failure, Failed) and failure.status == 500 and "starting generation" in failure.message
    assert tokens_of(outputs, "beside") == alone(model, [10, 11])
    assert ending(outputs, "early").reason is FinishReason.LENGTH
    assert engine.decoder.free_slots == 3 and not engine.running and engine.work is None


def test_requests_borrow_cache_blocks_for_what_they_need_and_wait_for_them(model):
    """Four slots but two blocks of 256 positions: requests of 14 tokens take a block each, so two decode at
    once and the others wait (never fail); one that could never get its blocks is refused with a 400."""
    engine = Engine(model, ByteTokenizer(), max_running=4, cache_blocks=2)
    assert engine.decoder.blocks.block_size == 256
    for uid in "abc":
        engine.submit(GenerateRequest(uid, (5, 6, 7, 8, 9), GREEDY))
    engine.submit(GenerateRequest("too-big", (5, 6, 7), SamplingParams(max_tokens=300), n=2))  # 2 x 2 blocks
    outputs, running = [], []
    while engine.has_work():
        outputs += [output for _, output in engine.iteration()]
        running.append(len(engine.running))
    assert max(running) == 2
    for uid in "abc":
        assert tokens_of(outputs, uid) == alone(model, [5, 6, 7, 8, 9]) and isinstance(ending(outputs, uid), Finished)
    refused = ending(outputs, "too-big")
    assert refused.status == 400 and refused.code is ErrorCode.CONTEXT_LENGTH and "cache blocks" in refused.message
    assert engine.decoder.blocks.free_blocks == 2 and engine.decoder.free_slots == 4 and engine.decoder.usage == 0


def test_n_choices_come_from_one_prefill_copied_into_n_slots(model):
    engine = Engine(model, ByteTokenizer(), max_running=4)
    prompt = (5, 6, 7, 8, 9)
    engine.submit(GenerateRequest("greedy", prompt, GREEDY, n=3))
    outputs = run(engine)
    assert engine.prefills == 1 and engine.decoder.free_slots == 4
    for index in range(3):
        assert [o.token for o in outputs if isinstance(o, Token) and o.index == index] == alone(model, list(prompt))
    sampled = SamplingParams(max_tokens=9, temperature=1.0, seed=42)
    engine.submit(GenerateRequest("seeded", prompt, sampled, n=3))
    outputs = run(engine)
    for index in range(3):  # choice j draws what a request with seed + j draws alone
        got = [o.token for o in outputs if isinstance(o, Token) and o.index == index]
        assert got == alone(model, list(prompt), sampled.for_choice(index))
    assert len({tuple(o.token for o in outputs if isinstance(o, Token) and o.index == i) for i in range(3)}) > 1
    engine.submit(GenerateRequest("too many", prompt, GREEDY, n=5))
    assert ending(run(engine), "too many").status == 400


def test_penalised_sequences_in_one_batch_generate_what_each_generates_alone(model):
    """Penalty counts are kept per slot: neighbours (penalised or not, and n sibling choices) do not leak."""
    penalised = SamplingParams(max_tokens=12, temperature=0.0, presence_penalty=1.5, frequency_penalty=0.8,
                               repetition_penalty=1.4, logit_bias=((10, 2.0),))
    prompts = {"p": ((5, 6, 7), penalised), "plain": ((8, 9), GREEDY), "q": ((10, 11, 12, 13), penalised)}
    engine = Engine(model, ByteTokenizer(), max_running=5)
    for uid, (prompt, params) in prompts.items():
        engine.submit(GenerateRequest(uid, prompt, params, n=2 if uid == "q" else 1))
    outputs = run(engine)
    for uid, (prompt, params) in prompts.items():
        expected = alone(model, list(prompt), params)
        assert [o.token for o in outputs if o.uid == uid and isinstance(o, Token) and o.index == 0] == expected
    assert [o.token for o in outputs if o.uid == "q" and isinstance(o, Token) and o.index == 1] == \
        alone(model, [10, 11, 12, 13], penalised)
    assert alone(model, [5, 6, 7], penalised) != alone(model, [5, 6, 7])  # the penalties do something here


def test_batched_requests_generate_what_each_generates_alone(model):
    engine = Engine(model, ByteTokenizer(), max_running=2, prefill_batch_tokens=32)
    prompts = [ByteTokenizer().encode(p) for p in ("one", "two two", "three three three")]
    for i, prompt in enumerate(prompts):
        engine.submit(GenerateRequest(str(i), tuple(prompt), GREEDY))
    outputs = run(engine)
    for i, prompt in enumerate(prompts):
        assert tokens_of(outputs, str(i)) == alone(model, prompt)
        assert ending(outputs, str(i)) == Finished(str(i), FinishReason.LENGTH, len(prompt), 9)
    assert engine.decoder.free_slots == 2


def test_unknown_messages_are_refused_loudly(model):
    engine = Engine(model, ByteTokenizer())
    with pytest.raises(TypeError, match="GenerateRequest"):
        engine.submit({"kind": "generate", "uid": "x"})


def test_cancel_mid_prefill_and_mid_decode_frees_slots(model):
    engine = Engine(model, ByteTokenizer(), max_running=2)
    params = SamplingParams(max_tokens=150, temperature=0.0)
    engine.submit(GenerateRequest("a", (5,) * 300, params))
    engine.iteration()  # admitted; its prefill is one layer in
    assert engine.work is not None and engine.decoder.free_slots == 1
    engine.submit(Cancel("a"))
    outputs = [o for _, o in engine.iteration()]
    assert engine.work is None and engine.decoder.free_slots == 2
    assert outputs == [Finished("a", FinishReason.ABORT, 300, 0)]
    engine.submit(GenerateRequest("b", (6, 7), params))
    for _ in range(10):
        engine.iteration()
    assert engine.running and engine.decoder.free_slots == 1
    engine.submit(Cancel("b"))
    engine.iteration()
    assert not engine.running and engine.decoder.free_slots == 2


def test_deadlines_fail_with_a_timeout_and_refusals_name_the_problem(model):
    engine = Engine(model, ByteTokenizer(), max_running=1)
    engine.submit(GenerateRequest("late", (5, 6), SamplingParams(max_tokens=450, temperature=0.0), timeout=0.05))
    engine.iteration()
    time.sleep(0.1)
    late = ending(run(engine), "late")
    assert isinstance(late, Failed) and late.status == 504 and late.code is ErrorCode.TIMEOUT
    engine.submit(GenerateRequest("big", (5,) * 500, SamplingParams(max_tokens=100)))
    engine.submit(GenerateRequest("vocab", (5,), SamplingParams(stop_token_ids=(999,))))
    outputs = run(engine)
    big, vocab = ending(outputs, "big"), ending(outputs, "vocab")
    assert big.status == 400 and big.code is ErrorCode.CONTEXT_LENGTH and "exceeds" in big.message
    assert vocab.status == 400 and "stop_token_ids" in vocab.message
    assert engine.decoder.free_slots == 1


def test_tiny_temperatures_are_greedy_not_infinite():
    logits = torch.tensor([2.0, 1.0, 0.5, -1.0])
    for temperature in (1e-300, 5e-324, MIN_TEMPERATURE / 2):
        assert Sampler(SamplingParams(temperature=temperature, seed=1)).choose(logits).token == 0
    with pytest.raises(InvalidParameter, match="'temperature'") as error:
        SamplingParams(temperature=2.5)
    assert error.value.param == "temperature"


def test_a_request_whose_sampling_fails_fails_alone(model, monkeypatch):
    """The others in its decode batch finish with the tokens they generate alone; its slot is free."""
    engine = Engine(model, ByteTokenizer(), max_running=3)
    prompts = {"a": [5, 6, 7], "bad": [8, 9], "c": [10, 11, 12, 13]}
    for uid, prompt in prompts.items():
        engine.submit(GenerateRequest(uid, tuple(prompt), GREEDY))
    outputs = []
    while len(engine.running) < 3:  # one prefill layer per iteration, then decoding with all three
        outputs += [o for _, o in engine.iteration()]
    outputs += [o for _, o in engine.iteration()]
    bad = next(choice for choice in engine.running.values() if choice.job.uid == "bad")
    monkeypatch.setattr(bad.sampler, "choose", lambda logits: 1 / 0)
    outputs += run(engine)
    failure = ending(outputs, "bad")
    assert isinstance(failure, Failed) and failure.status == 500 and "sampling failed" in failure.message
    for uid in ("a", "c"):
        assert tokens_of(outputs, uid) == alone(model, prompts[uid])
        assert ending(outputs, uid).reason is FinishReason.LENGTH
    assert engine.decoder.free_slots == 3 and not engine.running


def test_a_batched_prefill_that_fails_is_retried_member_by_member(model, monkeypatch):
    """Only the prompt that breaks the forward fails; the prompts batched with it are served."""
    engine = Engine(model, ByteTokenizer(), max_running=3)
    poison = 77
    real = engine.decoder.prefill_steps

    def prefill_steps(prompts, **kwargs):
        if any(poison in ids for _, ids in prompts):
            raise RuntimeError("this prompt breaks the forward")
        return (yield from real(prompts, **kwargs))

    monkeypatch.setattr(engine.decoder, "prefill_steps", prefill_steps)
    prompts = {"a": [5, 6, 7], "bad": [8, poison], "c": [10, 11]}
    for uid, prompt in prompts.items():
        engine.submit(GenerateRequest(uid, tuple(prompt), GREEDY))
    outputs = run(engine)
    assert isinstance(ending(outputs, "bad"), Failed)
    for uid in ("a", "c"):
        assert tokens_of(outputs, uid) == alone(model, prompts[uid])
    assert engine.decoder.free_slots == 3


def test_an_embedding_batch_that_fails_is_retried_member_by_member(model):
    engine = Engine(model, ByteTokenizer(), embedder=_embedder_refusing(model, poison=77))
    engine.submit(EmbedRequest("good", ((5, 6, 7),)))
    engine.submit(EmbedRequest("bad", ((8, 77),)))
    outputs = run(engine)
    assert isinstance(ending(outputs, "good"), Embeddings) and isinstance(ending(outputs, "bad"), Failed)


def _embedder_refusing(model, poison: int):
    from model.embed import embed_steps

    def steps(documents, **kwargs):
        if any(poison in d for d in documents):
            raise RuntimeError("poisoned document")
        return (yield from embed_steps(model, documents, **kwargs))

    return steps


def test_a_failure_nobody_can_be_blamed_for_fails_everything_and_the_engine_goes_on(model, monkeypatch):
    engine = Engine(model, ByteTokenizer(), max_running=2)
    for uid in ("a", "b"):
        engine.submit(GenerateRequest(uid, (5, 6), GREEDY))
    engine.submit(GenerateRequest("queued", (5, 6), GREEDY))
    engine.iteration()
    monkeypatch.setattr(engine, "_expire", lambda *args: 1 / 0)  # a bug in the engine itself
    outputs = [o for _, o in engine.iteration()]
    assert {o.uid for o in outputs if isinstance(o, Failed) and o.code is ErrorCode.INTERNAL} == {"a", "b", "queued"}
    assert engine.decoder.free_slots == 2 and not engine.has_work()
    monkeypatch.undo()
    engine.submit(GenerateRequest("after", (5, 6), GREEDY))
    assert tokens_of(run(engine), "after") == alone(model, [5, 6])


@pytest.mark.parametrize("kind", ["generate", "embed"])
def test_requests_taken_from_the_queue_are_failed_and_freed_when_setting_up_their_work_fails(model, monkeypatch,
                                                                                           kind):
    engine = Engine(model, ByteTokenizer(), max_running=2)
    if kind == "generate":  # e.g. a device error while a slot's cache blocks are lent
        monkeypatch.setattr(engine.decoder, "prefill_steps", lambda *args, **kwargs: 1 / 0)
        engine.submit(GenerateRequest("a", (5, 6), GREEDY, n=2))
    else:
        monkeypatch.setattr(engine, "embed_steps", lambda *args, **kwargs: 1 / 0)
        engine.submit(EmbedRequest("a", ((5, 6),)))
    outputs = [o for _, o in engine.iteration()]
    assert [(o.uid, o.code) for o in outputs if isinstance(o, Failed)] == [("a", ErrorCode.INTERNAL)]
    assert engine.decoder.free_slots == 2 and engine.decoder.usage == 0 and not engine.has_work()
    monkeypatch.undo()
    engine.submit(GenerateRequest("after", (5, 6), GREEDY))
    assert tokens_of(run(engine), "after") == alone(model, [5, 6])


def test_running_counts_requests_in_their_prefill_and_queue_time_is_observed_once(model, monkeypatch):
    metrics = MagicMock()
    engine = Engine(model, ByteTokenizer(), max_running=4, metrics=metrics)
    engine.submit(GenerateRequest("long", tuple(range(3, 200)), GREEDY, n=2))
    engine.iteration()  # the prefill's first layer: no slot decodes yet
    assert engine.running == {} and metrics.engine_state.call_args.kwargs["running"] == 2  # its n sequences
    run(engine)
    assert metrics.engine_state.call_args.kwargs["running"] == 0
    # a batch that fails is retried member by member: each waited in the queue once
    metrics.reset_mock()
    real = engine.decoder.prefill_steps
    calls = []

    def fails_batched(prompts, **kwargs):
        calls.append(len(prompts))
        return (1 / 0 for _ in range(1)) if len(prompts) > 1 else real(prompts, **kwargs)

    monkeypatch.setattr(engine.decoder, "prefill_steps", fails_batched)
    for uid in ("a", "b"):
        engine.submit(GenerateRequest(uid, (5, 6), GREEDY))
    run(engine)
    assert calls == [2, 1, 1] and metrics.queue_time.call_count == 2


@pytest.mark.parametrize("broken", ["prefill_steps", "embed_steps"])
def test_a_backend_that_cannot_run_fails_the_warm_up_instead_of_reporting_ready(model, monkeypatch, broken):
    engine = Engine(model, ByteTokenizer(), max_running=2)
    target = engine.decoder if broken == "prefill_steps" else engine
    monkeypatch.setattr(target, broken, lambda *args, **kwargs: (1 / 0 for _ in range(1)))  # fails when run
    with pytest.raises(RuntimeError, match="failed its warm-up"):
        ReformerAPI._warm_up(SimpleNamespace(engine=engine))
    monkeypatch.undo()
    ReformerAPI._warm_up(SimpleNamespace(engine=engine))  # a backend that runs: nothing to say


def test_command_line_needs_a_model_until_the_default_exists(tmp_path, monkeypatch):
    import server.settings as settings_module

    monkeypatch.setattr(settings_module, "DEFAULT_MODEL", tmp_path / "absent")
    with pytest.raises(SystemExit, match="no embedded default model"):
        parse_args([]).model_config()
    with pytest.raises(SystemExit):
        parse_args(["--max-running", "0"])
