"""Pooled document embeddings against the reference's final hidden states."""

import pytest
import torch
import torch.nn.functional as F

from model.embed import embed
from server.settings import ServerSettings
from tests.reference import TINY, build_pair, random_ids, rng_for


@pytest.mark.parametrize("pooling", ["mean", "first", "last", "max"])
def test_pooling_of_reference_hidden_states(pooling):
    reference, ours = build_pair(dict(TINY), lm=False)
    rng = rng_for("embed", pooling)
    documents = [random_ids(rng, 1, n, TINY["vocab_size"])[0].tolist() for n in (5, 16, 23, 64, 9, 16)]
    vectors = embed(ours, documents, pooling=pooling, max_batch_tokens=48)
    for document, vector in zip(documents, vectors):
        with torch.no_grad():
            hidden = reference(torch.tensor([document])).last_hidden_state[0]
        expected = {"mean": hidden.mean(0), "first": hidden[0], "last": hidden[-1], "max": hidden.amax(0)}[pooling]
        assert (vector - expected).abs().max() <= 1e-5


def test_normalised_embeddings_and_limits():
    _, ours = build_pair(dict(TINY))
    documents = [random_ids(rng_for("norm"), 1, 30, TINY["vocab_size"])[0].tolist()]
    raw = embed(ours, documents)
    unit = embed(ours, documents, normalize=True)
    torch.testing.assert_close(unit, F.normalize(raw, dim=-1))
    assert unit.shape == (1, 2 * TINY["hidden_size"])
    with pytest.raises(ValueError, match="outside"):
        embed(ours, [[5] * 65])
    with pytest.raises(ValueError, match="pooling"):
        embed(ours, documents, pooling="median")


@pytest.mark.parametrize("pooling", ["mean", "first", "last", "max"])
def test_context_tokens_are_attended_to_but_not_pooled(pooling):
    """A chunk's overlap with the one before it (`contexts`) shapes its hidden states but is not pooled."""
    reference, ours = build_pair(dict(TINY), lm=False)
    rng = rng_for("embed-context", pooling)
    documents = [random_ids(rng, 1, n, TINY["vocab_size"])[0].tolist() for n in (5, 16, 23, 40)]
    contexts = [4, 0, 7, 39]
    vectors = embed(ours, documents, pooling=pooling, contexts=contexts, max_batch_tokens=48)
    for document, context, vector in zip(documents, contexts, vectors):
        with torch.no_grad():
            hidden = reference(torch.tensor([document])).last_hidden_state[0, context:]
        expected = {"mean": hidden.mean(0), "first": hidden[0], "last": hidden[-1], "max": hidden.amax(0)}[pooling]
        assert (vector - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="context"):
        embed(ours, documents, contexts=[0, 0, 0, 40])  # nothing left to pool


def test_the_longest_input_is_the_longest_whose_padding_fits_the_positions():
    """The reference pads an input to a multiple of its chunk lengths; with 62 positions and chunks of 4 it
    cannot run 61 tokens (padded to 64), so neither the model nor the server may offer more than 60."""
    reference, ours = build_pair(dict(TINY, axial_pos_embds=False, max_position_embeddings=62), lm=False)
    assert ours.config.max_positions == 62 and ours.config.max_length == 60
    assert ServerSettings().max_context(ours.config) == 60  # prompts beyond it are refused with a 400
    documents = random_ids(rng_for("longest"), 1, 61, TINY["vocab_size"]).tolist()
    with torch.no_grad():
        hidden = reference(torch.tensor([documents[0][:60]])).last_hidden_state[0]
        with pytest.raises(Exception):  # noqa: B017 - the reference fails in its position embedding
            reference(torch.tensor(documents))
    assert (embed(ours, [documents[0][:60]])[0] - hidden.mean(0)).abs().max() <= 1e-5
    with pytest.raises(ValueError, match=r"outside 1\.\.60"):
        embed(ours, documents)
