"""Token choice rules and the stopping contract of generation."""

import pytest
import torch

from model.generate import generate
from model.penalties import LogitsAdjuster
from model.sampling import Sampler, SamplingParams
from tests.reference import TINY, build_pair, random_ids, rng_for

LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])


def _draws(params: SamplingParams, count: int = 400) -> set[int]:
    sampler = Sampler(params)
    return {sampler.choose(LOGITS).token for _ in range(count)}


def test_greedy_is_argmax_with_model_logprob():
    choice = Sampler(SamplingParams(temperature=0.0, logprobs=2)).choose(LOGITS)
    assert choice.token == 0
    assert choice.logprob == pytest.approx(float(torch.log_softmax(LOGITS, -1)[0]))
    assert [t for t, _ in choice.top_logprobs] == [0, 1]


def test_top_k_and_top_p_limit_the_support():
    assert _draws(SamplingParams(temperature=1.0, top_k=2, seed=1)) == {0, 1}
    assert _draws(SamplingParams(temperature=1.0, top_k=1, seed=1)) == {0}
    probs = torch.softmax(LOGITS, -1)  # 0.57, 0.21, 0.13, ...: 0.57 < 0.7 <= 0.78
    assert float(probs[0]) < 0.7 <= float(probs[:2].sum())
    assert _draws(SamplingParams(temperature=1.0, top_p=0.7, seed=2)) == {0, 1}
    assert _draws(SamplingParams(temperature=1.0, seed=3), 3000) == set(range(6))


def test_seed_fixes_the_draws():
    sampler_a, sampler_b = Sampler(SamplingParams(seed=11)), Sampler(SamplingParams(seed=11))
    assert [sampler_a.choose(LOGITS).token for _ in range(50)] == [sampler_b.choose(LOGITS).token for _ in range(50)]
    other = Sampler(SamplingParams(seed=12))
    assert [other.choose(LOGITS).token for _ in range(50)] != [sampler_a.choose(LOGITS).token for _ in range(50)]


@pytest.mark.parametrize("field, value", [
    ("max_tokens", -1), ("temperature", -0.5), ("temperature", float("nan")), ("top_k", -2), ("top_p", 0.0),
    ("top_p", 1.5), ("seed", -1), ("stop_token_ids", (999,)), ("logprobs", 21),
])
def test_invalid_parameters_name_themselves(field, value):
    with pytest.raises(ValueError, match=f"'{field}'"):
        SamplingParams(**{field: value}).validate(vocab_size=64)


def test_min_tokens_must_leave_a_token_that_does_not_end_the_text():
    """min_tokens masks the end tokens (the model's end of sequence unless ignored, and the stop tokens); if the
    allowed tokens are all among them, nothing could be drawn."""
    for params in (SamplingParams(allowed_token_ids=(2,), min_tokens=1),
                   SamplingParams(allowed_token_ids=(2, 7), stop_token_ids=(7,), min_tokens=1)):
        with pytest.raises(ValueError, match="'allowed_token_ids'"):
            params.validate(vocab_size=64, eos_token_id=2)
    SamplingParams(allowed_token_ids=(2,), min_tokens=1, ignore_eos=True).validate(vocab_size=64, eos_token_id=2)
    SamplingParams(allowed_token_ids=(2, 3), min_tokens=1).validate(vocab_size=64, eos_token_id=2)
    SamplingParams(allowed_token_ids=(2,)).validate(vocab_size=64, eos_token_id=2)
    # with no allowed list, the end tokens may still cover the whole vocabulary (a byte model's is small)
    with pytest.raises(ValueError, match="'stop_token_ids'"):
        SamplingParams(stop_token_ids=tuple(range(64)), min_tokens=1).validate(vocab_size=64, eos_token_id=2)
    with pytest.raises(ValueError, match="'stop_token_ids'"):
        SamplingParams(stop_token_ids=tuple(t for t in range(64) if t != 2), min_tokens=1).validate(64, 2)
    SamplingParams(stop_token_ids=tuple(range(63)), min_tokens=1).validate(vocab_size=64, eos_token_id=2)


def test_masked_tokens_stay_masked_after_the_penalties():
    """The adjusted logits keep -inf where a token is held back, so a masked token is never drawn and a row
    with nothing left to draw is seen, not sampled from the smallest float."""
    adjuster = LogitsAdjuster(1, 6, torch.device("cpu"))
    adjuster.start(0, [0], SamplingParams(allowed_token_ids=(1, 2), repetition_penalty=1.2), eos_token_id=None)
    adjusted = adjuster.apply(LOGITS[None], [0])[0]
    assert torch.isinf(adjusted[[0, 3, 4, 5]]).all() and (adjusted[[0, 3, 4, 5]] < 0).all()
    assert torch.isfinite(adjusted[[1, 2]]).all()


def test_seeded_requests_ignore_their_batch_neighbours():
    _, model = build_pair(dict(TINY), sharp=False)
    rng = rng_for("neighbours")
    prompts = [random_ids(rng, 1, n, TINY["vocab_size"])[0].tolist() for n in (5, 12, 9)]
    params = [SamplingParams(max_tokens=15, temperature=1.0, seed=seed) for seed in (1, 2, 3)]
    together = generate(model, prompts, params, num_slots=3)
    for i in range(3):
        alone = generate(model, [prompts[i]], params[i], num_slots=1)[0]
        assert alone.token_ids == together[i].token_ids


def test_stop_tokens_eos_and_length():
    _, model = build_pair(dict(TINY))
    prompt = random_ids(rng_for("stops"), 1, 7, TINY["vocab_size"])[0].tolist()
    free = generate(model, [prompt], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert len(free.token_ids) == 10 and free.finish_reason == "length"
    stop_at = free.token_ids[3]
    first = free.token_ids.index(stop_at)
    stopped = generate(model, [prompt], SamplingParams(max_tokens=10, temperature=0.0, stop_token_ids=(stop_at,)))[0]
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
    model.config.eos_token_id = stop_at
    assert generate(model, [prompt], SamplingParams(max_tokens=10, temperature=0.0))[0].finish_reason == "stop"
    ignored = generate(model, [prompt], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))[0]
    assert ignored.token_ids == free.token_ids
    nothing = generate(model, [prompt], SamplingParams(max_tokens=0))[0]
    assert nothing.token_ids == [] and nothing.finish_reason == "length"
